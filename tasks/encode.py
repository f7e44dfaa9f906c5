"""Stage 4: batched inference over the Zarr chunks, one Dask task per chunk, into codes.zarr."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import Client
from prefect import task

from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.progress import track
from imgclust.resume import ShardLedger, fingerprint
from imgclust.storage import join
from imgclust.threads import torch_threads, worker_budget
from imgclust.worker_cache import worker_cached
from imgclust.zarr_store import aligned_spans, create_array, open_array
from tasks.train import load_model

logger = logging.getLogger("imgclust")
# Decoding doubles encode's cost; the reconstruction MSE is a run-level quality signal, so a large
# archive's is estimated on an evenly spaced sample of about this many images.
MSE_SAMPLE = 20_000


@dataclass(frozen=True)
class Encoded:
    codes_url: str
    code_dim: int
    reconstruction_mse: float
    chunks_resumed: int = 0


def encode_array(model: torch.nn.Module, pixels: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                 every: int = 1, first: int = 0) -> tuple[np.ndarray, float, int]:
    """Codes (N, D) float32 of uint8 images (N, C, H, W), and the summed reconstruction MSE of the
    rows whose index ``first + i`` is a multiple of ``every``, with their count."""
    codes, sq, counted = [], 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.array(pixels[s:s + batch_size])).to(device).float().div_(255.0)
            z = model.encode(x)
            rows = np.flatnonzero((first + s + np.arange(len(x))) % every == 0)
            if len(rows):
                xs, zs = (x, z) if len(rows) == len(x) else (x[rows], z[rows])
                sq += float(((model.decode(zs) - xs) ** 2).mean(dim=(1, 2, 3)).sum())
                counted += len(rows)
            codes.append(z.float().cpu().numpy())
    return (np.concatenate(codes) if codes else np.zeros((0, 0), np.float32)), sq, counted


def encode_chunk(images_url: str, codes_url: str, model_url: str, token: str,
                 storage_options: dict[str, Any] | None, start: int, stop: int, batch_size: int,
                 threads: dict[str, int] | None = None, ledger: ShardLedger | None = None,
                 mse_every: int = 1) -> tuple[float, int]:
    """Encode rows [start, stop) on a worker and write them into codes.zarr; returns the summed
    MSE of the rows sampled for it (every ``mse_every``-th index) and their count.

    Workers with CUDA encode on their GPU; the others on CPU with the thread budget ``threads``
    gives their address, so that tasks x torch threads never exceed a host's cores.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = worker_cached("autoencoder", f"{model_url}#{token}",
                          lambda: load_model(model_url, storage_options)).to(device)
    pixels = open_array(images_url, storage_options)[start:stop]
    with torch_threads(worker_budget(threads) if device.type == "cpu" else torch.get_num_threads()):
        codes, sq, counted = encode_array(model, pixels, batch_size, device, mse_every, start)
    open_array(codes_url, storage_options, mode="r+")[start:stop] = codes
    if ledger is not None:
        ledger.mark(start, [sq, counted])
    return sq, counted


def encode(images_url: str, output: str, storage_options: dict[str, Any], model_url: str, token: str,
           code_dim: int, batch_size: int, client: Client, start: int = 0, ingest_key: str = "") -> Encoded:
    """Encode ``images[start:]`` into codes.zarr (created when ``start`` is 0, extended otherwise).

    A full encode (``start`` 0) records each finished chunk under a key of the images and the
    weights, so a killed run encodes only the rest, and a finished one is not redone.
    """
    images = open_array(images_url, storage_options)
    n, step = images.shape[0], images.chunks[0]
    codes_url = join(output, "codes.zarr")
    ledger, done = None, {}
    if start == 0:
        key = fingerprint("encode", ingest_key or images_url, token, n, MSE_SAMPLE)
        existing = _open_codes(codes_url, storage_options)
        if existing is not None and existing.attrs.get("encode_key") == key and "reconstruction_mse" in existing.attrs:
            logger.info("encode: already done with these weights; reusing codes.zarr")
            return Encoded(codes_url, code_dim, float(existing.attrs["reconstruction_mse"]))
        ledger = ShardLedger(output, storage_options, "encode", key)
        ledger.clear_others()
        done = ledger.done_rows() if existing is not None and existing.attrs.get("encode_key") == key else {}
        if not done:
            create_array(codes_url, (n, code_dim), step, "float32", storage_options, {"encode_key": key})
        else:
            logger.info("encode: resuming, %d of %d chunks already encoded", len(done), -(-n // step))
    else:
        open_array(codes_url, storage_options, mode="r+").resize((n, code_dim))
    threads = torch_threads_by_worker(client)
    every = max(1, (n - start) // MSE_SAMPLE)
    futures = [client.submit(encode_chunk, images_url, codes_url, model_url, token, storage_options, a, b,
                             batch_size, threads, ledger, every, pure=False)
               for a, b in aligned_spans(start, n, step) if a not in done]
    total, counted = float(sum(d[0] for d in done.values())), int(sum(d[1] for d in done.values()))
    for fut in track(completed(client, futures), total=len(futures), desc="encode", unit="chunk"):
        sq, c = fut.result()
        total, counted = total + sq, counted + c
    mse = total / max(counted, 1)
    if ledger is not None:
        open_array(codes_url, storage_options, mode="r+").attrs["reconstruction_mse"] = mse  # marks it finished
        ledger.clear()
    logger.info("encode: %d codes of %d dimensions, reconstruction MSE %.5f (on %d images)", n - start, code_dim,
                mse, counted)
    return Encoded(codes_url, code_dim, mse, len(done))


def _open_codes(codes_url: str, storage_options: dict[str, Any]) -> Any:
    try:
        return open_array(codes_url, storage_options)
    except Exception:  # absent or half-created
        return None


@task(name="encode", retries=1, retry_delay_seconds=5)
def encode_task(images_url: str, output: str, storage_options: dict[str, Any], model_url: str, token: str,
                code_dim: int, batch_size: int, address: str, ingest_key: str = "") -> Encoded:
    with Client(address, set_as_default=False) as client:
        return encode(images_url, output, storage_options, model_url, token, code_dim, batch_size, client,
                      ingest_key=ingest_key)
