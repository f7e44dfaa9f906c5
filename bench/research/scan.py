"""SCAN-flavoured clustering on CPU: neighbours from raw pixels (or a UMAP embedding), a small conv net
trained so that an image and its neighbour get the same cluster (with shift augmentation), plus an
entropy term that keeps clusters balanced; optionally warm-started by one self-labelling round on
UMAP+K-means pseudo-labels, and followed by self-labelling on the confident predictions.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.research.common import Timer, kmeans, load, record, standardise, umap_embed
from bench.research.selflabel import Net, augment, predict, select, train_round


def knn(f, k):
    from sklearn.neighbors import NearestNeighbors

    nn_ = NearestNeighbors(n_neighbors=k + 1).fit(f)
    return nn_.kneighbors(f, return_distance=False)[:, 1:]


def scan_losses(p, bs, ent_w):
    pa, pn = p[:bs], p[bs:]
    cons = -torch.log((pa * pn).sum(1).clamp_min(1e-7)).mean()
    mp = p.mean(0)
    return cons + ent_w * (mp * torch.log(mp.clamp_min(1e-7))).sum()


def scan_train(net, X, nbrs, steps, bs, lr, m, noise, scale, ent_w, seed, heads=1):
    """SCAN loss on ``heads`` linear heads at once; keeps the head with the lowest loss (no labels)."""
    g = torch.Generator().manual_seed(seed)
    k = net.head.out_features
    hs = torch.nn.ModuleList([net.head] + [torch.nn.Linear(net.head.in_features, k) for _ in range(heads - 1)])
    net.head = hs
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    N, K = nbrs.shape
    NB = torch.from_numpy(nbrs)
    net.train()
    for s in range(steps):
        a = torch.randint(0, N, (bs,), generator=g)
        n = NB[a, torch.randint(0, K, (bs,), generator=g)]
        xb = augment(torch.cat([X[a], X[n]]), m, g, noise, scale)
        f = net.features(xb)
        per_head = torch.stack([scan_losses(F.softmax(h(f), 1), bs, ent_w) for h in hs])
        loss = per_head.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = per_head.detach() if s == 0 else 0.98 * run + 0.02 * per_head.detach()
    best = int(run.argmin())
    net.head = hs[best]
    print("head losses", [round(float(v), 3) for v in run], "kept", best, flush=True)
    return net


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nbr-space", default="umap", choices=["raw", "umap"])
    ap.add_argument("--knn", type=int, default=20)
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ent", type=float, default=5.0)
    ap.add_argument("--shift", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--selflabel", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--init", default="raw", help="raw, or a .npy of codes ({seed} is replaced) for UMAP")
    a = ap.parse_args()
    x, y = load(a.dataset)
    k = 10
    X = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    f0 = x.reshape(len(x), -1).astype(np.float32) / 255.0
    for seed in map(int, a.seeds.split(",")):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        e = umap_embed(f0 if a.init == "raw" else standardise(np.load(a.init.replace("{seed}", str(seed)))),
                       seed, 10, 15)
        lab, cen = kmeans(e, k, seed)
        conf = -np.linalg.norm(e - cen[lab], axis=1)
        nbrs = knn(e if a.nbr_space == "umap" else f0, a.knn)
        name = (("" if a.init == "raw" else f"init={a.init.split('/')[-1]} ") + f"scan nbr={a.nbr_space}{a.knn} warm={a.warm} steps={a.steps} ent={a.ent} shift={a.shift} "
                f"scale={a.scale} noise={a.noise} w={a.width} heads={a.heads}")
        record(a.dataset, name + " r0(umap+kmeans)", seed, y, lab, time.perf_counter() - t0)
        net = Net(k, a.width)
        if a.warm:
            idx = select(lab, conf, k, 0.5)
            net = train_round(X, idx, lab[idx], k, seed, 300, a.bs, 2e-3, a.shift, a.noise, a.scale, a.width)
            p, _ = predict(net, X)
            record(a.dataset, name + " warm", seed, y, p.argmax(1), time.perf_counter() - t0)
        net = scan_train(net, X, nbrs, a.steps, a.bs, a.lr, a.shift, a.noise, a.scale, a.ent, seed, a.heads)
        p, feats = predict(net, X)
        lab, conf = p.argmax(1), p.max(1)
        record(a.dataset, name + " scan", seed, y, lab, time.perf_counter() - t0,
               n_found=int(len(set(lab.tolist()))))
        for r in range(a.selflabel):
            idx = select(lab, conf, k, 0.5)
            net = train_round(X, idx, lab[idx], k, seed + 7 + r, 300, a.bs, 2e-3, a.shift, a.noise, a.scale, a.width)
            p, feats = predict(net, X)
            lab, conf = p.argmax(1), p.max(1)
            record(a.dataset, name + f" scan+selflabel{r + 1}", seed, y, lab, time.perf_counter() - t0)
        import pandas as pd

        print(pd.crosstab(lab, y).to_string(), flush=True)
