"""Stage 1: list the image files of a source, hash their content, split off exact duplicates."""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np
import pandas as pd
from distributed import Client

from imgclust.dask_cluster import completed
from imgclust.io.imagefile import probe_header
from imgclust.io.listing import (
    GROUP_ROWS,
    RUN_ROWS,
    Listing,
    ListingGroup,
    list_files,
    peek_images,
    read_group,
    source_path,
    walk_files,
    write_listing,
)
from imgclust.io.storage import (
    StorageError,
    join,
    normalise_url,
    open_fs,
    read_file_groups,
    read_json,
    read_parquet_filtered,
    remove,
    unreadable_reason,
    with_retries,
    write_json,
    write_parquet,
)
from imgclust.io.tables import write_part
from imgclust.progress import track
from imgclust.runstore import Location, RunStore
from imgclust.state.resume import ShardLedger, fingerprint

logger = logging.getLogger("imgclust")
HASH_BATCH = 256
T = TypeVar("T")
UNIQUE, UNREADABLE = "unique.parquet", "unreadable.parquet"  # under _work/: folders of parts that ingest decodes


@dataclass(frozen=True)
class Discovery:
    """What discovery found; tables live in the output store, only counts travel."""

    n_found: int
    n_unique: int
    n_duplicates: int
    n_unreadable: int
    gray: bool
    side_p90: int | None = None  # 90th percentile of the unique images' largest side (headers); None: none said


def list_images(source: Location) -> list[str]:
    """Image paths under ``source``, relative to it with ``/`` separators, sorted."""
    return list_source(source).paths


def peek_source(source: Location, limit: int) -> list[str]:
    """Up to ``limit`` image files under ``source``, with ``list_source``'s errors for a source that
    is missing, not a folder or unreachable."""
    return _on_source(source, lambda fs, root: peek_images(fs, root, limit))


def list_source(source: Location) -> Listing:
    """Every image file under ``source`` with its stamp (size, modification), and the entries refused
    unread (FIFOs, devices, files too large, folders that cannot be listed) with their reason."""
    return _on_source(source, list_files)


def _on_source(source: Location, look: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
    """``look(fs, root)`` on the source folder; a missing source, one that is not a folder, and every
    failure to reach or list it become a ``StorageError`` naming the source."""
    try:
        fs, root = source.fs()
        try:
            info = with_retries(fs.info, root)  # unlike exists(), this lets network and permission errors through
        except FileNotFoundError:
            raise StorageError(f"source not found: {source.url}") from None
        if info.get("type") != "directory":
            raise StorageError(f"source is not a folder or prefix: {source.url}")
        return look(fs, root)
    except StorageError:
        raise
    except PermissionError as exc:
        raise StorageError(f"no permission to list source {source.url}: {exc}") from exc
    except Exception as exc:  # endpoint unreachable, bad credentials, ...: the library's words help most
        raise StorageError(f"cannot list source {source.url}: {type(exc).__name__}: {exc}") from exc


# path, sha256, reason it could not be read, is gray, largest side (from the header)
HashRow = tuple[str, str | None, str | None, bool | None, int | None]
COLUMNS = ["path", "sha256", "reason", "gray", "side"]


def hash_batch(fs: fsspec.AbstractFileSystem, root: str, paths: list[str]) -> list[HashRow]:
    """(path, sha256, error, is_gray, side) per file; runs on a Dask worker, reads each file once, a
    bounded group at a time."""
    full = [f"{root.rstrip('/')}/{source_path(p)}" for p in paths]
    rel_of = dict(zip(full, paths))
    out: list[HashRow] = []
    for group in read_file_groups(fs, full):
        for path, data in group:
            if isinstance(data, BaseException) or data is None:
                out.append((rel_of[path], None, unreadable_reason(data), None, None))
            else:
                out.append((rel_of[path], hashlib.sha256(data).hexdigest(), None, *probe_header(data)))
    return out


def hash_files(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], client: Client) -> pd.DataFrame:
    """(path, sha256, reason, gray, side) of every path, hashed in parallel batches on the cluster
    (for ``assign``'s new files: a run's discover streams its listing instead)."""
    futures = [client.submit(hash_batch, fs, root, paths[a:a + HASH_BATCH], pure=False)
               for a in range(0, len(paths), HASH_BATCH)]
    rows: list[tuple[Any, ...]] = []
    for fut in track(completed(client, futures), total=len(futures), desc="discover", unit="batch"):
        rows.extend(fut.result())
    return pd.DataFrame(rows, columns=COLUMNS).sort_values("path").reset_index(drop=True)


def split_duplicates(hashed: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Unique files and duplicates: the first path in sorted order of each content is the original."""
    hashed = hashed.sort_values("path", kind="stable").reset_index(drop=True)
    first = hashed.groupby("sha256", sort=False)["path"].transform("first")
    is_dup = hashed["path"] != first
    keep = [c for c in ("path", "sha256", "stamp") if c in hashed.columns]
    dups = hashed.loc[is_dup, keep].assign(duplicate_of=first[is_dup]).reset_index(drop=True)
    unique = hashed.loc[~is_dup].reset_index(drop=True)
    return unique, dups


LISTING_RUN_ROWS, HASH_GROUP_ROWS = RUN_ROWS, GROUP_ROWS  # listing entries sorted at a time; files per hash task
DUPLICATE_BUCKET_ROWS = 500_000  # readable files a duplicate-finding task holds at most (about 150 MB)
H16_ROW_GROUP = 128  # rows of a hashed part per row group: what lets a bucket read only its hashes


def hashed_root(store: RunStore) -> str:
    """Where discover's hashed parts are kept until the run finishes (its resume records)."""
    return store.resume("discover", "hashed")


def buckets_root(store: RunStore) -> str:
    """Where the duplicate buckets record the (group, pos) of each duplicate they found."""
    return store.resume("discover", "duplicates")


def hashed_name(store: RunStore, number: int, group: ListingGroup) -> str:
    return join(hashed_root(store), f"{number:06d}-{group.key}.parquet")


def hash_group(source: Location, store: RunStore, group: ListingGroup, number: int, fence: ShardLedger) -> int:
    """Hash one row group of the listing (on a worker) and write its rows as a hashed part, sorted by
    the first 16 bits of their hash so that a duplicate bucket reads only its rows; how many rows.
    Refused entries go through unread, with their reason."""
    so = store.storage_options
    entries = read_group(group, so).to_pandas()
    fs, root = source.fs()
    refused = entries["reason"].notna().to_numpy()
    rows = dict(zip(entries["path"][~refused], hash_batch(fs, root, entries["path"][~refused].tolist())))
    table = pd.DataFrame([(p, *rows[p][1:]) if p in rows else (p, None, r, None, None)
                          for p, r in zip(entries["path"], entries["reason"])], columns=COLUMNS)
    table["stamp"] = entries["stamp"].to_numpy()
    table["group"] = np.int32(number)
    table["pos"] = np.arange(len(table), dtype=np.int32)
    table["h16"] = np.array([int(h[:4], 16) if isinstance(h, str) else -1 for h in table["sha256"]], np.int32)
    table["side"] = table["side"].astype("float64")
    table = table.sort_values(["h16", "pos"], kind="stable")
    fence.check_fence()
    write_parquet(hashed_name(store, number, group), table, so, H16_ROW_GROUP)
    return len(table)


def find_bucket_duplicates(store: RunStore, hashed: list[str], bucket: int, lo: int, hi: int,
                           fence: ShardLedger) -> int:
    """Duplicates among the readable files whose hash starts in ``[lo, hi)`` (16 bits), on a worker:
    a duplicates table part, and their (group, pos) for ``finish_group``; how many."""
    so = store.storage_options
    wanted = ["path", "sha256", "stamp", "group", "pos"]
    frames = [read_parquet_filtered(url, so, wanted, [("h16", ">=", lo), ("h16", "<", hi)]) for url in hashed]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=wanted)
    _, dups = split_duplicates(rows)
    positions = rows.loc[rows["path"].isin(set(dups["path"])), ["group", "pos"]].sort_values(["group", "pos"])
    fence.check_fence()
    write_parquet(join(buckets_root(store), f"bucket-{bucket:05d}.parquet"), positions.astype("int32"), so, 4096)
    write_part(store.table("duplicates"), dups[["path", "sha256", "stamp", "duplicate_of"]], 0, bucket, so)
    return len(dups)


PARTS_INDEX = "_parts.json"  # in the unique folder: [part name, rows] of every part, in path order


def unique_part(number: int) -> str:
    return f"part-{number:06d}.parquet"


def unique_parts(store: RunStore) -> list[tuple[str, int]]:
    """(URL, rows) of every part of discover's unique files, in path order."""
    folder = store.work(UNIQUE)
    return [(join(folder, name), int(rows)) for name, rows in read_json(join(folder, PARTS_INDEX), store.storage_options)]


@dataclass(frozen=True)
class GroupCounts:
    """What one finished listing group contributes: counts and the largest sides' distribution."""

    unique: int
    unreadable: int
    probed: int  # unique files whose header said gray or not
    gray: int
    sides: dict[int, int]  # largest side (from the header) -> unique files


def finish_group(store: RunStore, hashed: str, number: int, buckets: list[str], fence: ShardLedger) -> GroupCounts:
    """One listing group's unique files (path order) and unreadable ones, as parts under ``_work/``
    for ingest, with the duplicates found by the buckets taken out; on a worker."""
    so = store.storage_options
    table = read_parquet_filtered(hashed, so).sort_values("pos").reset_index(drop=True)
    dup_pos = [read_parquet_filtered(b, so, ["pos"], [("group", "==", number)])["pos"] for b in buckets]
    is_dup = table["pos"].isin(pd.concat(dup_pos) if dup_pos else [])
    readable = table["sha256"].notna()
    unique = table.loc[readable & ~is_dup]
    unreadable = table.loc[~readable, ["path", "reason", "stamp"]]
    fence.check_fence()
    for name, rows in ((UNIQUE, unique[["path", "sha256", "stamp"]]), (UNREADABLE, unreadable)):
        if len(rows):
            write_parquet(join(store.work(name), unique_part(number)), rows.reset_index(drop=True), so)
    probes = unique["gray"].dropna()
    sides = unique["side"].dropna().astype(np.int64).value_counts()
    return GroupCounts(len(unique), len(unreadable), len(probes), int(probes.astype(bool).sum()),
                       {int(k): int(v) for k, v in sides.items()})


def percentile_of_counts(counts: dict[int, int], q: float) -> float | None:
    """``np.percentile(values, q)`` (linear interpolation) of the values that ``counts`` tallies."""
    if not counts:
        return None
    values = np.array(sorted(counts), dtype=float)
    cum = np.cumsum([counts[int(v)] for v in values])
    at = q / 100 * (cum[-1] - 1)
    lo, hi = int(np.floor(at)), int(np.ceil(at))
    v_lo, v_hi = values[np.searchsorted(cum, lo + 1)], values[np.searchsorted(cum, hi + 1)]
    return float(v_lo + (at - lo) * (v_hi - v_lo))


def discover(source: Location, store: RunStore, client: Client) -> Discovery:
    """List (streamed into sorted parts), hash in parallel on the cluster, find duplicates bucket by
    bucket of hash, and write ``duplicates.parquet``; the unique and the unreadable files go to
    ``_work/`` as parts for ingest. The flow process holds counts and the names of parts, never a
    row per file."""
    so = store.storage_options
    listing = _on_source(source, lambda fs, root: write_listing(
        walk_files(fs, root), store.resume("discover", "listing"), so, LISTING_RUN_ROWS, HASH_GROUP_ROWS))
    fence = ShardLedger(store, "discover", fingerprint("discover", normalise_url(source.url)))
    for url in (store.work(UNIQUE), store.work(UNREADABLE), store.table("duplicates"), buckets_root(store)):
        remove(url, so)
    wanted = {hashed_name(store, i, g): (i, g) for i, g in enumerate(listing.groups)}
    fs, root = open_fs(hashed_root(store), so)
    try:
        present = {join(hashed_root(store), posixpath.basename(n)) for n in with_retries(fs.ls, root, detail=False)}
    except FileNotFoundError:
        present = set()
    for stale in present - set(wanted):
        with_retries(fs.rm_file, open_fs(stale, so)[1])
    todo = [url for url in wanted if url not in present]
    if len(todo) < len(wanted):
        logger.info("discover: %d of %d batches hashed by an earlier attempt", len(wanted) - len(todo), len(wanted))
    futures = [client.submit(hash_group, source, store, wanted[url][1], wanted[url][0], fence, pure=False)
               for url in todo]
    for fut in track(completed(client, futures), total=len(futures), desc="discover", unit="batch"):
        fut.result()
    hashed = list(wanted)
    n_buckets = max(1, -(-listing.n_files // DUPLICATE_BUCKET_ROWS))
    edges = np.linspace(0, 1 << 16, n_buckets + 1).astype(int)
    n_dups = sum(client.gather([client.submit(find_bucket_duplicates, store, hashed, b, int(edges[b]),
                                              int(edges[b + 1]), fence, pure=False) for b in range(n_buckets)]))
    buckets = [join(buckets_root(store), f"bucket-{b:05d}.parquet") for b in range(n_buckets)]
    finished = {client.submit(finish_group, store, url, i, buckets, fence, pure=False): i for i, url in enumerate(hashed)}
    counts = GroupCounts(0, 0, 0, 0, {})
    unique_rows = np.zeros(len(hashed), np.int64)
    for fut in track(completed(client, finished), total=len(finished), desc="discover: unique files", unit="batch"):
        c = fut.result()
        unique_rows[finished[fut]] = c.unique
        sides = counts.sides
        for side, n in c.sides.items():
            sides[side] = sides.get(side, 0) + n
        counts = GroupCounts(counts.unique + c.unique, counts.unreadable + c.unreadable, counts.probed + c.probed,
                             counts.gray + c.gray, sides)
    write_json(join(store.work(UNIQUE), PARTS_INDEX),
               [[unique_part(i), int(r)] for i, r in enumerate(unique_rows) if r], so)  # what ingest reads, in order
    p90 = percentile_of_counts(counts.sides, 90)
    side_p90 = int(np.ceil(p90)) if p90 is not None else None
    gray = counts.probed > 0 and counts.gray == counts.probed
    logger.info("discover: %d image files, %d unique, %d duplicates, %d unreadable",
                len(listing), counts.unique, n_dups, counts.unreadable)
    return Discovery(len(listing), counts.unique, n_dups, counts.unreadable, gray, side_p90)
