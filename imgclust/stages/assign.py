"""Incremental runs: place images that are new to a finished run into its existing clusters."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from imgclust.io.arrays import open_array
from imgclust.io.storage import read_json, read_parquet, remove, write_json, write_parquet
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import hash_files, list_source, split_duplicates
from imgclust.stages.encode import encode
from imgclust.stages.ingest import PixelSpec, compact_into, decode_into_staging, manifest_rows
from imgclust.stages.publish import cluster_summaries

logger = logging.getLogger("imgclust")


def assign_new(store: RunStore, source: Location, client: Client) -> dict[str, Any]:
    """Ingest, encode and assign only files whose content the run has never seen.

    A file is known when its sha256 is in the manifest, the rejected or the duplicates table (an
    unreadable file, which has no hash, when its path is already rejected). Duplicates within the
    new batch are handled as in a run. Zarr rows are written first and the manifest last, and every
    table is cut back to the manifest before appending, so a crash at any point is repaired by the
    next call instead of leaving duplicated or half-written rows.
    """
    t0 = time.perf_counter()
    so = store.storage_options
    run = read_json(store.run_record, so)
    manifest = read_parquet(store.manifest, so)
    rejected = read_parquet(store.rejected, so)
    duplicates = read_parquet(store.duplicates, so)
    if "sha256" not in rejected.columns:
        rejected["sha256"] = None
    known = set(manifest["sha256"]) | set(rejected["sha256"].dropna()) | set(duplicates["sha256"])
    fs, root = source.fs()
    listing = list_source(source)
    hashed = hash_files(fs, root, listing.paths, client)
    refused = pd.DataFrame(listing.refused, columns=["path", "reason"]).assign(sha256=None)
    unreadable = pd.concat([hashed.loc[hashed["sha256"].isna(), ["path", "reason"]], refused[["path", "reason"]]],
                           ignore_index=True)
    unreadable = unreadable[~unreadable["path"].isin(set(rejected["path"]))]
    fresh = hashed[hashed["sha256"].notna() & ~hashed["sha256"].isin(known)]
    unique, dups = split_duplicates(fresh[["path", "sha256", "gray"]])
    summary = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "source": source.url,
               "files": len(listing), "new": len(unique) + len(dups) + len(unreadable)}
    if summary["new"] == 0:
        logger.info("assign: nothing new among %d files", len(listing))
        return {**summary, "accepted": 0, "rejected": 0, "duplicates": 0, "seconds": round(time.perf_counter() - t0, 3)}

    images = open_array(store.images, so, mode="r+")
    pixels = PixelSpec.of_images(dict(images.attrs))
    n_old = len(manifest)
    staging = Location(store.work("assign-staging.zarr"), so)
    info, _ = decode_into_staging(source, unique["path"].tolist(), staging, pixels, images.chunks[0], client)
    accepted_rows = np.flatnonzero(info["ok"].to_numpy(bool))
    images.resize((n_old + len(accepted_rows), *images.shape[1:]))
    compact_into(staging, Location(store.images, so), accepted_rows, n_old, client)
    remove(staging.url, so)

    model = RunModel.load(Location(store.model, so))
    batch_size = int(run.get("config", {}).get("batch_size", 256))
    encode(store, model.ref, batch_size, client, start=n_old)
    new = slice(n_old, n_old + len(accepted_rows))
    labels, dist = model.predict(open_array(store.images, so)[new], open_array(store.codes, so)[new])

    new_manifest, new_rejected = manifest_rows(unique, info, n_old)
    new_rejected = pd.concat([new_rejected, unreadable[["path", "reason"]].assign(sha256=None)], ignore_index=True)
    assignments = read_parquet(store.assignments, so).iloc[:n_old]
    assignments = pd.concat([assignments, pd.DataFrame({
        "path": new_manifest["path"].to_numpy(), "sha256": new_manifest["sha256"].to_numpy(),
        "cluster": labels, "distance": dist})], ignore_index=True)
    write_parquet(store.assignments, assignments, so)
    write_parquet(store.rejected, pd.concat([rejected, new_rejected], ignore_index=True).drop_duplicates("path"), so)
    write_parquet(store.duplicates, pd.concat([duplicates, dups], ignore_index=True).drop_duplicates("path"), so)
    write_json(store.clusters, cluster_summaries(assignments), so)
    write_parquet(store.manifest, pd.concat([manifest, new_manifest], ignore_index=True), so)
    summary.update(accepted=len(new_manifest), rejected=len(new_rejected), duplicates=len(dups),
                   clusters=np.bincount(labels, minlength=len(run.get("quality", {}).get("cluster_sizes", []))).tolist(),
                   seconds=round(time.perf_counter() - t0, 3))
    run.setdefault("assign_runs", []).append(summary)
    write_json(store.run_record, run, so)
    logger.info("assign: %d new files: %d accepted, %d rejected, %d duplicates", summary["new"],
                summary["accepted"], summary["rejected"], summary["duplicates"])
    return summary
