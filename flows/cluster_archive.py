"""The ``cluster-archive`` flow: folder of images -> Zarr -> autoencoder -> codes -> K-means -> tables."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger

from imgclust.config import ConfigError, RunConfig
from imgclust.dask_cluster import dask_client
from imgclust.io.storage import remove
from imgclust.models.refiner import RefineSettings
from imgclust.models.training import TrainPlan
from imgclust.preflight import clear_previous_run, preflight
from imgclust.presets import PRESETS, train_steps
from imgclust.stages.cluster import ClusterSettings
from imgclust.stages.ingest import PixelSpec, thumbnail_side, too_few_images
from imgclust.stages.publish import write_run_record
from imgclust.stages.train import check_training_device
from imgclust.state.lease import Lease, acquire_lease
from tasks.cluster import cluster_task
from tasks.discover import discover_task
from tasks.encode import encode_task
from tasks.ingest import ingest_task
from tasks.neighbours import neighbours_task
from tasks.publish import publish_task, report_task
from tasks.refine import refine_task
from tasks.train import train_task

if logging.getLogger("imgclust").level == logging.NOTSET:
    logging.getLogger("imgclust").setLevel(logging.INFO)  # stage messages reach Prefect's run logs


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - t0, 3)


@flow(name="cluster-archive", validate_parameters=True)
def cluster_archive(config: RunConfig) -> dict[str, Any]:
    """Cluster every image under ``config.source`` and write the results to ``config.output``.

    An unfinished run in ``output`` (killed, crashed) is resumed: finished shards, training
    checkpoints and encoded chunks recorded under the same content and settings are reused.
    """
    log = get_run_logger()
    preflight(config)
    store = config.store
    with acquire_lease(store, "cluster-archive", config.lease_seconds, config.force_unlock) as lease:
        if config.overwrite:
            clear_previous_run(config)
        record = _stages(config, lease)
    log.info("report: %s", record["report"])
    log.info("cluster-archive: %d images -> %d clusters; results in %s", record["counts"]["accepted"],
             record["counts"]["clusters"], store.url)
    return record


def _stages(config: RunConfig, lease: Lease) -> dict[str, Any]:
    store, source, preset = config.store, config.source_location, PRESETS[config.preset]
    size = config.resolved_image_size
    sec: dict[str, float] = {}
    with dask_client(config.dask_address, config.n_workers, config.dask_cluster_class,
                     config.dask_cluster_kwargs) as client:
        address = client.scheduler.address
        try:
            check_training_device(client, config.device)
        except ValueError as exc:
            raise ConfigError("device", str(exc)) from None
        with _timed(sec, "discover"):
            found = discover_task(source, store, address)
        if config.n_clusters is not None and config.n_clusters > found.n_unique:
            raise ConfigError("n_clusters", f"{config.n_clusters} clusters asked for but only {found.n_unique} "
                              "distinct images were found")
        gray = found.gray if config.color == "auto" else config.color == "gray"
        lease.check()
        with _timed(sec, "ingest"):
            thumbs = thumbnail_side(config.thumbnail_size, found.side_p90)
            pixels = PixelSpec(size, gray, config.fit, config.max_megapixels, thumbs)
            ing = ingest_task(source, store, pixels, config.shard_size, address)
        if ing.n_accepted < max(2, config.n_clusters or 2):
            raise ConfigError("n_clusters" if config.n_clusters else "source", too_few_images(found, ing, store))
        n_train = min(ing.n_accepted, config.train_sample or ing.n_accepted)
        steps = train_steps(config.preset, n_train, config.batch_size, config.epochs, config.train_steps)
        encoder = config.encoder_choice
        if encoder is not None:
            steps = config.encoder_steps  # 0: used as it is
        plan = TrainPlan(config.preset, steps, config.batch_size, config.resolved_learning_rate, config.seed,
                         config.device, config.train_sample, encoder, config.encoder_steps)
        lease.check()
        with _timed(sec, "train"):
            model = train_task(store, plan, ing.key, address)
        lease.check()
        with _timed(sec, "encode"):
            enc = encode_task(store, model, config.batch_size, ing.key, address)
        lease.check()
        merge = preset.merge if config.merge is None else config.merge
        settings = ClusterSettings(config.n_clusters, preset.embedding, config.seed, preset.method,
                                   preset.embedding_dim, merge)
        with _timed(sec, "cluster"):
            clu = cluster_task(store, settings, address)
        refined: dict[str, Any] = {}
        if config.resolved_refine and clu.n_clusters >= 2:
            lease.check()
            with _timed(sec, "refine"):
                clu, refined = refine_task(store, clu, config.seed,
                                           RefineSettings().bounded(config.epochs, ing.n_accepted), address)
        lease.check()
        with _timed(sec, "neighbours"):
            near = neighbours_task(store, address)
        lease.check()
        with _timed(sec, "publish"):
            quality = publish_task(store, clu, address)
    counts = {"found": found.n_found, "duplicates": found.n_duplicates, "rejected": ing.n_rejected,
              "accepted": ing.n_accepted, "clusters": clu.n_clusters,
              "near_duplicate_groups": near.near_duplicate_groups, "near_duplicate_images": near.near_duplicate_images}
    record = {
        "config": config.public_dict(),
        "resolved": {"image_size": list(size), "color": "gray" if gray else "rgb", "train_steps": steps,
                     "epochs": round(steps / max(1, -(-n_train // config.batch_size)), 3),
                     "thumbnail_size": thumbs, "train_images": n_train, "learning_rate": config.resolved_learning_rate,
                     "embedding": preset.embedding, "method": preset.method, "merge": merge,
                     "encoder": encoder.as_dict() if encoder is not None else None, "code_dim": model.code_dim,
                     "device": model.device, "n_clusters": clu.n_clusters},
        "counts": counts,
        "refine": refined,
        "resumed": {"ingest_shards": ing.shards_resumed, "train_from_step": model.resumed_from_step,
                    "encode_chunks": enc.chunks_resumed},
        "seconds": sec,
        "quality": {"reconstruction_mse": enc.reconstruction_mse, "silhouette_sample": clu.silhouette,
                    "k_curve": clu.k_curve, **quality},
        "train_loss": model.losses,
    }
    lease.check()
    with _timed(sec, "report"):
        record["report"] = report_task(store, config.seed, record)
    remove(store.resume(), store.storage_options)  # every stage finished: its resume records have served
    write_run_record(store, record)  # last: run.json is what marks the run finished
    return record


if __name__ == "__main__":
    import sys

    cluster_archive(RunConfig(source=sys.argv[1], output=sys.argv[2]))
