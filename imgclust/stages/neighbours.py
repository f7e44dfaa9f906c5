"""Stage 5c: the code index, every image's nearest neighbours, outlier scores, near-duplicate groups.

One task per part of the index (``imgclust.codeindex``) finds the ``k`` nearest neighbours of
each of its images among the lists nearest to the image's own, writes the distance to the
``k``-th to ``RUN/index/knn/part-PPPPP.parquet`` (``index, kth_distance``; publish turns it
into the assignments' ``outlier`` score) and returns the near-duplicate pairs it confirmed
(``imgclust.near_duplicates``). The client joins the pairs into groups and writes
``near_duplicates.parquet`` (``group, path, sha256, distance, hash_distance``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from distributed import Client

from imgclust.codeindex import CodeIndex, IndexSettings, Standardiser, build_index, nearest_centres
from imgclust.dask_cluster import completed
from imgclust.io.arrays import open_array, read_rows
from imgclust.io.storage import open_fs, remove, with_retries, write_bytes_atomic
from imgclust.io.tables import write_part
from imgclust.near_duplicates import content_bases, content_similarity, group_pairs, hamming, perceptual_hash
from imgclust.progress import track
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore

logger = logging.getLogger("imgclust")
PAIR_COLUMNS = ["a", "b", "code_distance", "hash_distance"]


@dataclass(frozen=True)
class NeighbourSettings:
    """k: the neighbour whose distance makes the outlier score. dup_neighbours: nearest neighbours
    of each image checked as near-duplicates; a pair is a candidate when its code distance is at
    most ``dup_code_ratio`` × the median ``k``-th neighbour distance of the part, and confirmed when
    the perceptual hashes differ in at most ``dup_hash_bits`` of 64 bits and the thumbnails'
    content correlation (``imgclust.near_duplicates.content_similarity``: the best over light
    crops of either image) is at least ``dup_correlation``."""

    k: int = 10
    dup_neighbours: int = 30
    dup_code_ratio: float = 4.0
    dup_hash_bits: int = 18
    dup_correlation: float = 0.96
    query_rows: int = 512
    index: IndexSettings = field(default_factory=IndexSettings)


@dataclass(frozen=True)
class Neighbourhood:
    near_duplicate_groups: int
    near_duplicate_images: int
    index_lists: int


def _knn_of_list(index: CodeIndex, lst: int, k: int, query_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of list ``lst`` (n,), their ``k`` nearest indexed rows (n, k) and distances (n, k)."""
    own = index.read_lists(np.array([lst]))[lst]
    probes = nearest_centres(index.centres[lst:lst + 1], index.centres, index.nprobe)[0]
    got = index.read_lists(probes)
    cand = np.concatenate([got[int(i)][0] for i in probes])
    cand_rows = np.concatenate([got[int(i)][1] for i in probes])
    cand_sq = np.concatenate([got[int(i)][2] for i in probes])
    m = min(k, len(cand_rows) - 1)
    rows = own[1]
    nn = np.full((len(rows), k), -1, np.int64)
    dist = np.full((len(rows), k), np.inf, np.float32)
    if m <= 0:
        return rows, nn, dist
    for a in range(0, len(rows), query_rows):
        q, qr = own[0][a:a + query_rows], rows[a:a + query_rows]
        d2 = cand_sq[None, :] - 2.0 * (q @ cand.T) + (q**2).sum(1)[:, None]
        d2[qr[:, None] == cand_rows[None, :]] = np.inf  # not its own neighbour
        best = np.argpartition(d2, m - 1, axis=1)[:, :m]
        order = np.take_along_axis(d2, best, 1).argsort(1, kind="stable")
        best = np.take_along_axis(best, order, 1)
        nn[a:a + len(qr), :m] = cand_rows[best]
        dist[a:a + len(qr), :m] = np.sqrt(np.maximum(np.take_along_axis(d2, best, 1), 0.0))
    return rows, nn, dist


def knn_part(index_loc: Location, pixels: Location, part: int, settings: NeighbourSettings) -> pd.DataFrame:
    """On a worker: neighbours of every image of index part ``part``; writes its k-th distances and
    returns the confirmed near-duplicate pairs (``PAIR_COLUMNS``, a < b)."""
    index = CodeIndex.at(index_loc, cache_lists=4 * settings.index.nprobe + 64)
    assert index is not None
    k = max(settings.k, settings.dup_neighbours)
    found = [_knn_of_list(index, int(lst), k, settings.query_rows)
             for lst in np.flatnonzero((index.lists[:, 0] == part) & (index.lists[:, 2] > 0))]
    rows = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
    nn = np.concatenate([f[1] for f in found]) if found else np.zeros((0, k), np.int64)
    dist = np.concatenate([f[2] for f in found]) if found else np.zeros((0, k), np.float32)
    finite = np.where(np.isfinite(dist[:, :settings.k]), dist[:, :settings.k], -np.inf)
    kth = finite.max(1) if len(rows) else np.zeros(0, np.float32)  # the k-th, or the last a tiny run has
    kth = np.where(np.isfinite(kth), kth, 0.0)
    buf = io.BytesIO()
    pd.DataFrame({"index": rows, "kth_distance": kth.astype(np.float64)}).to_parquet(buf, index=False)
    write_bytes_atomic(index_loc.path("knn", f"part-{part:05d}.parquet"), buf.getvalue(), index_loc.storage_options)
    if not len(rows):
        return pd.DataFrame({c: [] for c in PAIR_COLUMNS})
    limit = settings.dup_code_ratio * float(np.median(kth))
    j = min(settings.dup_neighbours, k)
    a = np.repeat(rows, j)
    b, d = nn[:, :j].ravel(), dist[:, :j].ravel()
    keep = (b >= 0) & (d <= limit)
    a, b, d = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep]), d[keep]
    cand = pd.DataFrame({"a": a, "b": b, "code_distance": d}).drop_duplicates(["a", "b"])
    if not len(cand):
        return pd.DataFrame({c: [] for c in PAIR_COLUMNS})
    members = np.unique(np.concatenate([cand["a"].to_numpy(), cand["b"].to_numpy()]))
    thumbs = read_rows(open_array(pixels.url, pixels.storage_options), members)
    at = np.searchsorted(members, cand["a"].to_numpy()), np.searchsorted(members, cand["b"].to_numpy())
    hashes = perceptual_hash(thumbs)
    cand["hash_distance"] = hamming(hashes[at[0]], hashes[at[1]])
    near = (cand["hash_distance"] <= settings.dup_hash_bits).to_numpy()
    cand, at = cand[near], (at[0][near], at[1][near])
    cand["correlation"] = content_similarity(content_bases(thumbs), *at, enough=settings.dup_correlation)
    keep = cand["correlation"] >= settings.dup_correlation
    return cand[keep][PAIR_COLUMNS].reset_index(drop=True)


def read_kth_distances(store: RunStore) -> pd.DataFrame | None:
    """``index, kth_distance`` of every indexed image, or None when the run has no neighbours yet."""
    loc = store.child("index", "knn")
    if not loc.exists():
        return None
    fs, path = open_fs(loc.url, loc.storage_options)
    files = sorted(p for p in with_retries(fs.ls, path, detail=False) if p.endswith(".parquet"))
    if not files:
        return None
    return pd.concat([pd.read_parquet(io.BytesIO(with_retries(fs.cat_file, f))) for f in files], ignore_index=True)


def neighbourhood(store: RunStore, client: Client, settings: NeighbourSettings | None = None) -> Neighbourhood:
    """Index the run's codes, find every image's neighbours and write the near-duplicate groups."""
    settings = settings or NeighbourSettings()
    so = store.storage_options
    model = RunModel.load(Location(store.model, so))
    space = model.code_space
    if space is None:
        raise ValueError("the run's model has no code space: cluster before indexing")
    scale = Standardiser.of(space)
    index = build_index(store, scale, client, settings.index)
    remove(index.location.path("knn"), so)
    n_parts = int(index.lists[:, 0].max()) + 1
    futures = [client.submit(knn_part, index.location, Location(store.pictures, so), p, settings, pure=False)
               for p in range(n_parts)]
    pairs = [f.result() for f in track(completed(client, futures), total=n_parts, desc="neighbours", unit="part")]
    pairs_df = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame({c: [] for c in PAIR_COLUMNS})
    pairs_df = pairs_df.sort_values(["a", "b"]).drop_duplicates(["a", "b"]).reset_index(drop=True)
    groups = write_near_duplicates(store, scale, pairs_df)
    logger.info("neighbours: %d near-duplicate groups (%d images); outlier scores from the %d-th neighbour",
                groups["group"].nunique(), len(groups), settings.k)
    return Neighbourhood(int(groups["group"].nunique()), len(groups), index.n_lists)


def write_near_duplicates(store: RunStore, scale: Standardiser, pairs: pd.DataFrame) -> pd.DataFrame:
    """Join confirmed ``pairs`` (images.zarr rows) into groups and write ``near_duplicates.parquet``:
    ``group`` (numbered from 0 in order of the groups' first image), ``path``, ``sha256``,
    ``distance`` (code distance to the group's first image) and ``hash_distance`` (bits)."""
    so = store.storage_options
    root = group_pairs(pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64))
    members = np.array(sorted(root), np.int64)
    manifest = store.read_table("manifest", ["path", "sha256", "index"]).drop_duplicates("index", keep="last")
    manifest = manifest.set_index("index")
    if len(members):
        codes = scale(read_rows(open_array(store.codes, so), members))
        firsts = np.array([root[m] for m in members.tolist()], np.int64)
        at = {m: i for i, m in enumerate(members.tolist())}
        first_rows = np.array([at[f] for f in firsts.tolist()])
        dist = np.sqrt(((codes - codes[first_rows]) ** 2).sum(1))
        hashes = perceptual_hash(read_rows(open_array(store.pictures, so), members))
        bits = hamming(hashes, hashes[first_rows])
        numbers = {f: g for g, f in enumerate(sorted(set(firsts.tolist())))}
        known = np.isin(members, manifest.index.to_numpy())
        groups = pd.DataFrame({
            "group": [numbers[f] for f in firsts.tolist()], "path": manifest["path"].reindex(members).to_numpy(),
            "sha256": manifest["sha256"].reindex(members).to_numpy(), "distance": dist.astype(np.float64),
            "hash_distance": bits, "index": members,
        })[known]
    else:
        groups = pd.DataFrame({"group": pd.Series([], dtype=np.int64), "path": pd.Series([], dtype=object),
                               "sha256": pd.Series([], dtype=object), "distance": pd.Series([], dtype=np.float64),
                               "hash_distance": pd.Series([], dtype=np.int64), "index": pd.Series([], dtype=np.int64)})
    groups = groups.sort_values(["group", "distance", "path"], kind="stable").reset_index(drop=True)
    remove(store.near_duplicates, so)
    write_part(store.near_duplicates, groups, 0, 0, so)
    return groups
