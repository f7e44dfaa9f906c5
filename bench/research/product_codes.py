"""Codes of the product's default autoencoder (conv-dense, 32-d, one-cycle, auto step budget), trained
on arrays the way the train stage does (images resized to 32x32 as ingest does), saved as .npy."""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.research.common import WORK, load
from imgclust.models.autoencoders import build_model
from imgclust.presets import train_steps

ap = argparse.ArgumentParser()
ap.add_argument("--datasets", default="digits,fashion10k")
ap.add_argument("--seeds", default="0")
a = ap.parse_args()
for ds in a.datasets.split(","):
    x, _ = load(ds)
    X = F.interpolate(torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], size=(32, 32), mode="bilinear",
                      align_corners=False).clamp(0, 1)
    for seed in map(int, a.seeds.split(",")):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = build_model({"architecture": "conv-dense", "channels": 1, "image_size": [32, 32], "code_dim": 32})
        spe = -(-len(X) // 256)
        epochs = -(-train_steps("default", len(X), 256) // spe)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * spe, pct_start=0.1)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for ep in range(epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(0, len(X), 256):
                xb = X[perm[i:i + 256]]
                loss = F.mse_loss(torch.sigmoid(model.decode_logits(model.encode(xb))), xb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            codes = torch.cat([model.encode(X[i:i + 1024]) for i in range(0, len(X), 1024)]).numpy()
        np.save(WORK / f"product_{ds}_s{seed}.npy", codes)
        print(ds, seed, epochs, "epochs", round(time.perf_counter() - t0, 1), "s", flush=True)
