"""An inverted-file index over a run's standardised codes, on storage and read a few lists at a time.

The codes are split into ``L`` lists by their nearest coarse centre (K-means on a sample). A
query compares itself with the ``L`` centres, reads its ``nprobe`` nearest lists (two byte ranges
each, from a local folder or any fsspec URL) and ranks their codes exactly. What a reader holds is
the centres (``L`` × D floats) whatever the number of codes, and a query reads about
``nprobe × LIST_ROWS`` codes.

``RUN/index/`` holds:

- ``centroids.npy``: (L, D) float32, the coarse centres;
- ``lists.npy``: (L, 3) int64, each list's part, first row in that part and row count;
- ``part-PPPPP.codes``: float16 (rows, D), row-major, the standardised codes of a range of lists,
  list after list; ``part-PPPPP.rows``: int64 (rows,), the images.zarr row of each;
- ``index.json``: sizes and settings, written last (an index without it is unfinished).

Building runs on Dask workers: one task fits the centres on a sample, one task per block of codes
routes its rows to their lists and writes them sorted, one task per part gathers its lists from
every block; the client only sees counts.
"""

from __future__ import annotations

import io
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from imgclust.dask_cluster import completed
from imgclust.io.arrays import chunk_spans, open_array, read_rows
from imgclust.io.storage import open_fs, read_json, remove, with_retries, write_bytes_atomic, write_json
from imgclust.progress import track
from imgclust.runstore import Location, RunStore

logger = logging.getLogger("imgclust")
VERSION = 1


@dataclass(frozen=True)
class IndexSettings:
    """How the index is cut.

    list_rows: mean rows per list (the lists are ``n / list_rows``, at most ``max_lists``).
    nprobe: lists a query reads (recall against exact search grows with it).
    sample_per_list: rows of the centres' K-means sample per list (at most ``max_sample``).
    """

    list_rows: int = 1024
    max_lists: int = 4096
    nprobe: int = 16
    sample_per_list: int = 40
    max_sample: int = 1 << 17
    block_rows: int = 1 << 16
    part_bytes: int = 64 << 20
    seed: int = 0

    def n_lists(self, n: int) -> int:
        return int(min(self.max_lists, max(1, round(n / self.list_rows))))


@dataclass(frozen=True)
class Standardiser:
    """The clustering's per-dimension ``(code - mean) / std`` (``CodeSpace``), as plain arrays."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    @classmethod
    def of(cls, space: Any) -> Standardiser:
        """The standardisation of a ``CodeSpace`` (without its embedding's sample, so it travels light)."""
        return cls(space.mean, space.std)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """(N, D) codes -> (N, D) float32 standardised codes."""
        return ((np.asarray(codes, np.float64) - self.mean) / self.std).astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_ranges(fs: Any, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """Byte ranges [starts[i], ends[i]) of ``paths`` (concurrently where the filesystem can); a
    range that cannot be read raises (fsspec hands its error back in place of the bytes)."""
    if not paths:
        return []
    data = with_retries(fs.cat_ranges, paths, starts, ends, on_error="raise")
    for d in data:
        if isinstance(d, BaseException):
            raise d
    return data


def nearest_centres(x: np.ndarray, centres: np.ndarray, m: int = 1) -> np.ndarray:
    """(N, D) rows, (L, D) centres -> (N, m) the ``m`` nearest centres of each row, nearest first."""
    d2 = (centres**2).sum(1)[None, :] - 2.0 * (x @ centres.T)  # + |x|², the same for every centre
    m = min(m, len(centres))
    if m == 1:
        return np.argmin(d2, axis=1)[:, None]
    near = np.argpartition(d2, m - 1, axis=1)[:, :m]
    order = np.take_along_axis(d2, near, 1).argsort(1, kind="stable")
    return np.take_along_axis(near, order, 1)


# -- building (each function below runs on a worker) ------------------------------------------------
def fit_centres(codes: Location, scale: Standardiser, n_lists: int, settings: IndexSettings) -> np.ndarray:
    """(L, D) float32 coarse centres: K-means on a random sample of the standardised codes."""
    from sklearn.cluster import KMeans

    arr = open_array(codes.url, codes.storage_options)
    n = arr.shape[0]
    size = min(n, max(n_lists, min(settings.max_sample, n_lists * settings.sample_per_list)))
    rng = np.random.default_rng(settings.seed)
    sample = scale(read_rows(arr, np.sort(rng.choice(n, size, replace=False))))
    if n_lists == 1:
        return sample.mean(0, keepdims=True).astype(np.float32)
    km = KMeans(n_lists, n_init=1, max_iter=25, random_state=settings.seed).fit(sample)
    return km.cluster_centers_.astype(np.float32)


def route_block(codes: Location, scale: Standardiser, centres: np.ndarray, bounds: np.ndarray,
                tmp: Location, block: int, start: int, stop: int) -> np.ndarray:
    """Write codes [start, stop) sorted by list to ``tmp/block-B.{codes,rows,lists}``; returns the
    (P + 1,) row offsets in it of each part's lists (part p holds lists [bounds[p], bounds[p+1]))."""
    x = scale(open_array(codes.url, codes.storage_options)[start:stop])
    lists = nearest_centres(x, centres)[:, 0].astype(np.int32)
    order = np.argsort(lists, kind="stable")
    so = tmp.storage_options
    write_bytes_atomic(tmp.path(f"block-{block:05d}.codes"), x[order].astype(np.float16).tobytes(), so)
    write_bytes_atomic(tmp.path(f"block-{block:05d}.rows"), (np.arange(start, stop, dtype=np.int64)[order]).tobytes(), so)
    write_bytes_atomic(tmp.path(f"block-{block:05d}.lists"), lists[order].tobytes(), so)
    return np.searchsorted(lists[order], bounds).astype(np.int64)


def write_part(index: Location, tmp: Location, part: int, lo: int, hi: int, dim: int,
               offsets: list[np.ndarray]) -> np.ndarray:
    """Gather lists [lo, hi) from every block (``offsets[b]``: block b's part offsets) into part
    ``part``; returns each list's row count (hi - lo,)."""
    fs, _ = open_fs(tmp.url, tmp.storage_options)
    blocks = [b for b, off in enumerate(offsets) if off[part + 1] > off[part]]
    spans = [(int(offsets[b][part]), int(offsets[b][part + 1])) for b in blocks]

    def ranges(suffix: str, width: int) -> list[bytes]:
        paths = [open_fs(tmp.path(f"block-{b:05d}.{suffix}"), tmp.storage_options)[1] for b in blocks]
        return read_ranges(fs, paths, [a * width for a, _ in spans], [z * width for _, z in spans])

    codes = np.frombuffer(b"".join(ranges("codes", 2 * dim)), np.float16).reshape(-1, dim)
    rows = np.frombuffer(b"".join(ranges("rows", 8)), np.int64)
    lists = np.frombuffer(b"".join(ranges("lists", 4)), np.int32)
    order = np.argsort(lists, kind="stable")  # blocks in order, rows in order within a list
    so = index.storage_options
    write_bytes_atomic(index.path(f"part-{part:05d}.codes"), codes[order].tobytes(), so)
    write_bytes_atomic(index.path(f"part-{part:05d}.rows"), rows[order].tobytes(), so)
    return np.bincount(lists - lo, minlength=hi - lo).astype(np.int64)


def build_index(store: RunStore, scale: Standardiser, client: Client,
                settings: IndexSettings | None = None) -> CodeIndex:
    """Build ``RUN/index/`` over all of codes.zarr on the workers of ``client``."""
    settings = settings or IndexSettings()
    so = store.storage_options
    codes_loc, index_loc = Location(store.codes, so), store.child("index")
    tmp = index_loc.child("tmp")
    remove(index_loc.path("index.json"), so)
    n, dim = open_array(store.codes, so).shape
    n_lists = settings.n_lists(n)
    centres = client.submit(fit_centres, codes_loc, scale, n_lists, settings, pure=False).result()
    n_parts = int(min(n_lists, max(1, math.ceil(n * dim * 2 / settings.part_bytes))))
    bounds = np.linspace(0, n_lists, n_parts + 1).round().astype(np.int64)
    centres_f = client.scatter(centres, broadcast=True)
    spans = chunk_spans(n, settings.block_rows)
    routed = [client.submit(route_block, codes_loc, scale, centres_f, bounds, tmp, b, a, z, pure=False)
              for b, (a, z) in enumerate(spans)]
    offsets = [f.result() for f in track(routed, total=len(routed), desc="index: lists", unit="block")]
    parts = [client.submit(write_part, index_loc, tmp, p, int(bounds[p]), int(bounds[p + 1]), dim, offsets, pure=False)
             for p in range(n_parts)]
    counts = {f.key: f.result() for f in track(completed(client, parts), total=n_parts, desc="index: parts", unit="part")}
    table = np.zeros((n_lists, 3), np.int64)
    for p, fut in enumerate(parts):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        c = counts[fut.key]
        table[lo:hi, 0] = p
        table[lo:hi, 1] = np.concatenate([[0], np.cumsum(c)[:-1]]) if len(c) else []
        table[lo:hi, 2] = c
    write_bytes_atomic(index_loc.path("centroids.npy"), _npy(centres), so)
    write_bytes_atomic(index_loc.path("lists.npy"), _npy(table), so)
    write_json(index_loc.path("index.json"), {"version": VERSION, "rows": int(n), "dim": int(dim), "lists": n_lists,
                                              "parts": n_parts, "nprobe": settings.nprobe}, so)
    remove(tmp.url, so)
    logger.info("index: %d codes in %d lists of about %d (%d parts)", n, n_lists, max(1, n // n_lists), n_parts)
    return CodeIndex(index_loc, centres, table, int(n), int(dim), settings.nprobe)


def extend_index(store: RunStore, scale: Standardiser, start: int, stop: int, name: str) -> CodeIndex | None:
    """Add codes.zarr rows [start, stop) (images ``assign`` added) to the run's index as the
    extension ``name``: routed to the existing lists and written beside them, so searches see them
    without a rebuild. Extensions reaching past ``start`` (left by an interrupted ``assign`` whose
    rows are written again) are dropped; rows between the index's end and ``start`` that no
    extension holds are added too. ``index.json`` is written last. Returns the extended index, or
    None when the run has no index."""
    loc = store.child("index")
    so = loc.storage_options
    index = CodeIndex.at(loc)
    if index is None:
        return None
    info = read_json(loc.path("index.json"), so)
    base = int(info.get("base_rows", info["rows"]))
    kept = [e for e in info.get("extras", []) if int(e["stop"]) <= start and e["name"] != name]
    first = max([base] + [int(e["stop"]) for e in kept])
    if stop > first:
        x = scale(open_array(store.codes, so)[first:stop])
        lists = nearest_centres(x, index.centres)[:, 0]
        order = np.argsort(lists, kind="stable")
        counts = np.bincount(lists, minlength=index.n_lists).astype(np.int64)
        table = np.stack([np.concatenate([[0], np.cumsum(counts)[:-1]]), counts], 1).astype(np.int64)
        write_bytes_atomic(loc.path(f"{name}.codes"), x[order].astype(np.float16).tobytes(), so)
        write_bytes_atomic(loc.path(f"{name}.rows"), np.arange(first, stop, dtype=np.int64)[order].tobytes(), so)
        write_bytes_atomic(loc.path(f"{name}.lists.npy"), _npy(table), so)
        kept.append({"name": name, "start": int(first), "stop": int(stop)})
    rows = max([base] + [int(e["stop"]) for e in kept])
    write_json(loc.path("index.json"), {**info, "base_rows": base, "rows": rows, "extras": kept}, so)
    for e in info.get("extras", []):  # dropped extensions' files, unless a kept one has the name
        if e["name"] not in {k["name"] for k in kept}:
            for suffix in ("codes", "rows", "lists.npy"):
                remove(loc.path(f"{e['name']}.{suffix}"), so)
    logger.info("index: rows %d to %d added to the code index (%d extensions)", first, stop, len(kept))
    return CodeIndex.at(loc)


# -- reading ---------------------------------------------------------------------------------------
class CodeIndex:
    """Reader of ``RUN/index/`` (see the module's docstring). Thread-safe for reads."""

    def __init__(self, location: Location, centres: np.ndarray, lists: np.ndarray, rows: int, dim: int,
                 nprobe: int, cache_lists: int = 64,
                 extras: list[tuple[str, np.ndarray]] | None = None) -> None:
        self.location, self.centres, self.lists = location, centres.astype(np.float32), lists
        self.rows, self.dim, self.nprobe = rows, dim, nprobe
        self.extras = extras or []  # (file stem, (L, 2) first row and count of each list) of rows added later
        self.sizes = lists[:, 2] + sum((t[:, 1] for _, t in self.extras), np.zeros(len(lists), np.int64))
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_lists = cache_lists

    @classmethod
    def open(cls, store: RunStore) -> CodeIndex | None:
        """The run's index, or None when it has none (a run made before indexes, or unfinished)."""
        return cls.at(store.child("index"))

    @classmethod
    def at(cls, loc: Location, cache_lists: int = 64) -> CodeIndex | None:
        """The index in folder ``loc``, or None when it is missing or unfinished."""
        so = loc.storage_options
        try:
            info = read_json(loc.path("index.json"), so)
        except FileNotFoundError:
            return None
        if int(info.get("version", 0)) != VERSION:
            return None
        fs, _ = open_fs(loc.url, so)
        centres = _load_npy(with_retries(fs.cat_file, open_fs(loc.path("centroids.npy"), so)[1]))
        lists = _load_npy(with_retries(fs.cat_file, open_fs(loc.path("lists.npy"), so)[1]))
        extras = [(e["name"], _load_npy(with_retries(fs.cat_file, open_fs(loc.path(f"{e['name']}.lists.npy"), so)[1])))
                  for e in info.get("extras", [])]
        return cls(loc, centres, lists, int(info["rows"]), int(info["dim"]), int(info["nprobe"]), cache_lists, extras)

    @property
    def n_lists(self) -> int:
        return len(self.centres)

    def read_lists(self, ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """List id -> (codes (n, D) float32, images.zarr rows (n,) int64, squared norms (n,)),
        reading the ones not cached (the cache holds ``cache_lists`` lists, least recently read out)."""
        out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        missing = []
        for i in (int(x) for x in ids):
            hit = self._cache.get(i)
            if hit is not None:
                out[i] = hit
                self._cache.move_to_end(i)
            elif self.sizes[i] > 0:
                missing.append(i)
            else:
                out[i] = (np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        if missing:
            so = self.location.storage_options
            fs, _ = open_fs(self.location.url, so)
            paths, starts, ends, owner = [], [], [], []
            for i in missing:
                part, first, count = (int(v) for v in self.lists[i])
                segments = [(f"part-{part:05d}", first, count)] + [
                    (stem, int(t[i, 0]), int(t[i, 1])) for stem, t in self.extras]
                for stem, first, count in segments:
                    if count == 0:
                        continue
                    for suffix, width in (("codes", 2 * self.dim), ("rows", 8)):
                        paths.append(open_fs(self.location.path(f"{stem}.{suffix}"), so)[1])
                        starts.append(first * width)
                        ends.append((first + count) * width)
                    owner.append(i)
            data = read_ranges(fs, paths, starts, ends)
            pieces: dict[int, list[tuple[bytes, bytes]]] = {}
            for j, i in enumerate(owner):
                pieces.setdefault(i, []).append((data[2 * j], data[2 * j + 1]))
            for i in missing:
                codes = np.frombuffer(b"".join(c for c, _ in pieces[i]), np.float16).reshape(-1, self.dim).astype(np.float32)
                got = (codes, np.frombuffer(b"".join(r for _, r in pieces[i]), np.int64), (codes**2).sum(1))
                out[i] = got
                self._cache[i] = got
                while len(self._cache) > self._cache_lists:
                    self._cache.popitem(last=False)
        return out

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed codes of each standardised query (Q, D).

        ``exclude`` (Q,) int64: an images.zarr row left out of each query's answer (itself), or -1.

        Returns distances (Q, k) float32 and images.zarr rows (Q, k) int64, nearest first; a
        query with fewer than ``k`` candidates is padded with inf and -1.
        """
        q = np.atleast_2d(np.asarray(queries, np.float32))
        probes = nearest_centres(q, self.centres, nprobe or self.nprobe)
        got = self.read_lists(np.unique(probes))
        dist = np.full((len(q), k), np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for j in range(len(q)):
            lists = [got[int(i)] for i in probes[j]]
            idx = np.concatenate([x[1] for x in lists])
            d2 = np.concatenate([x[2] - 2.0 * (x[0] @ q[j]) for x in lists]) + float(q[j] @ q[j])
            if exclude is not None and exclude[j] >= 0:
                d2[idx == exclude[j]] = np.inf
            m = min(k, len(idx))
            best = np.argpartition(d2, m - 1)[:m] if m < len(idx) else np.arange(len(idx))
            best = best[np.lexsort((idx[best], d2[best]))]
            best = best[np.isfinite(d2[best])]
            dist[j, : len(best)] = np.sqrt(np.maximum(d2[best], 0.0))
            rows[j, : len(best)] = idx[best]
        return dist, rows
