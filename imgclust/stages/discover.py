"""Stage 1: list the image files of a source, hash their content, split off exact duplicates."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np
import pandas as pd
from distributed import Client

from imgclust.dask_cluster import completed
from imgclust.io.imagefile import probe_header
from imgclust.io.listing import Listing, list_files, peek_images, source_path
from imgclust.io.storage import StorageError, normalise_url, read_file_groups, unreadable_reason, with_retries, write_parquet
from imgclust.progress import track
from imgclust.runstore import Location, RunStore
from imgclust.state.resume import ShardLedger, fingerprint

logger = logging.getLogger("imgclust")
HASH_BATCH = 256
T = TypeVar("T")
UNIQUE, UNREADABLE = "unique.parquet", "unreadable.parquet"  # under _work/: what ingest decodes


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


def hash_batch(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], ledger: ShardLedger | None = None,
               name: str | None = None) -> list[HashRow]:
    """(path, sha256, error, is_gray, side) per file; runs on a Dask worker, reads each file once, a
    bounded group at a time. With a ledger, the worker records the batch (when every file could be
    read: unreadable ones are asked again next time) under ``name``."""
    full = [f"{root.rstrip('/')}/{source_path(p)}" for p in paths]
    rel_of = dict(zip(full, paths))
    out: list[HashRow] = []
    for group in read_file_groups(fs, full):
        for path, data in group:
            if isinstance(data, BaseException) or data is None:
                out.append((rel_of[path], None, unreadable_reason(data), None, None))
            else:
                out.append((rel_of[path], hashlib.sha256(data).hexdigest(), None, *probe_header(data)))
    if ledger is not None and name is not None and all(r[1] is not None for r in out):
        ledger.mark(name, out)
    return out


def hash_files(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], client: Client,
                ledger: ShardLedger | None = None, stamps: list[str] | None = None) -> pd.DataFrame:
    """(path, sha256, reason, gray, side) of every path, hashed in parallel batches on the cluster.

    With a ledger, each batch's result is recorded under its paths and stamps (size, mtime): a
    rerun after a crash hashes only batches it has not seen, without reading those files again.
    """
    spans = [(i, min(i + HASH_BATCH, len(paths))) for i in range(0, len(paths), HASH_BATCH)]
    done = ledger.done() if ledger is not None else {}
    rows: list[tuple[Any, ...]] = []
    futures = {}
    for a, b in spans:
        name = fingerprint(paths[a:b], (stamps or [])[a:b])[:32]
        if name in done:
            rows.extend((*r, None)[:5] for r in done[name])  # a record without a side has none
        else:
            futures[client.submit(hash_batch, fs, root, paths[a:b], ledger, name, pure=False)] = name
    if done:
        logger.info("discover: %d of %d batches hashed by an earlier attempt", len(spans) - len(futures), len(spans))
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


def discover(source: Location, store: RunStore, client: Client) -> Discovery:
    """List, hash in parallel on the cluster, and write ``duplicates.parquet``; the unique and the
    unreadable files go to ``_work/`` for ingest."""
    listing = list_source(source)
    paths, stamps = listing.paths, [s for _, s in listing.files]
    fs, root = source.fs()
    ledger = ShardLedger(store, "discover", fingerprint("discover", normalise_url(source.url)))
    ledger.clear_others()
    table = hash_files(fs, root, paths, client, ledger, stamps)
    table["stamp"] = table["path"].map(dict(listing.files))  # size and modification: assign skips unchanged files
    unreadable = pd.concat([table.loc[table["sha256"].isna(), ["path", "reason", "stamp"]],
                            pd.DataFrame(listing.refused, columns=["path", "reason"])], ignore_index=True)
    unreadable = unreadable.sort_values("path", kind="stable").reset_index(drop=True)
    unique, dups = split_duplicates(table.loc[table["sha256"].notna(), ["path", "sha256", "gray", "side", "stamp"]])
    probes = unique["gray"].dropna()
    gray = bool(len(probes)) and bool(probes.all())
    sides = unique["side"].dropna().to_numpy(float)
    side_p90 = int(np.ceil(np.percentile(sides, 90))) if len(sides) else None
    so = store.storage_options
    store.write_table("duplicates", dups)
    write_parquet(store.work(UNIQUE), unique[["path", "sha256", "stamp"]], so)
    write_parquet(store.work(UNREADABLE), unreadable, so)
    logger.info(
        "discover: %d image files, %d unique, %d duplicates, %d unreadable",
        len(listing), len(unique), len(dups), len(unreadable),
    )
    return Discovery(len(listing), len(unique), len(dups), len(unreadable), gray, side_p90)
