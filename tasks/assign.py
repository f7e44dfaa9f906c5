"""Incremental runs: place images that are new to a finished run into its existing clusters."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client
from prefect import task

from imgclust.storage import (
    join,
    open_fs,
    read_json,
    read_parquet,
    remove,
    write_json,
    write_parquet,
)
from imgclust.zarr_store import open_array
from tasks.cluster import load_cluster_model
from tasks.discover import hash_files, list_images, split_duplicates
from tasks.encode import encode
from tasks.ingest import compact_into, decode_into_staging, manifest_rows
from tasks.publish import cluster_summaries
from tasks.refine import assign_pixels, load_refiner
from tasks.train import weights_token

logger = logging.getLogger("imgclust")


def assign_new(run_dir: str, source: str, storage_options: dict[str, Any], client: Client) -> dict[str, Any]:
    """Ingest, encode and assign only files whose content the run has never seen.

    A file is known when its sha256 is in the manifest, the rejected or the duplicates table (an
    unreadable file, which has no hash, when its path is already rejected). Duplicates within the
    new batch are handled as in a run. Zarr rows are written first and the manifest last, and every
    table is cut back to the manifest before appending, so a crash at any point is repaired by the
    next call instead of leaving duplicated or half-written rows.
    """
    t0 = time.perf_counter()
    so = storage_options
    run = read_json(join(run_dir, "run.json"), so)
    manifest = read_parquet(join(run_dir, "manifest.parquet"), so)
    rejected = read_parquet(join(run_dir, "rejected.parquet"), so)
    duplicates = read_parquet(join(run_dir, "duplicates.parquet"), so)
    if "sha256" not in rejected.columns:
        rejected["sha256"] = None
    known = set(manifest["sha256"]) | set(rejected["sha256"].dropna()) | set(duplicates["sha256"])
    fs, root = open_fs(source, so)
    hashed = hash_files(fs, root, list_images(source, so), client)
    unreadable = hashed[hashed["sha256"].isna() & ~hashed["path"].isin(set(rejected["path"]))]
    fresh = hashed[hashed["sha256"].notna() & ~hashed["sha256"].isin(known)]
    unique, dups = split_duplicates(fresh[["path", "sha256", "gray"]])
    summary = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "source": source,
               "files": len(hashed), "new": len(unique) + len(dups) + len(unreadable)}
    if summary["new"] == 0:
        logger.info("assign: nothing new among %d files", len(hashed))
        return {**summary, "accepted": 0, "rejected": 0, "duplicates": 0, "seconds": round(time.perf_counter() - t0, 3)}

    images_url = join(run_dir, "images.zarr")
    images = open_array(images_url, so, mode="r+")
    attrs = dict(images.attrs)
    size, gray = (int(attrs["height"]), int(attrs["width"])), attrs["color"] == "gray"
    n_old = len(manifest)
    staging_url = join(run_dir, "_work", "assign-staging.zarr")
    info, _ = decode_into_staging(source, so, unique["path"].tolist(), staging_url, size, gray, attrs.get("fit", "crop"),
                                  images.chunks[0], client)
    accepted_rows = np.flatnonzero(info["ok"].to_numpy(bool))
    images.resize((n_old + len(accepted_rows), *images.shape[1:]))
    compact_into(staging_url, images_url, so, accepted_rows, n_old, client)
    remove(staging_url, so)

    model_url = join(run_dir, "model")
    mfs, mroot = open_fs(model_url, so)
    token = weights_token(mfs.cat(f"{mroot}/weights.pt"))
    code_dim = open_array(join(run_dir, "codes.zarr"), so).shape[1]
    batch_size = int(run.get("config", {}).get("batch_size", 256))
    enc = encode(images_url, run_dir, so, model_url, token, code_dim, batch_size, client, start=n_old)
    clusterer = load_cluster_model(join(model_url, "clusterer.pkl"), so)
    new_codes = open_array(enc.codes_url, so)[n_old:n_old + len(accepted_rows)]
    refiner = load_refiner(model_url, so)
    if refiner is None:
        labels, dist = clusterer.assign(new_codes)
    else:  # a refined run: the cluster net decides, as it did for the run's own images
        remap = np.asarray(read_json(join(model_url, "refiner.json"), so)["remap"])
        labels = assign_pixels(refiner, open_array(images_url, so)[n_old:n_old + len(accepted_rows)], remap)
        dist = clusterer.distances(new_codes, labels)

    new_manifest, new_rejected = manifest_rows(unique, info, n_old)
    new_rejected = pd.concat([new_rejected, unreadable[["path", "reason"]].assign(sha256=None)], ignore_index=True)
    assignments = read_parquet(join(run_dir, "assignments.parquet"), so).iloc[:n_old]
    assignments = pd.concat([assignments, pd.DataFrame({
        "path": new_manifest["path"].to_numpy(), "sha256": new_manifest["sha256"].to_numpy(),
        "cluster": labels, "distance": dist})], ignore_index=True)
    write_parquet(join(run_dir, "assignments.parquet"), assignments, so)
    write_parquet(join(run_dir, "rejected.parquet"),
                  pd.concat([rejected, new_rejected], ignore_index=True).drop_duplicates("path"), so)
    write_parquet(join(run_dir, "duplicates.parquet"),
                  pd.concat([duplicates, dups], ignore_index=True).drop_duplicates("path"), so)
    write_json(join(run_dir, "clusters.json"), cluster_summaries(assignments), so)
    write_parquet(join(run_dir, "manifest.parquet"), pd.concat([manifest, new_manifest], ignore_index=True), so)
    summary.update(accepted=len(new_manifest), rejected=len(new_rejected), duplicates=len(dups),
                   clusters=np.bincount(labels, minlength=len(run.get("quality", {}).get("cluster_sizes", []))).tolist(),
                   seconds=round(time.perf_counter() - t0, 3))
    run.setdefault("assign_runs", []).append(summary)
    write_json(join(run_dir, "run.json"), run, so)
    logger.info("assign: %d new files: %d accepted, %d rejected, %d duplicates", summary["new"],
                summary["accepted"], summary["rejected"], summary["duplicates"])
    return summary


@task(name="assign-new", retries=1, retry_delay_seconds=5)
def assign_task(run_dir: str, source: str, storage_options: dict[str, Any], address: str) -> dict[str, Any]:
    with Client(address, set_as_default=False) as client:
        return assign_new(run_dir, source, storage_options, client)
