"""Zarr 3 arrays of images and codes, local or over fsspec, with one place for codecs and chunking."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from imgclust.io.storage import RETRY_DELAYS, check_fences, is_local, is_transient, open_fs, with_retries, zarr_options

logger = logging.getLogger("imgclust")


class RetryingStore(WrapperStore):
    """A Zarr store whose every read, write, listing and delete is asked again with backoff while
    it fails transiently (``is_transient``): one 503 must not fail a chunk, let alone a stage."""

    async def _retry(self, what: str, call: Any) -> Any:
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                return await call()
            except Exception as exc:
                if delay is None or not is_transient(exc):
                    raise
                logger.warning("storage: %s failed (%s: %s); retrying in %.1f s (attempt %d)", what,
                               type(exc).__name__, exc, delay, attempt + 2)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._retry(f"read {key}", lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        return await self._retry("read", lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key: str) -> bool:
        return await self._retry(f"look up {key}", lambda: self._store.exists(key))

    async def set(self, key: str, value: Any) -> None:
        await self._retry(f"write {key}", lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await self._retry(f"write {key}", lambda: self._store.set_if_not_exists(key, value))

    async def delete(self, key: str) -> None:
        await self._retry(f"delete {key}", lambda: self._store.delete(key))

    async def delete_dir(self, prefix: str) -> None:
        await self._retry(f"delete {prefix}", lambda: self._store.delete_dir(prefix))

    async def _listed(self, what: str, listing: Any) -> AsyncIterator[str]:
        async def collect() -> list[str]:
            return [k async for k in listing()]

        for key in await self._retry(what, collect):
            yield key

    def list(self) -> AsyncIterator[str]:
        return self._listed("list", self._store.list)

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(f"list {prefix}", lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(f"list {prefix}", lambda: self._store.list_dir(prefix))


def array_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Store:
    """The Zarr store of ``url``, local or over fsspec, with transient failures retried."""
    if is_local(url):
        _, path = open_fs(url)
        inner: Store = LocalStore(path, read_only=read_only)
    else:
        inner = FsspecStore.from_url(url, storage_options=zarr_options(url, storage_options), read_only=read_only)
    return RetryingStore(inner)

# Tasks write whole chunks of images or codes, which are never all zero: zarr's default check for
# "empty" chunks scans each one first and costs as much CPU as compressing it (bench/ingest.py).
WRITE_CONFIG = {"write_empty_chunks": True}


def create_array(url: str, shape: tuple[int, ...], chunk_rows: int, dtype: str,
                 storage_options: dict[str, Any] | None = None,
                 attributes: dict[str, Any] | None = None, read_rows: int | None = None) -> zarr.Array:
    """A new array chunked along the first axis only; whole chunks are what tasks write.

    With ``read_rows``, each chunk of ``chunk_rows`` is one file of independently compressed
    pieces of ``read_rows`` rows (Zarr's sharding): a reader of one row fetches and decodes only
    its piece (thumbnails shown one at a time), writers still write whole chunks.
    """
    check_fences(url)
    chunks = (max(1, min(chunk_rows, shape[0] or 1)), *shape[1:])
    shards = None
    if read_rows:
        shards, chunks = chunks, (max(1, min(read_rows, chunks[0])), *shape[1:])
        shards = (shards[0] - shards[0] % chunks[0] or chunks[0], *shape[1:])
    return zarr.create_array(
        store=array_store(url, storage_options), shape=shape, chunks=chunks, shards=shards,
        dtype=dtype, compressors=compressor(dtype),
        fill_value=0, overwrite=True, attributes=attributes or {}, config=WRITE_CONFIG,
    )


def compressor(dtype: str) -> BloscCodec:
    """Pixels: zstd level 1 without shuffle, both smaller and twice as fast to write as level 3 with
    bitshuffle on 32x32 images (bench/ingest.py); floats: byte shuffle, which suits their layout."""
    if np.dtype(dtype).itemsize == 1:
        return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def open_if_exists(url: str, storage_options: dict[str, Any] | None = None) -> zarr.Array | None:
    """The array at ``url``, or None when there is none (absent, or its metadata never finished).

    Anything else (a timeout, a 503) is asked again with backoff and then raised: a failure to ask
    must never pass for "not there", which would make a stage redo, or overwrite, finished work.
    """
    import json

    from zarr.errors import NodeNotFoundError

    try:
        return with_retries(open_array, url, storage_options)
    except (FileNotFoundError, NodeNotFoundError, json.JSONDecodeError):
        return None


def open_array(url: str, storage_options: dict[str, Any] | None = None, mode: str = "r") -> zarr.Array:
    if mode != "r":
        check_fences(url)
    array = zarr.open_array(store=array_store(url, storage_options, read_only=mode == "r"), mode=mode)
    return array if mode == "r" else array.with_config(WRITE_CONFIG)


def chunk_spans(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, stop) of every chunk along the first axis."""
    return [(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


def aligned_spans(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Spans covering [start, stop) that never cross a chunk boundary, so that parallel writers never
    share a chunk (appends start mid-chunk)."""
    spans, a = [], start
    while a < stop:
        b = min(stop, (a // chunk_rows + 1) * chunk_rows)
        spans.append((a, b))
        a = b
    return spans


def read_rows(array: zarr.Array, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (indices along the first axis) of a Zarr array, read chunk by chunk."""
    if len(idx) == 0:
        return np.zeros((0, *array.shape[1:]), array.dtype)
    return array.get_orthogonal_selection((np.asarray(idx),))
