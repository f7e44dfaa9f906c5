"""Stream shuffled training batches from a Zarr image array without loading it whole."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import zarr

from imgclust.zarr_store import chunk_spans


def iter_batches(array: zarr.Array, batch_size: int, rng: np.random.Generator, buffer_chunks: int = 4,
                 rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 batches (B, C, H, W) for one epoch.

    Chunks are visited in random order and ``buffer_chunks`` of them are mixed and shuffled
    together, so memory stays at a few chunks while batches still mix distant images. A
    background thread reads the next chunk while the caller trains. ``rows`` restricts the epoch
    to a sorted subset (a training sample).
    """
    n = array.shape[0]
    step = array.chunks[0]
    spans = chunk_spans(n, step)
    order = rng.permutation(len(spans))
    keep = None if rows is None else np.zeros(n, dtype=bool)
    if keep is not None:
        keep[rows] = True
    q: queue.Queue = queue.Queue(maxsize=2)

    def reader() -> None:
        try:
            for i in order:
                a, b = spans[i]
                block = array[a:b]
                if keep is not None:
                    block = block[keep[a:b]]
                q.put(block)
        except BaseException as exc:  # surface read errors in the training thread
            q.put(exc)
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    pending: list[np.ndarray] = []
    done = False
    while not done:
        while len(pending) < buffer_chunks:
            item = q.get()
            if item is None:
                done = True
                break
            if isinstance(item, BaseException):
                raise item
            if len(item):
                pending.append(item)
        if not pending:
            break
        pool = np.concatenate(pending)
        pool = pool[rng.permutation(len(pool))]
        # Emit all full batches except the remainder, which is mixed with the next chunks.
        cut = len(pool) if done else (len(pool) // batch_size) * batch_size
        if cut == 0 and not done:
            pending = [pool]
            continue
        for s in range(0, cut, batch_size):
            yield pool[s:s + batch_size]
        pending = [pool[cut:]] if cut < len(pool) else []
