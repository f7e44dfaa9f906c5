"""SimCLR-style contrastive pretraining of the small conv net on CPU, then clustering on its features.

Pretext: the backbone of ``selflabel.Net`` (conv w-2w-4w, 3x3 stride 2, BN, ReLU -> flatten -> FC 128,
BN, ReLU) + a 2-layer projection head (128 -> 128 -> ``--proj``), NT-Xent loss on two augmented views
of a batch. Augmentations are batched torch ops (one affine_grid/grid_sample per batch): random
resized crop (area ``--crop``..1, aspect 3/4..4/3), horizontal flip, brightness/contrast jitter,
random erasing, Gaussian noise.

Read-outs on the L2-normalised backbone features (labels only for scoring):
  * 5-NN leave-one-out label vote ("knn5"),
  * K-means on the features, UMAP(10-d, nn 15, min_dist 0) + K-means on the features,
  * optionally (``--scan 1``) the SCAN refinement of ``scan.py`` with neighbours mined in the
    contrastive feature space and the ClusterNet initialised from the pretrained backbone
    (as in SCAN), optionally warm-started on UMAP+K-means pseudo-labels, then one self-label round.

Pretrained backbones and features are cached under bench/_work/research/ (keyed by dataset, seed and
pretext settings), so the read-outs can be re-run without re-training.

Run: PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python bench/research/contrastive.py --dataset fashion10k
"""
import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.research.common import WORK, kmeans, load, record, umap_embed
from bench.research.scan import knn, scan_train
from bench.research.selflabel import Net, predict, select, train_round


# ----------------------------------------------------------------------------------------- augmentations
def simclr_augment(x, g, crop=0.5, flip=True, jitter=0.4, erase=0.25, noise=0.0, shift=0.0):
    """Batched SimCLR-style augmentation of (B,1,H,W) images in [0,1]."""
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    area = crop + (1 - crop) * u(b)
    logr = (u(b) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(logr)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # width share of the crop
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (u(b) * 2 - 1) * (1 - sx)  # keep the crop inside the image
    ty = (u(b) * 2 - 1) * (1 - sy)
    if shift > 0:
        tx = tx + (u(b) * 2 - 1) * shift
        ty = ty + (u(b) * 2 - 1) * shift
    fx = torch.where(u(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx * fx
    theta[:, 1, 1] = sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    if jitter > 0:  # contrast around the image mean, then brightness
        c = 1 + (u(b, 1, 1, 1) * 2 - 1) * jitter
        br = (u(b, 1, 1, 1) * 2 - 1) * jitter * 0.5
        m = x.mean((2, 3), keepdim=True)
        x = (x - m) * c + m + br
    if erase > 0:  # one random rectangle (2..1/3 of the side) set to 0, with probability ``erase``
        h, w = x.shape[2:]
        eh = (2 + u(b) * (h / 3 - 2)).long()
        ew = (2 + u(b) * (w / 3 - 2)).long()
        ey = (u(b) * (h - eh)).long()
        ex = (u(b) * (w - ew)).long()
        on = u(b) < erase
        r = torch.arange(h)[None, :, None]
        cc = torch.arange(w)[None, None, :]
        box = ((r >= ey[:, None, None]) & (r < (ey + eh)[:, None, None]) & (cc >= ex[:, None, None])
               & (cc < (ex + ew)[:, None, None]) & on[:, None, None])
        x = x.masked_fill(box[:, None], 0.0)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- model
class SimCLR(nn.Module):
    def __init__(self, width=32, feat=128, proj=64, k=10):
        super().__init__()
        self.net = Net(k, width, feat)  # .features is the backbone; .head unused here
        self.proj = nn.Sequential(nn.Linear(feat, feat), nn.BatchNorm1d(feat), nn.ReLU(inplace=True),
                                  nn.Linear(feat, proj))

    def forward(self, x):
        return self.proj(self.net.features(x))


def nt_xent(z, temp):
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.t() / temp
    sim.fill_diagonal_(-1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def pretrain(X, a, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SimCLR(a.width, 128, a.proj)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=1e-6)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    N = len(X)
    model.train()
    t0 = time.perf_counter()
    ema = None
    perm, pos = torch.randperm(N, generator=g), 0
    for s in range(a.steps):
        if pos + a.bs > N:
            perm, pos = torch.randperm(N, generator=g), 0
        xb = X[perm[pos:pos + a.bs]]
        pos += a.bs
        v = torch.cat([simclr_augment(xb, g, a.crop, bool(a.flip), a.jitter, a.erase, a.noise, a.shift),
                       simclr_augment(xb, g, a.crop, bool(a.flip), a.jitter, a.erase, a.noise, a.shift)])
        loss = nt_xent(model(v), a.temp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if s in (9, 49) or (s + 1) % 200 == 0 or s == a.steps - 1:
            el = time.perf_counter() - t0
            print(f"step {s + 1}/{a.steps} loss {ema:.3f} {el / (s + 1):.3f} s/step {el:.0f} s", flush=True)
    return model, time.perf_counter() - t0


@torch.no_grad()
def embed(model, X, bs=1024):
    model.eval()
    hs, zs = [], []
    for i in range(0, len(X), bs):
        h = model.net.features(X[i:i + bs])
        hs.append(h)
        zs.append(model.proj(h))
    return torch.cat(hs).numpy(), torch.cat(zs).numpy()


# --------------------------------------------------------------------------------------------- read-outs
def l2n(f):
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_vote(f, y, k=5):
    """Leave-one-out majority vote of the k nearest (cosine on l2-normalised f) neighbours' labels."""
    nb = knn(f, k)
    votes = y[nb]
    pred = np.array([np.bincount(v, minlength=y.max() + 1).argmax() for v in votes])
    return float((pred == y).mean()), nb


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion10k")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temp", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--proj", type=int, default=64)
    ap.add_argument("--crop", type=float, default=0.5)
    ap.add_argument("--flip", type=int, default=1)
    ap.add_argument("--jitter", type=float, default=0.4)
    ap.add_argument("--erase", type=float, default=0.25)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--shift", type=float, default=0.0, help="extra translation, share of the half-width")
    ap.add_argument("--time-only", type=int, default=0, help="only time this many steps")
    ap.add_argument("--umap", type=int, default=1)
    ap.add_argument("--umap-pixels-graph", type=int, default=0, help="also: UMAP of pixels with the feature kNN")
    ap.add_argument("--scan", type=int, default=0)
    ap.add_argument("--scan-steps", type=int, default=1000)
    ap.add_argument("--scan-knn", type=int, default=20)
    ap.add_argument("--scan-heads", type=int, default=5)
    ap.add_argument("--scan-warm", type=int, default=0, help="warm-start round on UMAP+K-means pseudo-labels")
    ap.add_argument("--scan-pretrained", type=int, default=1, help="init ClusterNet from the SimCLR backbone")
    ap.add_argument("--scan-nbr", default="feat", choices=["feat", "umap"])
    ap.add_argument("--selflabel-init", default="fresh,scan", help="comma list of: fresh, scan")
    a = ap.parse_args()
    x, y = load(a.dataset)
    k = 10
    X = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    if a.time_only:
        a.steps = a.time_only
        _, sec = pretrain(X, a, 0)
        print(json.dumps({"dataset": a.dataset, "width": a.width, "bs": a.bs, "steps": a.steps,
                          "s_per_step": round(sec / a.steps, 4)}))
        raise SystemExit
    tag = (f"simclr w={a.width} bs={a.bs} steps={a.steps} lr={a.lr} T={a.temp} crop={a.crop} flip={a.flip} "
           f"jit={a.jitter} erase={a.erase} noise={a.noise} shift={a.shift} proj={a.proj}")
    for seed in map(int, a.seeds.split(",")):
        key = f"simclr_{a.dataset}_s{seed}_" + tag.replace(" ", "_").replace("=", "")
        ck = WORK / f"{key}.pt"
        t0 = time.perf_counter()
        model = SimCLR(a.width, 128, a.proj)
        if ck.exists():
            saved = torch.load(ck)
            model.load_state_dict(saved["state"])
            pre_s = saved["seconds"]
            print("loaded", ck, flush=True)
        else:
            model, pre_s = pretrain(X, a, seed)
            torch.save({"state": model.state_dict(), "seconds": pre_s}, ck)
        h, z = embed(model, X)
        hn = l2n(h)
        np.save(WORK / f"{key}_feat.npy", hn.astype(np.float32))
        v5, _ = knn_vote(hn, y)
        vz, _ = knn_vote(l2n(z), y)
        extra = {"knn5": round(v5, 4), "knn5_proj": round(vz, 4), "pretrain_s": round(pre_s, 1),
                 "s_per_step": round(pre_s / a.steps, 4)}
        print(json.dumps(extra), flush=True)
        tk = time.perf_counter()
        lab, _ = kmeans(hn, k, seed)
        record(a.dataset, tag + " feat+kmeans", seed, y, lab, pre_s + time.perf_counter() - tk, **extra)
        e = None
        if a.umap or a.scan_warm or a.scan_nbr == "umap":
            tu = time.perf_counter()
            ue = WORK / f"{key}_umap10.npy"  # cached: deterministic given the features and seed
            if ue.exists():
                e = np.load(ue)
            else:
                e = umap_embed(hn, seed, 10, 15)
                np.save(ue, e)
            umap_s = round(time.perf_counter() - tu, 1)
            lab_u, cen = kmeans(e, k, seed)
            record(a.dataset, tag + " feat umap(10d,nn15)+kmeans", seed, y, lab_u, pre_s + time.perf_counter() - tu,
                   umap_s=umap_s, **extra)
        if a.umap_pixels_graph:
            # UMAP over the pixels but with the k-NN graph taken from the contrastive features
            import umap as umap_

            tu = time.perf_counter()
            nb = knn(hn, 15)
            idx = np.concatenate([np.arange(len(hn))[:, None], nb], 1)
            d = np.linalg.norm(hn[idx] - hn[:, None], axis=2).astype(np.float32)
            e2 = umap_.UMAP(n_neighbors=16, n_components=10, min_dist=0.0, random_state=seed, n_jobs=1,
                            precomputed_knn=(idx, d, None)).fit_transform(
                x.reshape(len(x), -1).astype(np.float32) / 255.0)
            lab2, _ = kmeans(e2.astype(np.float64), k, seed)
            record(a.dataset, tag + " pixels umap(featknn15)+kmeans", seed, y, lab2,
                   pre_s + time.perf_counter() - tu, **extra)
        if a.scan:
            ts = time.perf_counter()
            nbrs = knn(hn if a.scan_nbr == "feat" else e, a.scan_knn)
            nb_acc = float((y[nbrs] == y[:, None]).mean())
            name = (tag + f" | scan nbr={a.scan_nbr}{a.scan_knn} pre={a.scan_pretrained} warm={a.scan_warm} "
                    f"steps={a.scan_steps} heads={a.scan_heads} sl={a.selflabel_init}")
            net = Net(k, a.width)
            if a.scan_pretrained:
                net.features.load_state_dict(model.net.features.state_dict())
            if a.scan_warm:
                conf = -np.linalg.norm(e - cen[lab_u], axis=1)
                idx = select(lab_u, conf, k, 0.5)
                net = train_round(X, idx, lab_u[idx], k, seed, 300, 128, 2e-3, 2, 0.0, 0.1, a.width, net=net)
                p, _ = predict(net, X)
                record(a.dataset, name + " warm", seed, y, p.argmax(1), pre_s + time.perf_counter() - ts, **extra)
            torch.manual_seed(seed)
            net = scan_train(net, X, nbrs, a.scan_steps, 128, 1e-3, 2, 0.0, 0.1, 5.0, seed, a.scan_heads)
            p, _ = predict(net, X)
            lab, conf = p.argmax(1), p.max(1)
            record(a.dataset, name + " scan", seed, y, lab, pre_s + time.perf_counter() - ts,
                   n_found=int(len(set(lab.tolist()))), nbr_acc=round(nb_acc, 4), **extra)
            idx = select(lab, conf, k, 0.5)
            t_sl = time.perf_counter()
            scan_state = {kk: vv.clone() for kk, vv in net.state_dict().items()}
            for sl in a.selflabel_init.split(","):
                t1 = time.perf_counter()
                net2 = None
                if sl == "scan":  # continue from the SCAN net (as in the SCAN paper)
                    net2 = Net(k, a.width)
                    net2.load_state_dict(scan_state)
                net2 = train_round(X, idx, lab[idx], k, seed + 7, 300, 128, 2e-3, 2, 0.0, 0.1, a.width, net=net2)
                p, _ = predict(net2, X)
                lab2 = p.argmax(1)
                record(a.dataset, name.replace(f"sl={a.selflabel_init}", f"sl={sl}") + " scan+selflabel1", seed, y,
                       lab2, pre_s + (t_sl - ts) + time.perf_counter() - t1, nbr_acc=round(nb_acc, 4), **extra)
            import pandas as pd

            print(pd.crosstab(lab2, y).to_string(), flush=True)
        print(f"seed {seed} total {time.perf_counter() - t0 + (0 if ck.exists() else 0):.0f} s", flush=True)
