"""Stage 6: assignments, per-cluster summaries and the run record, written atomically."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd

from imgclust.io.arrays import open_array
from imgclust.io.storage import write_json
from imgclust.members import write_members
from imgclust.runstore import RunStore
from imgclust.stages.neighbours import read_kth_distances

logger = logging.getLogger("imgclust")
NEAREST = 9
PACKAGES = ("imgclust", "torch", "prefect", "dask", "distributed", "dask-ml", "zarr",
            "pillow", "scikit-learn", "umap-learn", "numpy", "pandas", "s3fs", "fsspec")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cluster_summaries(assignments: pd.DataFrame, typical: dict[int, float] | None = None,
                      nearest: int = NEAREST) -> list[dict[str, Any]]:
    """One entry per cluster: id, size, the paths closest to its centre, and (``typical``) its
    members' median distance to their k-th nearest neighbour, the outlier score's scale."""
    out = []
    for cid, grp in assignments.groupby("cluster", sort=True):
        close = grp.sort_values(["distance", "path"], kind="stable").head(nearest)
        entry = {"id": int(cid), "size": len(grp), "nearest": close["path"].tolist(),
                 "mean_distance": float(grp["distance"].mean())}
        if typical and int(cid) in typical:
            entry["kth_distance_median"] = typical[int(cid)]
        out.append(entry)
    return out


def typical_kth(summaries: list[dict[str, Any]]) -> dict[int, float]:
    """The clusters' median k-th neighbour distances recorded in ``clusters.json``."""
    return {int(c["id"]): float(c["kth_distance_median"]) for c in summaries if "kth_distance_median" in c}


def outlier_scores(kth: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, dict[int, float]]:
    """Each image's distance to its k-th nearest neighbour (N,) over its cluster's median of it:
    about 1 for a typical member, well above 1 for one far from all others (NaN when unknown).

    Returns the scores (N,) and each cluster's median k-th distance (for images added later)."""
    med = pd.Series(kth).groupby(clusters).median()
    typical = {int(c): float(v) for c, v in med.items() if np.isfinite(v)}
    scale = pd.Series(clusters).map(med).to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(scale > 0, kth / scale, np.where(kth > 0, np.inf, 1.0))
    return np.where(np.isfinite(kth), score, np.nan), typical


def size_balance(sizes: np.ndarray) -> float:
    """Normalised entropy of cluster sizes: 1 = all equal, towards 0 = one cluster holds all."""
    if len(sizes) < 2:
        return 0.0
    p = sizes / sizes.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(sizes)))


def publish(store: RunStore, labels_url: str, distances_url: str) -> dict[str, Any]:
    """Write assignments.parquet and clusters.json from the final labels and distances (zarr, (N,));
    return label-free quality signals."""
    so = store.storage_options
    manifest = store.read_table("manifest")
    labels = open_array(labels_url, so)[:]
    dist = open_array(distances_url, so)[:]
    assignments = pd.DataFrame({
        "path": manifest["path"].to_numpy(), "sha256": manifest["sha256"].to_numpy(),
        "cluster": labels.astype(np.int64), "distance": dist.astype(np.float64),
    })
    kth = read_kth_distances(store)
    typical: dict[int, float] = {}
    if kth is not None:
        by_index = kth.drop_duplicates("index", keep="last").set_index("index")["kth_distance"]
        assignments["outlier"], typical = outlier_scores(
            by_index.reindex(manifest["index"].to_numpy()).to_numpy(np.float64), assignments["cluster"].to_numpy())
    summaries = cluster_summaries(assignments, typical)
    store.write_table("assignments", assignments)
    write_members(store, assignments, manifest["index"].to_numpy(np.int64), 0)
    write_json(store.clusters, summaries, so)
    sizes = np.array([c["size"] for c in summaries], dtype=float)
    logger.info("publish: %d images in %d clusters (sizes %s)", len(assignments), len(summaries),
                ", ".join(str(int(s)) for s in sizes[:30]))
    return {"cluster_sizes": sizes.astype(int).tolist(), "size_balance": size_balance(sizes)}


def write_run_record(store: RunStore, record: dict[str, Any]) -> None:
    """run.json is written last: its presence marks a finished run."""
    write_json(store.run_record, {**record, "tables_generation": 0, "versions": package_versions()},
               store.storage_options)
