"""Anchor methods, each run as its own process so that its time and memory are measured alone.

Usage: python bench/anchors.py raw-kmeans|pca-kmeans|umap-kmeans DATASET SEED OUT.npy
       python bench/anchors.py clustimage FOLDER SEED OUT.csv [K]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pixels(dataset: str) -> tuple[np.ndarray, int]:
    """Raw pixels scaled to [0, 1], one row per image (RGB channels only: an alpha channel is dropped), and k."""
    from datasets import load

    x, y = load(dataset)
    if x.ndim == 4 and x.shape[3] == 4:
        x = x[..., :3]
    return x.reshape(len(x), -1) / 255.0, len(np.unique(y))


def raw_kmeans(dataset: str, seed: int, out: str) -> None:
    """scikit-learn K-means (k-means++, 10 restarts) on raw pixels scaled to [0, 1]."""
    from sklearn.cluster import KMeans

    x, k = pixels(dataset)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    np.save(out, labels)


def pca_kmeans(dataset: str, seed: int, out: str) -> None:
    """K-means (10 restarts) on the first 50 principal components of the raw pixels."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x, k = pixels(dataset)
    z = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    np.save(out, KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z))


def umap_kmeans(dataset: str, seed: int, out: str) -> None:
    """UMAP of the raw pixels to 10 dimensions (umap-learn defaults otherwise), then K-means (10 restarts)."""
    import umap
    from sklearn.cluster import KMeans

    x, k = pixels(dataset)
    z = umap.UMAP(n_components=10, random_state=seed).fit_transform(x)
    np.save(out, KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z))


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
    pixel_anchors = {"raw-kmeans": raw_kmeans, "pca-kmeans": pca_kmeans, "umap-kmeans": umap_kmeans}
    if kind in pixel_anchors:
        pixel_anchors[kind](sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif kind == "clustimage":
        clustimage(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else None)
    else:
        raise SystemExit(__doc__)
