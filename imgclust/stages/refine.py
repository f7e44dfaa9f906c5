"""Stage 5b: refine K-means clusters with a neighbour-consistent conv net (``imgclust.models.refiner``).

The net trains in the flow's process on a sample of images; one Dask task per Zarr chunk then
assigns every image and writes its choice, and the refined labels, centres and distances are
computed block by block on the workers. The refined labels replace K-means' and the net joins the
run's model, which ``assign`` uses for images added later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from distributed import Client

from imgclust.cluster.kmeans import K_SEARCH_SAMPLE, dask_centres_of_labels, silhouette, size_order
from imgclust.cluster.sampling import refine_rows, sample_rows
from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.io.arrays import aligned_spans, create_array, open_array, read_rows
from imgclust.models.refiner import (
    RefineSettings,
    apply_restored,
    overlap_counts,
    refine,
    restore_from_overlap,
    restored_counts,
)
from imgclust.progress import track
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.cluster import Clustering, LabelArrays
from imgclust.stages.encode import cached_model
from imgclust.state.resume import ShardLedger, fingerprint
from imgclust.threads import local_cores, torch_threads, worker_budget

logger = logging.getLogger("imgclust")
MIN_PER_CLUSTER = 50  # fewer images per cluster than this: too little to train a classifier on


@dataclass(frozen=True)
class RefinePass:
    """What a worker needs to run the fitted cluster net over a span of the run's images: where the
    images, the model (of ``token``) and K-means' labels are, where the net's choices go, and k."""

    images: Location
    model: Location
    token: str
    kmeans_labels: Location
    raw: Location
    k: int
    threads: dict[str, int] | None = None


def predict_chunk(job: RefinePass, start: int, stop: int) -> np.ndarray:
    """On a worker: the cluster net's raw choice (before size ordering) of images [start, stop),
    written to ``job.raw``; returns its ``overlap_counts`` with K-means' labels, (k, k)."""
    model = cached_model(job.model, job.token)
    pixels = open_array(job.images.url, job.images.storage_options)[start:stop]
    with torch_threads(worker_budget(job.threads)):
        raw = model.refiner_raw(pixels)
    open_array(job.raw.url, job.raw.storage_options, "r+")[start:stop] = raw.astype(np.int32)
    kmeans = open_array(job.kmeans_labels.url, job.kmeans_labels.storage_options)[start:stop]
    return overlap_counts(raw, kmeans, job.k)


def final_labels(raw: np.ndarray, kmeans: np.ndarray, restored: list[tuple[int, int]], remap: np.ndarray) -> np.ndarray:
    """A block's refined labels (int32): the net's choice with restored K-means clusters, numbered by size."""
    return remap[apply_restored(raw, kmeans, restored)].astype(np.int32)


def refine_clusters(store: RunStore, clu: Clustering, seed: int, client: Client,
                    settings: RefineSettings | None = None) -> tuple[Clustering, dict[str, Any]]:
    """Refine ``clu`` (K-means on the manifold) into new labels, distances and model centres.

    The net is fitted here on a sample; the workers then label every chunk and write it, so that
    the flow process holds only the sample and (k, k) counts and (k, d) centres, whatever N."""
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
    features = open_array(clu.features_url, so)
    x = torch.from_numpy(read_rows(images, rows)).float().div_(255.0)
    labels0 = read_rows(open_array(clu.labels_url, so), rows).astype(np.int64)
    dist0 = read_rows(open_array(clu.distances_url, so), rows)
    with torch_threads(local_cores()):  # fitted here, in the flow's process, while the workers idle
        net, history = refine(x, read_rows(features, rows), labels0, -dist0, k, settings, seed)
    del x
    model_dir = Location(store.model, so)
    model = RunModel.load(model_dir)
    model.refiner = net
    model.refiner_spec = {"channels": int(images.shape[1]), "k": k, "width": settings.width,
                          "settings": settings.as_dict(), "history": history, "remap": list(range(k))}
    model.save(model_dir)
    step = images.chunks[0]
    raw_url = store.work("refine-raw.zarr")
    create_array(raw_url, (n,), step, "int32", so)
    job = RefinePass(Location(store.images, so), model_dir, model.token, Location(clu.labels_url, so),
                     Location(raw_url, so), k, torch_threads_by_worker(client))
    futures = [client.submit(predict_chunk, job, a, b, pure=False) for a, b in aligned_spans(0, n, step)]
    overlap = np.zeros((k, k), np.int64)
    for fut in track(completed(client, futures), total=len(futures), desc="refine", unit="chunk"):
        overlap += fut.result()
    restored = restore_from_overlap(overlap)
    if restored:  # the net let clusters die: those K-means clusters come back, the rest stays refined
        logger.warning("refine: the cluster net left %d of %d clusters empty; K-means' cluster%s %s kept as %s",
                       len(restored), k, "s" if len(restored) > 1 else "", ", ".join(str(c) for _, c in restored),
                       "they were" if len(restored) > 1 else "it was")
        model.refiner_spec["restored"] = [list(p) for p in restored]
        model.refiner_spec["kmeans_centres"] = np.asarray(model.placement.centres, np.float64).tolist()
        history = {**history, "restored": len(restored)}
    counts = restored_counts(overlap, restored)
    remap = size_order(counts)
    found = int((counts > 0).sum())
    if found < k:  # still short (K-means itself had empty clusters): K-means' clusters are the answer
        logger.warning("refine: the cluster net used only %d of %d clusters; keeping K-means' clusters", found, k)
        model.refiner = model.refiner_spec = None
        model.save(model_dir)
        return _recorded(ledger, clu, {**history, "rejected": f"collapsed to {found} of {k} clusters"})
    # New arrays: K-means' labels stay intact, so a run killed from here on refines them again.
    labels_url, distances_url = store.work("refined-labels.zarr"), store.work("refined-distances.zarr")
    with dask.config.set(scheduler=client):
        fx = da.from_zarr(features)
        raw = da.from_zarr(open_array(raw_url, so)).rechunk((fx.chunks[0],))
        kmeans = da.from_zarr(open_array(clu.labels_url, so)).rechunk((fx.chunks[0],))
        arrays = LabelArrays(Location(labels_url, so), Location(distances_url, so), n, step)
        # written first, then read back: each block's labels are computed once, not once per use
        labels = arrays.write_labels(da.map_blocks(final_labels, raw, kmeans, restored, remap, dtype=np.int32))
        centres, out = dask_centres_of_labels(fx, labels.rechunk((fx.chunks[0],))[:, None], found)
        arrays.write_distances(out[:, 1])
    assert model.placement is not None
    model.placement.centres = centres
    model.placement.sub_centres = model.placement.sub_to_cluster = None  # pieces describe K-means' clusters
    model.refiner_spec["remap"] = remap.tolist()
    model.save(model_dir)
    pick = sample_rows(n, K_SEARCH_SAMPLE, seed)
    sil = silhouette(read_rows(features, pick), read_rows(open_array(labels_url, so), pick), seed)
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
