"""Shared helpers for the research scripts: data, UMAP -> K-means/GMM, scoring, logging.

Labels are used only in ``record`` (scoring). Run with PYTHONPATH=<worktree>.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(1)

from bench.datasets import load as _load  # noqa: E402
from imgclust.metrics import score  # noqa: E402

WORK = Path(__file__).resolve().parents[1] / "_work" / "research"
WORK.mkdir(parents=True, exist_ok=True)
LOG = WORK / "results.jsonl"


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,28,28) uint8, labels. ``fashion5k``: a fixed random 5,000 of Fashion-MNIST's t10k."""
    if name == "fashion5k":
        x, y = _load("fashion10k")
        rows = np.sort(np.random.default_rng(12345).choice(len(x), 5000, replace=False))
        return x[rows], y[rows]
    return _load(name)


def n_classes(name: str) -> int:
    return 10


def umap_embed(x: np.ndarray, seed: int, n_components: int = 10, n_neighbors: int = 15,
               metric: str = "euclidean", min_dist: float = 0.0) -> np.ndarray:
    import umap

    return umap.UMAP(n_neighbors=n_neighbors, n_components=n_components, min_dist=min_dist, metric=metric,
                     random_state=seed, n_jobs=1).fit_transform(x.astype(np.float32)).astype(np.float64)


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return km.labels_, km.cluster_centers_


def gmm(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=k, covariance_type="full", random_state=seed, n_init=1).fit(x).predict(x)


def standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 1e-8, sd, 1.0)


def record(dataset: str, recipe: str, seed: int, labels: np.ndarray, clusters: np.ndarray, seconds: float,
           **extra) -> dict:
    s = score(labels, clusters)
    row = {"dataset": dataset, "recipe": recipe, "seed": seed, "acc": round(s["accuracy"], 4),
           "nmi": round(s["nmi"], 4), "ari": round(s["ari"], 4), "seconds": round(seconds, 1), **extra,
           "time": time.strftime("%H:%M:%S")}
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    @property
    def s(self) -> float:
        return time.perf_counter() - self.t0

    def __exit__(self, *a):
        pass
