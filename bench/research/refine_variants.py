"""Refinement variants on a finished run's artefacts (images, manifold features, K-means labels).

    PYTHONPATH=. python bench/research/refine_variants.py RUN_DIR [RUN_DIR ...] --variants base,noself,backbone

Re-runs only the refine step (imgclust.refiner.refine) with each variant on the run's sample and
scores every image's cluster against its parent folder. Labels are used for scoring only.
Variants: base (the product's settings), noself (no self-labelling round), backbone (the cluster
net starts from the run's trained encoder, no self-labelling), backbone-long (same, 2,000 SCAN steps),
or NAME:KEY=VALUE[+KEY=VALUE...] for RefineSettings fields, e.g. ``heads1:heads=1`` or
``ent2:entropy_weight=2+heads=1`` (the refinement table in bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import pandas as pd
import torch
from torch import nn

from imgclust.models import refiner
from imgclust.metrics import score
from imgclust.io.arrays import open_array
from imgclust.cluster.sampling import sample_rows
from imgclust.runmodel import RunModel
from imgclust.runstore import Location


class BackboneNet(nn.Module):
    """The run's encoder (its un-normalised features) with a fresh linear head of ``k`` logits."""

    def __init__(self, encoder: nn.Module, code_dim: int, k: int):
        super().__init__()
        self.features = copy.deepcopy(encoder)
        self.head = nn.Linear(code_dim, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def overrides(text: str) -> dict:
    """``key=value+key=value`` -> RefineSettings fields, each cast to the type of its default."""
    defaults = refiner.RefineSettings()
    out = {}
    for item in filter(None, text.split("+")):
        key, _, value = item.partition("=")
        default = getattr(defaults, key)
        out[key] = value if isinstance(default, str) else type(default)(float(value))
    return out


def run_variant(run: str, variant: str, seed: int) -> dict:
    images = open_array(f"{run}/images.zarr")
    labels0 = open_array(f"{run}/_work/labels.zarr")[:]
    dist0 = open_array(f"{run}/_work/distances.zarr")[:]
    feats = open_array(f"{run}/_work/features.zarr")[:]
    truth = pd.read_parquet(f"{run}/manifest.parquet").sort_values("index")["path"].str.split("/").str[0].to_numpy()
    k = int(labels0.max()) + 1
    settings = refiner.RefineSettings()
    original = refiner.ClusterNet
    if ":" in variant:
        settings = replace(settings, **overrides(variant.partition(":")[2]))
    elif variant != "base":
        settings = replace(settings, selflabel_steps=0)
    if variant == "backbone-long":
        settings = replace(settings, scan_steps=2000)
    if variant.startswith("backbone"):
        ae = RunModel.load(Location(f"{run}/model")).autoencoder
        code_dim = ae.code_shape[0]
        refiner.ClusterNet = lambda channels, kk, width: BackboneNet(ae.encoder, code_dim, kk)  # type: ignore
    try:
        t0 = time.perf_counter()
        rows = sample_rows(len(labels0), settings.sample, seed)
        x = torch.from_numpy(images.get_orthogonal_selection((rows, slice(None), slice(None), slice(None)))).float() / 255
        net, history = refiner.refine(x, feats[rows], labels0[rows].astype(np.int64), -dist0[rows], k, settings, seed)
        pred = np.concatenate([refiner.predict(net, torch.from_numpy(images[a:a + 4096]).float() / 255).argmax(1)
                               for a in range(0, len(labels0), 4096)])
        seconds = time.perf_counter() - t0
    finally:
        refiner.ClusterNet = original
    restored = refiner.restore_dead_clusters(pred, labels0, k)  # as the refine stage does
    s, s0 = score(truth, refiner.apply_restored(pred, labels0, restored)), score(truth, labels0)
    return {"run": run, "variant": variant, "acc": round(s["accuracy"], 4), "nmi": round(s["nmi"], 4),
            "kmeans_acc": round(s0["accuracy"], 4), "kmeans_nmi": round(s0["nmi"], 4),
            "clusters_used": len(np.unique(pred)), "restored": len(restored), "history": history, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--variants", default="base,noself,backbone")
    ap.add_argument("--seed", type=int, default=None, help="default: the run's own seed (run.json)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        seed = args.seed if args.seed is not None else json.loads(Path(f"{run}/run.json").read_text())["config"]["seed"]
        for v in args.variants.split(","):
            print(json.dumps(run_variant(run, v, seed)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
