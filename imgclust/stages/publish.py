"""Stage 6: assignments, the members layout, per-cluster summaries and the run record.

On the workers, in three passes over bounded pieces: each manifest part gives its assignments
part and its rows of the members layout keyed by (cluster, band of distance); buckets of keys
of about ``BUCKET_ROWS`` rows, planned from the keys' counts, are sorted into the layout's parts;
the layout rows of each chunk of images are gathered into ``position.zarr``. The flow process
holds counts per (cluster, band), part names and each cluster's nearest paths.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
from distributed import Client

from imgclust.dask_cluster import completed
from imgclust.io.arrays import create_array, open_array
from imgclust.io.storage import join, read_parquet, read_parquet_filtered, remove, write_json, write_parquet
from imgclust.io.tables import drop_parts, part_files, part_index, write_part
from imgclust.members import POSITION_CHUNK, members_frame, part_file, write_layout, write_members_part
from imgclust.progress import track
from imgclust.runstore import RunStore
from imgclust.stages.neighbours import read_kth_distances
from imgclust.state.resume import ShardLedger

logger = logging.getLogger("imgclust")
NEAREST = 9
BANDS = 256  # distance bands per cluster: the layout's partitioning key (band_keys)
BUCKET_ROWS = 1_000_000  # layout rows one worker sorts at once (about 150 MB)
KEYED_ROW_GROUP = 8192  # row groups of the keyed and position parts, read by key range
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
    return relative_scores(kth, pd.Series(clusters).map(med).to_numpy(np.float64)), typical


def relative_scores(kth: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``kth / scale`` (N,), with 1 for 0 / 0, inf for x / 0 and NaN where ``kth`` is unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(scale > 0, kth / scale, np.where(kth > 0, np.inf, 1.0))
    return np.where(np.isfinite(kth), score, np.nan)


def size_balance(sizes: np.ndarray) -> float:
    """Normalised entropy of cluster sizes: 1 = all equal, towards 0 = one cluster holds all."""
    if len(sizes) < 2:
        return 0.0
    p = sizes / sizes.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(sizes)))


@dataclass(frozen=True)
class PublishInputs:
    """What every publish task reads: the run's store, its final labels and distances (zarr,
    (N,), images.zarr rows), and the outlier scale of each image (``_work/publish/kth.zarr``)."""

    store: RunStore
    labels_url: str
    distances_url: str

    @property
    def kth_url(self) -> str:
        return self.store.work("publish", "kth.zarr")

    @property
    def keyed(self) -> str:
        return self.store.work("publish", "keyed")

    @property
    def positions(self) -> str:
        return self.store.work("publish", "positions")


def kth_and_typical(inputs: PublishInputs) -> dict[int, float] | None:
    """On a worker: each image's k-th neighbour distance as ``kth.zarr`` (N,) (NaN when unknown) and
    each cluster's median of it (None when the run has no neighbours). Holds 16 bytes an image."""
    store, so = inputs.store, inputs.store.storage_options
    kth_parts = read_kth_distances(store)
    if kth_parts is None:
        return None
    labels = open_array(inputs.labels_url, so)
    n = labels.shape[0]
    kth = np.full(n, np.nan, np.float64)
    idx = kth_parts["index"].to_numpy(np.int64)
    ok = (idx >= 0) & (idx < n)
    kth[idx[ok]] = kth_parts["kth_distance"].to_numpy(np.float64)[ok]  # later parts win, as drop_duplicates(last)
    del kth_parts, idx, ok
    create_array(inputs.kth_url, (n,), POSITION_CHUNK, "float64", so)[:] = kth
    _, typical = outlier_scores(kth, labels[:].astype(np.int64))
    return typical


def band_keys(clusters: np.ndarray, distances: np.ndarray, top: float, bands: int = BANDS) -> np.ndarray:
    """The layout's partitioning key of each row: cluster × ``bands`` + its band of distance
    (``bands`` equal bands over [0, ``top``]); sorting by key never contradicts sorting by
    (cluster, distance)."""
    scale = bands / top if top > 0 else 0.0
    band = np.clip(np.floor(np.where(np.isnan(distances), top, distances) * scale), 0, bands - 1).astype(np.int64)
    return clusters.astype(np.int64) * bands + band


def assignment_part(inputs: PublishInputs, manifest_part: str, typical: dict[int, float] | None, top: float,
                    fence: ShardLedger) -> int:
    """On a worker: the assignments of one manifest part (same part number) and its rows of the
    members layout keyed by ``band_keys`` (``_work/publish/keyed/``); how many rows."""
    store, so = inputs.store, inputs.store.storage_options
    manifest = read_parquet(manifest_part, so)[["path", "sha256", "index"]]
    index = manifest["index"].to_numpy(np.int64)
    lo, hi = (int(index.min()), int(index.max()) + 1) if len(index) else (0, 0)
    labels = open_array(inputs.labels_url, so)[lo:hi][index - lo].astype(np.int64)
    dist = open_array(inputs.distances_url, so)[lo:hi][index - lo].astype(np.float64)
    assignments = pd.DataFrame({"path": manifest["path"].to_numpy(), "sha256": manifest["sha256"].to_numpy(),
                                "cluster": labels, "distance": dist})
    if typical is not None:
        kth = open_array(inputs.kth_url, so)[lo:hi][index - lo]
        assignments["outlier"] = relative_scores(kth, pd.Series(labels).map(typical).to_numpy(np.float64))
    keyed = members_frame(assignments, index)
    keyed.insert(0, "key", band_keys(keyed["cluster"].to_numpy(), keyed["distance"].to_numpy(), top))
    keyed = keyed.sort_values("key", kind="stable")
    number = part_index(manifest_part)
    fence.check_fence()
    write_part(store.table("assignments"), assignments, 0, number, so)
    write_parquet(join(inputs.keyed, f"part-{number:05d}.parquet"), keyed, so, KEYED_ROW_GROUP)
    return len(assignments)


def plan_buckets(counts: np.ndarray, bucket_rows: int) -> list[tuple[int, int, int]]:
    """Cut the keys (their row counts ``counts``, in key order) into runs of about ``bucket_rows``
    rows: (first key, end key, first layout row) of each non-empty bucket. A key holding more
    rows than ``bucket_rows`` is a bucket of its own."""
    before = np.cumsum(counts) - counts
    bucket = before // max(1, bucket_rows)
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(counts)]])
    return [(int(a), int(b), int(before[a])) for a, b in zip(starts, ends) if counts[a:b].sum() > 0]


def members_bucket(inputs: PublishInputs, keyed_parts: list[str], number: int, keys: tuple[int, int], first_row: int,
                   fence: ShardLedger) -> tuple[int, dict[int, list[str]]]:
    """On a worker: the layout rows whose key is in ``keys`` [lo, hi), sorted, as members part
    ``number`` starting at layout row ``first_row``, and their images' layout rows
    (``_work/publish/positions/``). Returns the rows written and the first ``NEAREST`` paths of
    each cluster in the bucket."""
    store, so = inputs.store, inputs.store.storage_options
    lo, hi = keys
    frames = [read_parquet_filtered(url, so, None, [("key", ">=", lo), ("key", "<", hi)]) for url in keyed_parts]
    rows = pd.concat(frames, ignore_index=True).drop(columns="key")
    rows = rows.sort_values(["cluster", "distance", "path"], kind="stable").reset_index(drop=True)
    fence.check_fence()
    write_members_part(store, number, rows)
    at = pd.DataFrame({"index": rows["index"].to_numpy(np.int64),
                       "row": np.arange(first_row, first_row + len(rows), dtype=np.int64)}).sort_values("index")
    write_parquet(join(inputs.positions, f"bucket-{number:05d}.parquet"), at, so, KEYED_ROW_GROUP)
    heads = rows.groupby("cluster", sort=True).head(NEAREST)
    return len(rows), {int(c): g["path"].tolist() for c, g in heads.groupby("cluster", sort=True)}


def position_chunk(inputs: PublishInputs, bucket_parts: list[str], lo: int, hi: int) -> int:
    """On a worker: rows [lo, hi) of ``members/position.zarr`` (one chunk) from the buckets' positions."""
    so = inputs.store.storage_options
    frames = [read_parquet_filtered(url, so, None, [("index", ">=", lo), ("index", "<", hi)]) for url in bucket_parts]
    at = pd.concat(frames, ignore_index=True)
    block = np.full(hi - lo, -1, np.int64)
    block[at["index"].to_numpy(np.int64) - lo] = at["row"].to_numpy(np.int64)
    open_array(inputs.store.members("position.zarr"), so, mode="r+")[lo:hi] = block
    return len(at)


def publish(store: RunStore, labels_url: str, distances_url: str, client: Client | None = None,
            bucket_rows: int = BUCKET_ROWS) -> dict[str, Any]:
    """Write the assignments table, the members layout and clusters.json from the final labels and
    distances (zarr, (N,)); return label-free quality signals.

    With ``client``, every step over images runs on its workers (one task per manifest part, per
    layout bucket of about ``bucket_rows`` rows, per chunk of position.zarr) and this process holds
    per-cluster figures and part names only; without one, the same steps run here, one by one.
    """
    so = store.storage_options
    inputs = PublishInputs(store, labels_url, distances_url)
    fence = ShardLedger(store, "publish", "layout")  # its fence only: the steps are redone whole
    run = _runner(client)
    manifest_parts = [join(store.table("manifest"), posixpath.basename(name))  # listed names lack the protocol
                      for g, name in part_files(store.table("manifest"), so) if g == 0]
    remove(store.members("layout.json"), so)
    for folder in (inputs.keyed, inputs.positions):
        remove(folder, so)
    labels = da.from_zarr(open_array(labels_url, so)).astype(np.int64)
    dist = da.from_zarr(open_array(distances_url, so)).astype(np.float64)
    n = int(labels.shape[0])
    top, n_clusters = (float(v) for v in dask.compute(da.nanmax(dist), labels.max(), scheduler=client or "sync")) \
        if n else (0.0, -1)
    k = int(n_clusters) + 1
    typical = run(kth_and_typical, [(inputs,)])[0]
    written = run(assignment_part, [(inputs, p, typical, top, fence) for p in manifest_parts], "publish", "part")
    numbers = {part_index(p) for p in manifest_parts}
    drop_parts(store.table("assignments"), so, lambda g, i: g == 0 and i not in numbers)
    keys = band_keys(labels, dist, top)
    counts, dist_sums = dask.compute(da.bincount(keys, minlength=k * BANDS), da.bincount(labels, dist, minlength=k),
                                     scheduler=client or "sync") if n else (np.zeros(0, np.int64), np.zeros(0))
    assert sum(written) == n == int(counts.sum()), (sum(written), n)
    buckets = plan_buckets(counts, bucket_rows)
    keyed_parts = [join(inputs.keyed, f"part-{part_index(p):05d}.parquet") for p in manifest_parts]
    heads: dict[int, list[str]] = {}
    parts: list[tuple[str, int, int]] = []
    done = run(members_bucket, [(inputs, keyed_parts, b, (lo, hi), first, fence)
                                for b, (lo, hi, first) in enumerate(buckets)], "layout", "bucket")
    for b, (rows, head) in enumerate(done):  # in bucket order: a cluster's nearest come first
        parts.append((part_file(b), buckets[b][2], rows))
        for c, paths in head.items():
            heads[c] = (heads.get(c, []) + paths)[:NEAREST]
    create_array(store.members("position.zarr"), (n,), POSITION_CHUNK, "int64", so)
    bucket_parts = [join(inputs.positions, f"bucket-{b:05d}.parquet") for b in range(len(buckets))]
    run(position_chunk, [(inputs, bucket_parts, a, min(n, a + POSITION_CHUNK)) for a in range(0, n, POSITION_CHUNK)],
        "positions", "chunk")
    sizes = counts.reshape(k, BANDS).sum(1) if k > 0 else np.zeros(0, np.int64)
    starts = np.cumsum(sizes) - sizes
    present = np.flatnonzero(sizes)
    write_layout(store, 0, parts, {int(c): (int(starts[c]), int(sizes[c])) for c in present})
    summaries = []
    for c in present.tolist():
        entry = {"id": c, "size": int(sizes[c]), "nearest": heads.get(c, []),
                 "mean_distance": float(dist_sums[c] / sizes[c])}
        if typical and c in typical:
            entry["kth_distance_median"] = typical[c]
        summaries.append(entry)
    write_json(store.clusters, summaries, so)
    remove(store.work("publish"), so)
    sized = sizes[present].astype(float)
    logger.info("publish: %d images in %d clusters (sizes %s)", n, len(summaries),
                ", ".join(str(int(s)) for s in sized[:30]))
    return {"cluster_sizes": sized.astype(int).tolist(), "size_balance": size_balance(sized)}


def _runner(client: Client | None) -> Callable[..., list[Any]]:
    """``run(fn, calls, desc, unit)``: ``fn(*args)`` for each args of ``calls``, results in order; on
    ``client``'s workers when there is one (with progress), else here."""
    def run(fn: Callable[..., Any], calls: list[tuple[Any, ...]], desc: str = "", unit: str = "") -> list[Any]:
        if client is None:
            return [fn(*args) for args in calls]
        futures = [client.submit(fn, *args, pure=False) for args in calls]
        for _ in track(completed(client, futures), total=len(futures), desc=desc or fn.__name__, unit=unit or "task"):
            pass
        return [f.result() for f in futures]
    return run


def write_run_record(store: RunStore, record: dict[str, Any]) -> None:
    """run.json is written last: its presence marks a finished run."""
    write_json(store.run_record, {**record, "tables_generation": 0, "versions": package_versions()},
               store.storage_options)
