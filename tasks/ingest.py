"""Stage 2: decode every unique file in parallel into a chunked uint8 Zarr array."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from distributed import Client
from imgclust.dask_cluster import completed
from prefect import task

from imgclust.imagefile import ImageRejected, decode_image
from imgclust.progress import track
from imgclust.storage import join, open_fs, read_parquet, remove, write_parquet
from imgclust.zarr_store import aligned_spans, chunk_spans, create_array, open_array

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class Ingest:
    n_accepted: int
    n_rejected: int
    images_url: str
    channels: int


def ingest_shard(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], staging_url: str,
                 storage_options: dict[str, Any] | None, start: int, size: tuple[int, int], gray: bool,
                 fit: str) -> list[tuple[bool, int, int, str, str]]:
    """Decode one shard and write it as one block; (ok, width, height, format, reason) per file."""
    channels = 1 if gray else 3
    block = np.zeros((len(paths), channels, *size), dtype=np.uint8)
    full = [f"{root.rstrip('/')}/{p}" for p in paths]
    blobs = fs.cat(full, on_error="return") if full else {}
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
                        size: tuple[int, int], gray: bool, fit: str, shard_size: int, client: Client) -> pd.DataFrame:
    """Decode ``paths`` in parallel, one task per shard; (ok, width, height, format, reason) per path."""
    fs, root = open_fs(source, storage_options)
    n = len(paths)
    create_array(staging_url, (n, 1 if gray else 3, *size), shard_size, "uint8", storage_options)
    futures = {
        client.submit(ingest_shard, fs, root, paths[a:b], staging_url, storage_options, a, size, gray, fit,
                      pure=False): a
        for a, b in chunk_spans(n, shard_size)
    }
    meta: dict[int, list[tuple[bool, int, int, str, str]]] = {}
    for fut in track(completed(client, futures), total=len(futures), desc="ingest", unit="shard"):
        meta[futures[fut]] = fut.result()
    rows = [m for a in sorted(meta) for m in meta[a]]
    return pd.DataFrame(rows, columns=["ok", "width", "height", "format", "reason"])


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


def ingest(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
           size: tuple[int, int], gray: bool, fit: str, shard_size: int, client: Client) -> Ingest:
    """Write ``images.zarr``, ``manifest.parquet`` and ``rejected.parquet``.

    Shards are decoded into a staging array first (rejected files leave holes), then compacted so
    that ``manifest.index`` is a dense 0..N-1 index into ``images.zarr``.
    """
    unique = read_parquet(unique_url, storage_options)
    channels = 1 if gray else 3
    staging_url = join(output, "_work", "staging.zarr")
    info = decode_into_staging(source, storage_options, unique["path"].tolist(), staging_url, size, gray, fit,
                               shard_size, client)
    accepted_rows = np.flatnonzero(info["ok"].to_numpy(bool))
    images_url = join(output, "images.zarr")
    attrs = {"color": "gray" if gray else "rgb", "height": size[0], "width": size[1], "fit": fit}
    create_array(images_url, (len(accepted_rows), channels, *size), shard_size, "uint8", storage_options, attrs)
    compact_into(staging_url, images_url, storage_options, accepted_rows, 0, client)
    remove(staging_url, storage_options)
    manifest, decode_rejects = manifest_rows(unique, info, 0)
    unreadable = read_parquet(unreadable_url, storage_options).assign(sha256=None)
    rejected = pd.concat([unreadable, decode_rejects], ignore_index=True)[["path", "reason", "sha256"]]
    rejected = rejected.sort_values("path", kind="stable").reset_index(drop=True)
    write_parquet(join(output, "manifest.parquet"), manifest, storage_options)
    write_parquet(join(output, "rejected.parquet"), rejected, storage_options)
    logger.info("ingest: %d images accepted, %d rejected", len(manifest), len(rejected))
    for path, reason in rejected[["path", "reason"]].head(20).itertuples(index=False):
        logger.warning("rejected %s: %s", path, reason)
    return Ingest(len(manifest), len(rejected), images_url, channels)


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
                size: tuple[int, int], gray: bool, fit: str, shard_size: int, address: str) -> Ingest:
    with Client(address, set_as_default=False) as client:
        return ingest(source, output, storage_options, unique_url, unreadable_url, size, gray, fit, shard_size, client)
