"""Anchor methods, each run as its own process so that its time and memory are measured alone.

Usage: python bench/anchors.py raw-kmeans DATASET SEED OUT.npy
       python bench/anchors.py clustimage FOLDER SEED OUT.csv [K]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def raw_kmeans(dataset: str, seed: int, out: str) -> None:
    """scikit-learn K-means (k-means++, 10 restarts) on raw pixels scaled to [0, 1]."""
    from datasets import load
    from sklearn.cluster import KMeans

    x, y = load(dataset)
    k = len(np.unique(y))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x.reshape(len(x), -1) / 255.0)
    np.save(out, labels)


def clustimage(folder: str, seed: int, out: str, k: int | None) -> None:
    """clustimage's default pipeline (PCA features, agglomerative, k by silhouette), or k forced."""
    import pandas as pd
    from clustimage import Clustimage

    np.random.seed(seed)
    cl = Clustimage(method="pca", verbose=30)
    exts = {".png", ".jpg", ".jpeg"}
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in exts)
    results = cl.fit_transform(files, min_clust=k or 3, max_clust=(k + 1) if k else 25)
    pd.DataFrame({"path": results["pathnames"], "cluster": results["labels"]}).to_csv(out, index=False)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "raw-kmeans":
        raw_kmeans(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif kind == "clustimage":
        clustimage(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else None)
    else:
        raise SystemExit(__doc__)
