"""Self-labelling refinement: UMAP -> K-means pseudo-labels, keep the confident share per cluster,
train a small conv classifier on them with shift augmentation, predict all, repeat.

Initial features: raw pixels (``--init raw``) or a saved code file (``--init path.npy``).
Labels are only used for scoring each round.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.research.common import Timer, kmeans, load, record, standardise, umap_embed


class Net(nn.Module):
    def __init__(self, k, width=32, feat=128):
        super().__init__()
        w = width
        layers, c = [], 1
        for o in (w, 2 * w, 4 * w):
            layers += [nn.Conv2d(c, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
            c = o
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, feat), nn.BatchNorm1d(feat),
                                      nn.ReLU(inplace=True))
        self.head = nn.Linear(feat, k)

    def forward(self, x):
        return self.head(self.features(x))


def shift(x, m, g):
    """Random translation by up to m pixels (zero fill) via pad + per-sample crop."""
    if m <= 0:
        return x
    b, c, h, w = x.shape
    p = F.pad(x, (m, m, m, m))
    dx = torch.randint(0, 2 * m + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * m + 1, (b,), generator=g)
    rows = dy[:, None] + torch.arange(h)[None]
    cols = dx[:, None] + torch.arange(w)[None]
    p0 = p[:, 0]
    return p0[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]


def augment(x, m, g, noise=0.0, scale=0.0):
    if scale > 0:  # random zoom in/out around the centre, +-scale
        b = x.shape[0]
        s = 1 + (torch.rand(b, generator=g) * 2 - 1) * scale
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    x = shift(x, m, g)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g)
    return x


def predict(net, X, bs=1024):
    net.eval()
    ps, fs = [], []
    with torch.no_grad():
        for i in range(0, len(X), bs):
            f = net.features(X[i:i + bs])
            fs.append(f)
            ps.append(F.softmax(net.head(f), 1))
    return torch.cat(ps).numpy(), torch.cat(fs).numpy()


def select(labels, conf, k, frac):
    """Indices of the ``frac`` most confident members of each cluster."""
    keep = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        n = max(1, int(round(frac * len(idx))))
        keep.append(idx[np.argsort(-conf[idx])[:n]])
    return np.concatenate(keep)


def train_round(X, idx, targets, k, seed, steps, bs, lr, m, noise, scale, width, net=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if net is None:
        net = Net(k, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    # class-balanced sampling of the kept images
    counts = np.bincount(targets, minlength=k).astype(float)
    w = torch.from_numpy(1.0 / np.maximum(counts[targets], 1))
    T = torch.from_numpy(targets).long()
    Xi = X[torch.from_numpy(idx)]
    net.train()
    for s in range(steps):
        b = torch.multinomial(w, bs, replacement=True, generator=g)
        xb = augment(Xi[b], m, g, noise, scale)
        loss = F.cross_entropy(net(xb), T[b], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--init", default="raw")
    ap.add_argument("--nn", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--shift", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--scale", type=float, default=0.0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--restart", type=int, default=1, help="fresh net each round")
    ap.add_argument("--recluster", type=int, default=1, help="final: UMAP+K-means on the penultimate features")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    x, y = load(a.dataset)
    k = 10
    X = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    for seed in map(int, a.seeds.split(",")):
        t0 = time.perf_counter()
        if a.init == "raw":
            f0 = x.reshape(len(x), -1).astype(np.float32) / 255.0
        else:
            f0 = standardise(np.load(a.init.replace("{seed}", str(seed))))
        e = umap_embed(f0, seed, 10, a.nn)
        lab, cen = kmeans(e, k, seed)
        conf = -np.linalg.norm(e - cen[lab], axis=1)
        name = f"selflabel init={a.init.split('/')[-1]} nn={a.nn} frac={a.frac} steps={a.steps} shift={a.shift} noise={a.noise} scale={a.scale} w={a.width} restart={a.restart}{a.tag}"
        record(a.dataset, name + " r0(kmeans)", seed, y, lab, time.perf_counter() - t0)
        net = None
        for r in range(1, a.rounds + 1):
            idx = select(lab, conf, k, a.frac)
            net = train_round(X, idx, lab[idx], k, seed * 100 + r, a.steps, a.bs, a.lr, a.shift, a.noise, a.scale,
                              a.width, None if a.restart else net)
            p, feats = predict(net, X)
            lab, conf = p.argmax(1), p.max(1)
            record(a.dataset, name + f" r{r}", seed, y, lab, time.perf_counter() - t0,
                   kept_acc_proxy=round(float(conf.mean()), 3))
        if a.recluster:
            e = umap_embed(standardise(feats), seed, 10, a.nn)
            lab2, _ = kmeans(e, k, seed)
            record(a.dataset, name + f" r{a.rounds}+recluster", seed, y, lab2, time.perf_counter() - t0)
