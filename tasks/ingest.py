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
from imgclust.zarr_store import chunk_spans, create_array, open_array

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


def ingest(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
           size: tuple[int, int], gray: bool, fit: str, shard_size: int, client: Client) -> Ingest:
    """Write ``images.zarr``, ``manifest.parquet`` and ``rejected.parquet``.

    Shards are decoded into a staging array first (rejected files leave holes), then compacted so
    that ``manifest.index`` is a dense 0..N-1 index into ``images.zarr``.
    """
    unique = read_parquet(unique_url, storage_options)
    n = len(unique)
    channels = 1 if gray else 3
    fs, root = open_fs(source, storage_options)
    staging_url = join(output, "_work", "staging.zarr")
    create_array(staging_url, (n, channels, *size), shard_size, "uint8", storage_options)
    paths = unique["path"].tolist()
    futures = {
        client.submit(ingest_shard, fs, root, paths[a:b], staging_url, storage_options, a, size, gray, fit,
                      pure=False): a
        for a, b in chunk_spans(n, shard_size)
    }
    meta: dict[int, list[tuple[bool, int, int, str, str]]] = {}
    for fut in track(completed(client, futures), total=len(futures), desc="ingest", unit="shard"):
        meta[futures[fut]] = fut.result()
    rows = [m for a in sorted(meta) for m in meta[a]]
    info = pd.DataFrame(rows, columns=["ok", "width", "height", "format", "reason"])
    ok = info["ok"].to_numpy(bool)
    accepted_rows = np.flatnonzero(ok)
    n_acc = len(accepted_rows)

    images_url = join(output, "images.zarr")
    attrs = {"color": "gray" if gray else "rgb", "height": size[0], "width": size[1], "fit": fit}
    create_array(images_url, (n_acc, channels, *size), shard_size, "uint8", storage_options, attrs)
    if n_acc:
        futs = [client.submit(compact_chunk, staging_url, images_url, storage_options, accepted_rows[a:b], a,
                              pure=False) for a, b in chunk_spans(n_acc, shard_size)]
        client.gather(futs)
    remove(staging_url, storage_options)

    manifest = pd.DataFrame({
        "index": np.arange(n_acc, dtype=np.int64),
        "path": unique["path"].to_numpy()[ok],
        "sha256": unique["sha256"].to_numpy()[ok],
        "width": info.loc[ok, "width"].to_numpy(np.int64),
        "height": info.loc[ok, "height"].to_numpy(np.int64),
        "format": info.loc[ok, "format"].to_numpy(),
    })
    decode_rejects = pd.DataFrame({"path": unique["path"].to_numpy()[~ok], "reason": info.loc[~ok, "reason"].to_numpy()})
    rejected = pd.concat([read_parquet(unreadable_url, storage_options), decode_rejects], ignore_index=True)
    rejected = rejected.sort_values("path", kind="stable").reset_index(drop=True)
    write_parquet(join(output, "manifest.parquet"), manifest, storage_options)
    write_parquet(join(output, "rejected.parquet"), rejected, storage_options)
    logger.info("ingest: %d images accepted, %d rejected", n_acc, len(rejected))
    for path, reason in rejected.head(20).itertuples(index=False):
        logger.warning("rejected %s: %s", path, reason)
    return Ingest(n_acc, len(rejected), images_url, channels)


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(source: str, output: str, storage_options: dict[str, Any], unique_url: str, unreadable_url: str,
                size: tuple[int, int], gray: bool, fit: str, shard_size: int, address: str) -> Ingest:
    with Client(address, set_as_default=False) as client:
        return ingest(source, output, storage_options, unique_url, unreadable_url, size, gray, fit, shard_size, client)
