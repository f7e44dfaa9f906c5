"""Stage 2: decode every unique file in parallel into a chunked uint8 Zarr array."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from distributed import Client
from prefect import task

from imgclust.dask_cluster import completed
from imgclust.imagefile import ImageRejected, decode_image
from imgclust.progress import track
from imgclust.resume import ShardLedger, fingerprint
from imgclust.storage import (
    exists,
    join,
    move_tree,
    open_fs,
    read_files,
    read_parquet,
    remove,
    write_parquet,
)
from imgclust.zarr_store import aligned_spans, chunk_spans, create_array, open_array

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class Ingest:
    n_accepted: int
    n_rejected: int
    images_url: str
    channels: int
    key: str  # content + settings of this ingest: later stages key their resume records on it
    shards_resumed: int = 0


def ingest_shard(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], staging_url: str,
                 storage_options: dict[str, Any] | None, start: int, size: tuple[int, int], gray: bool,
                 fit: str, ledger: ShardLedger | None = None) -> list[tuple[bool, int, int, str, str]]:
    """Decode one shard and write it as one block; (ok, width, height, format, reason) per file.

    The ledger record is written after the block, so a recorded shard is always a written one.
    """
    channels = 1 if gray else 3
    block = np.zeros((len(paths), channels, *size), dtype=np.uint8)
    full = [f"{root.rstrip('/')}/{p}" for p in paths]
    blobs = read_files(fs, full)
    meta: list[tuple[bool, int, int, str, str]] = []
    for i, path in enumerate(full):
        data = blobs.get(path)
        if isinstance(data, BaseException) or data is None:
            meta.append((False, 0, 0, "", f"unreadable: {type(data).__name__}: {data}"))
            continue
        try:
            img = decode_image(data, size, gray, fit)
        except ImageRejected as exc:
            meta.append((False, 0, 0, "", str(exc)))
            continue
        block[i] = img.pixels
        meta.append((True, img.width, img.height, img.format, ""))
    open_array(staging_url, storage_options, mode="r+")[start:start + len(paths)] = block
    if ledger is not None:
        ledger.mark(start, meta)
    return meta


def compact_chunk(staging_url: str, images_url: str, storage_options: dict[str, Any] | None,
                  source_rows: np.ndarray, start: int) -> int:
    """Copy accepted rows of the staging array into one chunk of the final array."""
    staging = open_array(staging_url, storage_options)
    lo, hi = int(source_rows.min()), int(source_rows.max()) + 1
    block = staging[lo:hi][source_rows - lo]
    open_array(images_url, storage_options, mode="r+")[start:start + len(source_rows)] = block
    return len(source_rows)


def decode_into_staging(source: str, storage_options: dict[str, Any], paths: list[str], staging_url: str,
                        size: tuple[int, int], gray: bool, fit: str, shard_size: int, client: Client,
                        ledger: ShardLedger | None = None) -> tuple[pd.DataFrame, int]:
    """Decode ``paths`` in parallel, one task per shard; (ok, width, height, format, reason) per path.

    Shards the ledger records as finished (by a killed earlier attempt) are not decoded again;
    returns the table and how many shards were reused.
    """
    fs, root = open_fs(source, storage_options)
    n = len(paths)
    meta: dict[int, list[tuple[bool, int, int, str, str]]] = {}
    if ledger is not None:
        meta = {a: [tuple(m) for m in rows] for a, rows in ledger.done_rows().items()}
    if not meta:
        create_array(staging_url, (n, 1 if gray else 3, *size), shard_size, "uint8", storage_options)
    resumed = len(meta)
    if resumed:
        logger.info("ingest: resuming, %d of %d shards already decoded", resumed, -(-n // shard_size))
    futures = {
        client.submit(ingest_shard, fs, root, paths[a:b], staging_url, storage_options, a, size, gray, fit, ledger,
                      pure=False): a
        for a, b in chunk_spans(n, shard_size) if a not in meta
    }
    for fut in track(completed(client, futures), total=len(futures), desc="ingest", unit="shard"):
        meta[futures[fut]] = fut.result()
    rows = [m for a in sorted(meta) for m in meta[a]]
    return pd.DataFrame(rows, columns=["ok", "width", "height", "format", "reason"]), resumed


def compact_into(staging_url: str, images_url: str, storage_options: dict[str, Any], accepted_rows: np.ndarray,
                 start: int, client: Client) -> None:
    """Copy accepted staging rows to ``images[start:]``, one task per destination chunk."""
    step = open_array(images_url, storage_options).chunks[0]
    futs = [client.submit(compact_chunk, staging_url, images_url, storage_options, accepted_rows[a - start:b - start],
                          a, pure=False) for a, b in aligned_spans(start, start + len(accepted_rows), step)]
    client.gather(futs)


def manifest_rows(unique: pd.DataFrame, info: pd.DataFrame, start: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest rows (indices from ``start``) and rejected rows of one decoded batch."""
    ok = info["ok"].to_numpy(bool)
    manifest = pd.DataFrame({
        "index": np.arange(start, start + int(ok.sum()), dtype=np.int64),
        "path": unique["path"].to_numpy()[ok],
        "sha256": unique["sha256"].to_numpy()[ok],
        "width": info.loc[ok, "width"].to_numpy(np.int64),
        "height": info.loc[ok, "height"].to_numpy(np.int64),
        "format": info.loc[ok, "format"].to_numpy(),
    })
    rejected = pd.DataFrame({"path": unique["path"].to_numpy()[~ok], "reason": info.loc[~ok, "reason"].to_numpy(),
                             "sha256": unique["sha256"].to_numpy()[~ok]})
    return manifest, rejected


def ingest_key(unique: pd.DataFrame, size: tuple[int, int], gray: bool, fit: str, shard_size: int) -> str:
    """Identity of an ingest: every (path, content) pair plus the settings that shape the pixels."""
    listing = hashlib.sha256("\n".join(unique["path"] + "\t" + unique["sha256"]).encode()).hexdigest()
    return fingerprint("ingest", listing, list(size), gray, fit, shard_size)


def finished_ingest(output: str, storage_options: dict[str, Any], key: str) -> Ingest | None:
    """The recorded result when this exact ingest already completed (its key is stamped last)."""
    images_url = join(output, "images.zarr")
    try:
        images = open_array(images_url, storage_options)
    except Exception:  # absent or half-created: not finished
        return None
    if images.attrs.get("ingest_key") != key or not exists(join(output, "rejected.parquet"), storage_options):
        return None
    n_rejected = len(read_parquet(join(output, "rejected.parquet"), storage_options))
    return Ingest(images.shape[0], n_rejected, images_url, images.shape[1], key)


def ingest(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
           size: tuple[int, int], gray: bool, fit: str, shard_size: int, client: Client) -> Ingest:
    """Write ``images.zarr``, ``manifest.parquet`` and ``rejected.parquet``.

    Shards are decoded into a staging array first. When files were rejected (they leave holes), it
    is compacted so that ``manifest.index`` is a dense 0..N-1 index into ``images.zarr``; when none
    were, the staging array is moved into place, which writes every pixel once. Finished shards are
    recorded, so a killed run decodes only the rest; a finished ingest is not redone at all.
    """
    unique = read_parquet(unique_url, storage_options)
    key = ingest_key(unique, size, gray, fit, shard_size)
    done = finished_ingest(output, storage_options, key)
    if done is not None:
        logger.info("ingest: already done for these files and settings; reusing images.zarr")
        return done
    channels = 1 if gray else 3
    staging_url = join(output, "_work", "staging.zarr")
    ledger = ShardLedger(output, storage_options, "ingest", key)
    ledger.clear_others()
    info, resumed = decode_into_staging(source, storage_options, unique["path"].tolist(), staging_url, size, gray,
                                        fit, shard_size, client, ledger)
    accepted_rows = np.flatnonzero(info["ok"].to_numpy(bool))
    images_url = join(output, "images.zarr")
    attrs = {"color": "gray" if gray else "rgb", "height": size[0], "width": size[1], "fit": fit}
    if len(accepted_rows) == len(info):  # nothing rejected: the staging array is already the final one
        ledger.clear()  # first: a crash while moving must not leave shards recorded in a moved array
        move_tree(staging_url, images_url, storage_options)
        open_array(images_url, storage_options, mode="r+").update_attributes(attrs)
    else:
        create_array(images_url, (len(accepted_rows), channels, *size), shard_size, "uint8", storage_options, attrs)
        compact_into(staging_url, images_url, storage_options, accepted_rows, 0, client)
    manifest, decode_rejects = manifest_rows(unique, info, 0)
    unreadable = read_parquet(unreadable_url, storage_options).assign(sha256=None)
    rejected = pd.concat([unreadable, decode_rejects], ignore_index=True)[["path", "reason", "sha256"]]
    rejected = rejected.sort_values("path", kind="stable").reset_index(drop=True)
    write_parquet(join(output, "manifest.parquet"), manifest, storage_options)
    write_parquet(join(output, "rejected.parquet"), rejected, storage_options)
    open_array(images_url, storage_options, mode="r+").attrs["ingest_key"] = key  # last: marks it finished
    remove(staging_url, storage_options)
    ledger.clear()
    logger.info("ingest: %d images accepted, %d rejected", len(manifest), len(rejected))
    for path, reason in rejected[["path", "reason"]].head(20).itertuples(index=False):
        logger.warning("rejected %s: %s", path, reason)
    return Ingest(len(manifest), len(rejected), images_url, channels, key, resumed)


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
                size: tuple[int, int], gray: bool, fit: str, shard_size: int, address: str) -> Ingest:
    with Client(address, set_as_default=False) as client:
        return ingest(source, output, storage_options, unique_url, unreadable_url, size, gray, fit, shard_size, client)
