"""N2D: dense AE 784-500-500-2000-10 (ReLU, MSE, Adam) -> UMAP(n_clusters-d, min_dist 0) -> GMM / K-means.

Codes are saved at several epoch checkpoints so one training run gives an epochs curve.
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

from bench.research.common import WORK, Timer, gmm, kmeans, load, record, umap_embed


def dense_ae(d_in=784, dims=(500, 500, 2000), code=10):
    enc, dec, c = [], [], d_in
    for w in dims:
        enc += [nn.Linear(c, w), nn.ReLU()]
        c = w
    enc += [nn.Linear(c, code)]
    c = code
    for w in dims[::-1]:
        dec += [nn.Linear(c, w), nn.ReLU()]
        c = w
    dec += [nn.Linear(c, d_in)]
    return nn.Sequential(*enc), nn.Sequential(*dec)


def train(x, seed, epochs, checkpoints, batch=256, lr=1e-3, dims=(500, 500, 2000), code=10):
    torch.manual_seed(seed)
    X = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)
    enc, dec = dense_ae(X.shape[1], dims, code)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    out, t0 = {}, time.perf_counter()
    for ep in range(1, epochs + 1):
        perm = torch.randperm(len(X), generator=g)
        tot = 0.0
        for i in range(0, len(X), batch):
            xb = X[perm[i:i + batch]]
            loss = ((dec(enc(xb)) - xb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss) * len(xb)
        if ep in checkpoints:
            with torch.no_grad():
                out[ep] = (torch.cat([enc(X[i:i + 4096]) for i in range(0, len(X), 4096)]).numpy(),
                           time.perf_counter() - t0)
            print(f"epoch {ep} loss {tot / len(X):.5f} {time.perf_counter() - t0:.0f}s", flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="digits,fashion10k")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--checkpoints", default="25,50,100,200")
    ap.add_argument("--nn", default="20")
    ap.add_argument("--code", type=int, default=10)
    a = ap.parse_args()
    cps = sorted(map(int, a.checkpoints.split(",")))
    for ds in a.datasets.split(","):
        x, y = load(ds)
        for seed in map(int, a.seeds.split(",")):
            res = train(x, seed, cps[-1], set(cps), code=a.code)
            for ep, (codes, t_train) in res.items():
                np.save(WORK / f"n2d_{ds}_s{seed}_e{ep}_c{a.code}.npy", codes)
                for nn_ in map(int, a.nn.split(",")):
                    with Timer() as t:
                        e = umap_embed(codes, seed, 10, nn_)
                        t_u = t.s
                        lk, _ = kmeans(e, 10, seed)
                        t_k = t.s
                        lg = gmm(e, 10, seed)
                        t_g = t.s - t_k
                    tag = f"n2d dense AE code{a.code} ep{ep} umap(nn={nn_})"
                    record(ds, tag + "+kmeans", seed, y, lk, t_train + t_k, train_s=round(t_train, 1), umap_s=round(t_u, 1))
                    record(ds, tag + "+gmm", seed, y, lg, t_train + t_u + t_g, train_s=round(t_train, 1))
