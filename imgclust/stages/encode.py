"""Stage 4: batched inference over the Zarr chunks, one Dask task per chunk, into codes.zarr."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from distributed import Client

from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.io.arrays import aligned_spans, create_array, open_array, open_if_exists
from imgclust.models.encoding import encode_array
from imgclust.progress import track
from imgclust.runmodel import ModelRef, RunModel
from imgclust.runstore import Location, RunStore
from imgclust.state.resume import ShardLedger, fingerprint
from imgclust.threads import torch_threads, worker_budget
from imgclust.worker_cache import worker_cached

logger = logging.getLogger("imgclust")
# Decoding doubles encode's cost; the reconstruction MSE is a run-level quality signal, so a large
# archive's is estimated on an evenly spaced sample of about this many images.
MSE_SAMPLE = 20_000


@dataclass(frozen=True)
class Encoded:
    code_dim: int
    reconstruction_mse: float | None  # None: the encoder has no decoder
    chunks_resumed: int = 0


def cached_model(model_dir: Location, token: str) -> RunModel:
    """The model saved at ``model_dir`` with ``token`` (``RunModel.token``), loaded once per worker
    process and kept while the token stays the same."""
    return worker_cached("run-model", f"{model_dir.url}#{token}", lambda: RunModel.load(model_dir))


def encode_chunk(store: RunStore, token: str, start: int, stop: int, batch_size: int,
                 threads: dict[str, int] | None = None, ledger: ShardLedger | None = None,
                 mse_every: int = 1) -> tuple[float, int]:
    """Encode rows [start, stop) on a worker and write them into codes.zarr; returns the summed
    MSE of the rows sampled for it (every ``mse_every``-th index) and their count.

    Workers with CUDA encode on their GPU; the others on CPU with the thread budget ``threads``
    gives their address, so that tasks x torch threads never exceed a host's cores.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cached_model(Location(store.model, store.storage_options), token).autoencoder.to(device)
    so = store.storage_options
    pixels = open_array(store.images, so)[start:stop]
    with torch_threads(worker_budget(threads) if device.type == "cpu" else torch.get_num_threads()):
        codes, sq, counted = encode_array(model, pixels, batch_size, device, mse_every, start)
    if ledger is not None:
        ledger.check_fence()
    open_array(store.codes, so, mode="r+")[start:stop] = codes
    if ledger is not None:
        ledger.mark(start, [sq, counted])
    return sq, counted


def encode(store: RunStore, model: ModelRef, batch_size: int, client: Client, start: int = 0,
           ingest_key: str = "") -> Encoded:
    """Encode ``images[start:]`` into codes.zarr (created when ``start`` is 0, extended otherwise)
    with the run's model ``model``.

    A full encode (``start`` 0) records each finished chunk under a key of the images and the
    weights, so a killed run encodes only the rest, and a finished one is not redone.
    """
    so = store.storage_options
    token, code_dim = model.token, model.code_dim
    images = open_array(store.images, so)
    n, step = images.shape[0], images.chunks[0]
    ledger, done = None, {}
    if start == 0:
        key = fingerprint("encode", ingest_key or store.images, model.weights_sha256, n, MSE_SAMPLE)
        existing = open_if_exists(store.codes, so)
        if existing is not None and existing.attrs.get("encode_key") == key and "reconstruction_mse" in existing.attrs:
            logger.info("encode: already done with these weights; reusing codes.zarr")
            mse = existing.attrs["reconstruction_mse"]
            return Encoded(code_dim, None if mse is None else float(mse))
        ledger = ShardLedger(store, "encode", key)
        ledger.clear_others()
        done = ledger.done_rows() if existing is not None and existing.attrs.get("encode_key") == key else {}
        if not done:
            create_array(store.codes, (n, code_dim), step, "float32", so, {"encode_key": key})
        else:
            logger.info("encode: resuming, %d of %d chunks already encoded", len(done), -(-n // step))
    else:
        open_array(store.codes, so, mode="r+").resize((n, code_dim))
    threads = torch_threads_by_worker(client)
    every = max(1, (n - start) // MSE_SAMPLE)
    futures = [client.submit(encode_chunk, store, token, a, b, batch_size, threads, ledger, every, pure=False)
               for a, b in aligned_spans(start, n, step) if a not in done]
    total, counted = float(sum(d[0] for d in done.values())), int(sum(d[1] for d in done.values()))
    for fut in track(completed(client, futures), total=len(futures), desc="encode", unit="chunk"):
        sq, c = fut.result()
        total, counted = total + sq, counted + c
    mse = total / counted if counted else None
    if ledger is not None:
        open_array(store.codes, so, mode="r+").attrs["reconstruction_mse"] = mse  # marks it finished
        ledger.clear()
    logger.info("encode: %d codes of %d dimensions, %s", n - start, code_dim,
                "no decoder" if mse is None else f"reconstruction MSE {mse:.5f} (on {counted} images)")
    return Encoded(code_dim, mse, len(done))
