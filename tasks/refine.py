"""Stage 5b: refine K-means clusters with a neighbour-consistent conv net (see imgclust/refiner.py).

The net trains in the flow's process on a sample of images; one Dask task per Zarr chunk then
assigns every image. The refined labels replace K-means' and ``model/refiner.pt`` is what
``assign`` uses for images added later.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import torch
from distributed import Client
from prefect import task

from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.progress import track
from imgclust.refiner import ClusterNet, RefineSettings, predict, refine
from imgclust.resume import ShardLedger, fingerprint
from imgclust.storage import join, open_fs, write_bytes_atomic, write_json
from imgclust.threads import local_cores, torch_threads, worker_budget
from imgclust.worker_cache import worker_cached
from imgclust.zarr_store import aligned_spans, create_array, open_array
from tasks.cluster import (
    K_SEARCH_SAMPLE,
    Clustering,
    _distance_to_centre,
    _means,
    _relabel_by_size,
    _silhouette,
    load_cluster_model,
    sample_rows,
    save_cluster_model,
)
from tasks.train import weights_token

logger = logging.getLogger("imgclust")
MIN_PER_CLUSTER = 50  # fewer images per cluster than this: too little to train a classifier on


def save_refiner(net: ClusterNet, spec: dict[str, Any], model_dir: str, storage_options: dict[str, Any]) -> str:
    """Write the net; returns the token of its weights (workers cache the net under it)."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    write_bytes_atomic(join(model_dir, "refiner.pt"), buf.getvalue(), storage_options)
    write_json(join(model_dir, "refiner.json"), spec, storage_options)
    return weights_token(buf.getvalue())


def load_refiner(model_dir: str, storage_options: dict[str, Any] | None = None) -> ClusterNet | None:
    """The run's cluster net, or None when the run was not refined."""
    fs, root = open_fs(model_dir, storage_options)
    if not fs.exists(f"{root}/refiner.json"):
        return None
    spec = json.loads(fs.cat(f"{root}/refiner.json"))
    net = ClusterNet(spec["channels"], spec["k"], spec["width"])
    net.load_state_dict(torch.load(io.BytesIO(fs.cat(f"{root}/refiner.pt")), map_location="cpu", weights_only=True))
    return net.eval()


def assign_pixels(net: ClusterNet, pixels: np.ndarray, remap: np.ndarray) -> np.ndarray:
    """Final cluster ids of uint8 images (N, C, H, W): the net's choice through the size ordering."""
    probs = predict(net, torch.from_numpy(np.asarray(pixels)).float().div_(255.0))
    return remap[probs.argmax(1)].astype(np.int64)


def predict_chunk(images_url: str, model_dir: str, token: str, storage_options: dict[str, Any] | None, start: int,
                  stop: int, threads: dict[str, int] | None = None) -> np.ndarray:
    """Raw cluster choice (before size ordering) of images [start, stop), on a worker."""
    net = worker_cached("refiner", f"{model_dir}#{token}", lambda: load_refiner(model_dir, storage_options))
    pixels = open_array(images_url, storage_options)[start:stop]
    with torch_threads(worker_budget(threads)):
        return predict(net, torch.from_numpy(pixels).float().div_(255.0)).argmax(1).astype(np.int32)


def refine_clusters(images_url: str, clu: Clustering, output: str, storage_options: dict[str, Any], seed: int,
                    client: Client, settings: RefineSettings | None = None) -> tuple[Clustering, dict[str, Any]]:
    """Refine ``clu`` (K-means on the manifold) into new labels, distances and clusterer centres."""
    settings = settings or RefineSettings()
    so = storage_options
    t0 = time.perf_counter()
    images = open_array(images_url, so)
    n, k = images.shape[0], clu.n_clusters
    if n < MIN_PER_CLUSTER * k:
        logger.info("refine: skipped, %d images are too few for %d clusters (needs %d per cluster)", n, k,
                    MIN_PER_CLUSTER)
        return clu, {"skipped": f"fewer than {MIN_PER_CLUSTER} images per cluster"}
    ledger = None
    if clu.key:  # resumable: a killed run that finished refining reuses it
        ledger = ShardLedger(output, so, "refine", fingerprint("refine", clu.key, seed, settings.as_dict()))
        ledger.clear_others()
        recorded = ledger.result()
        if recorded is not None:
            logger.info("refine: already done for these clusters and settings; reusing it")
            return Clustering.from_record(recorded["clustering"]), recorded["summary"]
    rows = sample_rows(n, settings.sample, seed)
    x = torch.from_numpy(images.get_orthogonal_selection((rows, slice(None), slice(None), slice(None)))).float().div_(255.0)
    features = open_array(clu.features_url, so)
    f_all = features[:]
    labels0 = open_array(clu.labels_url, so)[:]
    dist0 = open_array(clu.distances_url, so)[:]
    with torch_threads(local_cores()):  # fitted here, in the flow's process, while the workers idle
        net, history = refine(x, f_all[rows], labels0[rows].astype(np.int64), -dist0[rows], k, settings, seed)
    model_dir = join(output, "model")
    spec = {"channels": int(images.shape[1]), "k": k, "width": settings.width, "settings": settings.as_dict(),
            "history": history}
    token = save_refiner(net, spec, model_dir, so)
    threads = torch_threads_by_worker(client)
    step = images.chunks[0]
    futures = {client.submit(predict_chunk, images_url, model_dir, token, so, a, b, threads, pure=False): a
               for a, b in aligned_spans(0, n, step)}
    raw = np.zeros(n, np.int32)
    for fut in track(completed(client, futures), total=len(futures), desc="refine", unit="chunk"):
        a = futures[fut]
        got = fut.result()
        raw[a:a + len(got)] = got
    labels, remap = _relabel_by_size(raw, k)
    found = int(labels.max()) + 1 if n else 0
    if found < k:  # the net let clusters die: K-means' k clusters are the better answer
        logger.warning("refine: the cluster net used only %d of %d clusters; keeping K-means' clusters", found, k)
        fs, root = open_fs(model_dir, so)
        fs.rm([f"{root}/refiner.pt", f"{root}/refiner.json"])
        return _recorded(ledger, clu, {**history, "rejected": f"collapsed to {found} of {k} clusters"})
    centres = _means(f_all, labels, found)
    dist = _distance_to_centre(f_all, centres, labels).astype(np.float32)
    clusterer_url = join(model_dir, "clusterer.pkl")
    clusterer = load_cluster_model(clusterer_url, so)
    clusterer.centres = centres
    clusterer.sub_centres = clusterer.sub_to_cluster = None  # the pieces describe K-means' clusters, not these
    save_cluster_model(clusterer, clusterer_url, so)
    spec["remap"] = remap.tolist()
    write_json(join(model_dir, "refiner.json"), spec, so)
    # New arrays: K-means' labels stay intact, so a run killed from here on refines them again.
    labels_url, distances_url = join(output, "_work", "refined-labels.zarr"), join(output, "_work", "refined-distances.zarr")
    create_array(labels_url, (n,), step, "int32", so)[:] = labels
    create_array(distances_url, (n,), step, "float32", so)[:] = dist
    pick = sample_rows(n, K_SEARCH_SAMPLE, seed)
    sil = _silhouette(f_all[pick], labels[pick], seed)
    summary = {**history, "seconds": round(time.perf_counter() - t0, 1), "sample": len(rows),
               "settings": settings.as_dict()}
    logger.info("refine: %d clusters (%d before), silhouette on a sample %.3f, %.1f s", found, k,
                sil if sil is not None else float("nan"), summary["seconds"])
    refined = Clustering(labels_url, distances_url, clu.features_url, found, sil, clu.k_curve,
                         ledger.key if ledger is not None else "")
    return _recorded(ledger, refined, summary)


def _recorded(ledger: ShardLedger | None, clu: Clustering, summary: dict[str, Any]) -> tuple[Clustering, dict[str, Any]]:
    if ledger is not None:
        ledger.record_result({"clustering": clu.as_record(), "summary": summary})
    return clu, summary


@task(name="refine", retries=1, retry_delay_seconds=5)
def refine_task(images_url: str, clu: Clustering, output: str, storage_options: dict[str, Any], seed: int,
                address: str, epochs: int | None = None) -> tuple[Clustering, dict[str, Any]]:
    n = open_array(images_url, storage_options).shape[0]
    settings = RefineSettings().bounded(epochs, n)
    with Client(address, set_as_default=False) as client:
        return refine_clusters(images_url, clu, output, storage_options, seed, client, settings)
