"""Stage 5b: refine K-means clusters with a neighbour-consistent conv net (``imgclust.models.refiner``).

The net trains in the flow's process on a sample of images; one Dask task per Zarr chunk then
assigns every image. The refined labels replace K-means' and the net joins the run's model, which
``assign`` uses for images added later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from distributed import Client

from imgclust.cluster.kmeans import (
    K_SEARCH_SAMPLE,
    cluster_means,
    distance_to_centre,
    relabel_by_size,
    silhouette,
)
from imgclust.cluster.sampling import refine_rows, sample_rows
from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.io.arrays import aligned_spans, create_array, open_array
from imgclust.models.refiner import RefineSettings, apply_restored, refine, restore_dead_clusters
from imgclust.progress import track
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.cluster import Clustering
from imgclust.stages.encode import cached_model
from imgclust.state.resume import ShardLedger, fingerprint
from imgclust.threads import local_cores, torch_threads, worker_budget

logger = logging.getLogger("imgclust")
MIN_PER_CLUSTER = 50  # fewer images per cluster than this: too little to train a classifier on


def predict_chunk(images: Location, model_dir: Location, token: str, start: int, stop: int,
                  threads: dict[str, int] | None = None) -> np.ndarray:
    """The cluster net's raw choice (before size ordering) of images [start, stop), on a worker."""
    model = cached_model(model_dir, token)
    pixels = open_array(images.url, images.storage_options)[start:stop]
    with torch_threads(worker_budget(threads)):
        return model.refiner_raw(pixels)


def refine_clusters(store: RunStore, clu: Clustering, seed: int, client: Client,
                    settings: RefineSettings | None = None) -> tuple[Clustering, dict[str, Any]]:
    """Refine ``clu`` (K-means on the manifold) into new labels, distances and model centres."""
    settings = settings or RefineSettings()
    so = store.storage_options
    t0 = time.perf_counter()
    images = open_array(store.images, so)
    n, k = images.shape[0], clu.n_clusters
    if n < MIN_PER_CLUSTER * k:
        logger.info("refine: skipped, %d images are too few for %d clusters (needs %d per cluster)", n, k,
                    MIN_PER_CLUSTER)
        return clu, {"skipped": f"fewer than {MIN_PER_CLUSTER} images per cluster"}
    ledger = None
    if clu.key:  # resumable: a killed run that finished refining reuses it
        ledger = ShardLedger(store, "refine", fingerprint("refine", clu.key, seed, settings.as_dict()))
        ledger.clear_others()
        recorded = ledger.result()
        if recorded is not None:
            logger.info("refine: already done for these clusters and settings; reusing it")
            return Clustering.from_record(recorded["clustering"]), recorded["summary"]
    rows = sample_rows(n, max(settings.sample, refine_rows(n, k)), seed)
    x = torch.from_numpy(images.get_orthogonal_selection((rows, slice(None), slice(None), slice(None)))).float().div_(255.0)
    f_all = open_array(clu.features_url, so)[:]
    labels0 = open_array(clu.labels_url, so)[:]
    dist0 = open_array(clu.distances_url, so)[:]
    with torch_threads(local_cores()):  # fitted here, in the flow's process, while the workers idle
        net, history = refine(x, f_all[rows], labels0[rows].astype(np.int64), -dist0[rows], k, settings, seed)
    model_dir = Location(store.model, so)
    model = RunModel.load(model_dir)
    model.refiner = net
    model.refiner_spec = {"channels": int(images.shape[1]), "k": k, "width": settings.width,
                          "settings": settings.as_dict(), "history": history, "remap": list(range(k))}
    model.save(model_dir)
    threads = torch_threads_by_worker(client)
    step = images.chunks[0]
    futures = {client.submit(predict_chunk, Location(store.images, so), model_dir, model.token, a, b, threads,
                             pure=False): a for a, b in aligned_spans(0, n, step)}
    raw = np.zeros(n, np.int32)
    for fut in track(completed(client, futures), total=len(futures), desc="refine", unit="chunk"):
        a = futures[fut]
        got = fut.result()
        raw[a:a + len(got)] = got
    restored = restore_dead_clusters(raw, labels0, k)
    if restored:  # the net let clusters die: those K-means clusters come back, the rest stays refined
        raw = apply_restored(raw, labels0, restored)
        logger.warning("refine: the cluster net left %d of %d clusters empty; K-means' cluster%s %s kept as %s",
                       len(restored), k, "s" if len(restored) > 1 else "", ", ".join(str(c) for _, c in restored),
                       "they were" if len(restored) > 1 else "it was")
        model.refiner_spec["restored"] = [list(p) for p in restored]
        model.refiner_spec["kmeans_centres"] = np.asarray(model.placement.centres, np.float64).tolist()
        history = {**history, "restored": len(restored)}
    labels, remap = relabel_by_size(raw, k)
    found = int(labels.max()) + 1 if n else 0
    if found < k:  # still short (K-means itself had empty clusters): K-means' clusters are the answer
        logger.warning("refine: the cluster net used only %d of %d clusters; keeping K-means' clusters", found, k)
        model.refiner = model.refiner_spec = None
        model.save(model_dir)
        return _recorded(ledger, clu, {**history, "rejected": f"collapsed to {found} of {k} clusters"})
    centres = cluster_means(f_all, labels, found)
    dist = distance_to_centre(f_all, centres, labels).astype(np.float32)
    assert model.placement is not None
    model.placement.centres = centres
    model.placement.sub_centres = model.placement.sub_to_cluster = None  # pieces describe K-means' clusters
    model.refiner_spec["remap"] = remap.tolist()
    model.save(model_dir)
    # New arrays: K-means' labels stay intact, so a run killed from here on refines them again.
    labels_url, distances_url = store.work("refined-labels.zarr"), store.work("refined-distances.zarr")
    create_array(labels_url, (n,), step, "int32", so)[:] = labels
    create_array(distances_url, (n,), step, "float32", so)[:] = dist
    pick = sample_rows(n, K_SEARCH_SAMPLE, seed)
    sil = silhouette(f_all[pick], labels[pick], seed)
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
