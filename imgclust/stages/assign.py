"""Incremental runs: place images that are new to a finished run into its existing clusters."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from imgclust.codeindex import CodeIndex, Standardiser, extend_index
from imgclust.dask_cluster import completed, torch_threads_by_worker
from imgclust.io.arrays import aligned_spans, open_array
from imgclust.io.storage import read_json, remove, write_json
from imgclust.io.tables import TABLES, drop_parts, read_parts
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import hash_files, list_source, split_duplicates
from imgclust.stages.encode import cached_model, encode
from imgclust.stages.ingest import PixelSpec, compact_into, decode_into_staging, manifest_rows, thumbs_of
from imgclust.stages.neighbours import NeighbourSettings
from imgclust.stages.publish import cluster_summaries, typical_kth
from imgclust.threads import torch_threads, worker_budget

logger = logging.getLogger("imgclust")


def assign_new(store: RunStore, source: Location, client: Client) -> dict[str, Any]:
    """Ingest, encode and assign the files of ``source`` the run does not hold as they are now.

    Every file found ends up in exactly one table. A file whose (path, content) the run already
    lists is left alone; a new path whose content the run holds is a duplicate of the manifest's
    path (or rejected for the reason that content was); a file edited in place, or once rejected
    and now readable, gets a new row that supersedes its old one. Duplicates within the new batch
    are handled as in a run. Everything this call writes to the tables is one new generation of
    parts, counted once ``run.json`` names it (written last), so a crash at any write leaves the
    run as it was and the next call does the work again.
    """
    t0 = time.perf_counter()
    so = store.storage_options
    run = read_json(store.run_record, so)
    base, committed = int(run.get("tables_base", 0)), int(run.get("tables_generation", 0))
    generation = committed + 1
    for name in TABLES:  # what a crashed call (or compaction) left counts for nothing: gone
        drop_parts(store.table(name), so, lambda g, _: not base <= g <= committed)
    now = store.tables()
    manifest, duplicates, rejected, assignments = now.manifest, now.duplicates, now.rejected, now.assignments
    if "sha256" not in rejected.columns:
        rejected["sha256"] = None
    held = (set(zip(manifest["path"], manifest["sha256"])) | set(zip(duplicates["path"], duplicates["sha256"]))
            | set(zip(rejected["path"], rejected["sha256"])))
    original_of = dict(zip(manifest["sha256"], manifest["path"]))
    reject_reason = dict(zip(rejected["sha256"].dropna(), rejected.loc[rejected["sha256"].notna(), "reason"]))

    fs, root = source.fs()
    listing = list_source(source)
    # A file whose path, size and modification time the tables hold is not read again.
    unchanged = {(p, s) for t in (manifest, duplicates, rejected) if "stamp" in t.columns
                 for p, s in zip(t["path"], t["stamp"])}
    to_read = [p for p, s in listing.files if (p, s) not in unchanged]
    hashed = hash_files(fs, root, to_read, client)
    hashed["stamp"] = hashed["path"].map(dict(listing.files))
    refused = pd.DataFrame(listing.refused, columns=["path", "reason"])
    unreadable = pd.concat([hashed.loc[hashed["sha256"].isna(), ["path", "reason", "stamp"]], refused],
                           ignore_index=True)
    unreadable = unreadable[~unreadable["path"].isin(set(rejected.loc[rejected["sha256"].isna(), "path"]))]
    readable = hashed[hashed["sha256"].notna()]
    fresh = readable.loc[np.array([(p, h) not in held for p, h in zip(readable["path"], readable["sha256"])],
                                  dtype=bool)]
    copies = fresh[fresh["sha256"].isin(original_of.keys()) & ~fresh["path"].isin(original_of.values())]
    known_bad = fresh[fresh["sha256"].isin(reject_reason.keys()) & ~fresh.index.isin(copies.index)]
    rest = fresh.drop(index=copies.index.union(known_bad.index))
    unique, dups = split_duplicates(rest[["path", "sha256", "gray", "stamp"]])
    dups = pd.concat([dups, copies[["path", "sha256", "stamp"]].assign(duplicate_of=copies["sha256"].map(original_of))],
                     ignore_index=True)
    summary = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "source": source.url,
               "files": len(listing), "read": len(to_read),
               "new": len(unique) + len(dups) + len(unreadable) + len(known_bad)}
    if summary["new"] == 0:
        logger.info("assign: nothing new among %d files (%d read)", len(listing), len(to_read))
        return {**summary, "accepted": 0, "rejected": 0, "duplicates": 0, "seconds": round(time.perf_counter() - t0, 3)}

    images = open_array(store.images, so, mode="r+")
    pixels = PixelSpec.of_images(dict(images.attrs))
    # Rows after the last committed one: those a crashed call wrote are written again.
    indices = read_parts(store.table("manifest"), so, committed, ["index"], base)["index"]
    start = int(indices.max()) + 1 if len(indices) else 0
    staging = Location(store.work("assign-staging.zarr"), so)
    info = decode_into_staging(source, unique["path"].tolist(), staging, pixels, images.chunks[0], client)
    accepted_rows = np.flatnonzero(info["ok"].to_numpy(bool))
    if pixels.thumbnail:
        thumbs = open_array(store.thumbs, so, mode="r+")
        thumbs.resize((start + len(accepted_rows), *thumbs.shape[1:]))
    images.resize((start + len(accepted_rows), *images.shape[1:]))
    compact_into(staging, Location(store.images, so), accepted_rows, start, client)
    remove(staging.url, so)
    remove(thumbs_of(staging).url, so)

    model = RunModel.load(Location(store.model, so))
    batch_size = int(run.get("config", {}).get("batch_size", 256))
    encode(store, model.ref, batch_size, client, start=start)
    new = slice(start, start + len(accepted_rows))
    labels, dist = predict_rows(store, model.token, new, client)

    new_manifest, new_rejected = manifest_rows(unique, info, start)
    new_rejected = pd.concat([new_rejected, unreadable.assign(sha256=None), known_bad[["path", "sha256", "stamp"]].assign(
        reason=known_bad["sha256"].map(reject_reason))], ignore_index=True)[["path", "reason", "sha256", "stamp"]]
    new_assignments = pd.DataFrame({"path": new_manifest["path"].to_numpy(), "sha256": new_manifest["sha256"].to_numpy(),
                                    "cluster": labels, "distance": dist})
    scale = Standardiser.of(model.code_space) if model.code_space is not None else None
    extension = f"added-{generation:05d}"
    if scale is not None:  # what an interrupted call added to the index goes first: scores see the run as committed
        extend_index(store, scale, new.start, new.start, extension)
    typical = typical_kth(read_json(store.clusters, so))
    if typical and "outlier" in assignments.columns:
        new_assignments["outlier"] = new_outlier_scores(store, model, new, labels, typical)
    if scale is not None:  # the new codes join the run's index (before the commit below)
        extend_index(store, scale, new.start, new.stop, extension)
    for name, rows in (("assignments", new_assignments), ("rejected", new_rejected), ("duplicates", dups),
                       ("manifest", new_manifest)):
        store.write_table(name, rows, generation)
    moved = set(new_manifest["path"]) | set(new_rejected["path"]) | set(dups["path"])
    after = pd.concat([assignments[~assignments["path"].isin(moved)], new_assignments], ignore_index=True)
    write_json(store.clusters, cluster_summaries(after, typical), so)
    summary.update(accepted=len(new_manifest), rejected=len(new_rejected), duplicates=len(dups),
                   clusters=np.bincount(labels, minlength=len(run.get("quality", {}).get("cluster_sizes", []))).tolist(),
                   generation=generation, seconds=round(time.perf_counter() - t0, 3))
    run.setdefault("assign_runs", []).append(summary)
    run["tables_generation"] = generation
    write_json(store.run_record, run, so)  # last: the commit of this generation
    logger.info("assign: %d new files: %d accepted, %d rejected, %d duplicates", summary["new"],
                summary["accepted"], summary["rejected"], summary["duplicates"])
    return summary


def predict_chunk(store: RunStore, token: str, start: int, stop: int,
                  threads: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster (n,) int64 and distance (n,) float64 of images.zarr rows [start, stop), on a worker,
    with the run's model (cached per worker under ``token``), from their pixels and codes."""
    so = store.storage_options
    model = cached_model(Location(store.model, so), token)
    with torch_threads(worker_budget(threads)):
        return model.predict(open_array(store.images, so)[start:stop], open_array(store.codes, so)[start:stop])


def predict_rows(store: RunStore, token: str, rows: slice, client: Client) -> tuple[np.ndarray, np.ndarray]:
    """Clusters and distances of the images.zarr ``rows`` added to a run, chunk by chunk on the
    workers: the flow's process receives two numbers an image, never the pixels or codes."""
    step = open_array(store.images, store.storage_options).chunks[0]
    spans = list(aligned_spans(rows.start, rows.stop, step))
    threads = torch_threads_by_worker(client)
    futures = {client.submit(predict_chunk, store, token, a, b, threads, pure=False): a for a, b in spans}
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for fut in completed(client, list(futures)):
        parts[futures[fut]] = fut.result()
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0)
    ordered = [parts[a] for a, _ in spans]
    return np.concatenate([p[0] for p in ordered]).astype(np.int64), np.concatenate([p[1] for p in ordered])


def new_outlier_scores(store: RunStore, model: RunModel, rows: slice, labels: np.ndarray,
                       typical: dict[int, float]) -> np.ndarray:
    """Outlier scores (N,) of images.zarr ``rows`` added to a run: the distance to their k-th
    nearest neighbour in the run's code index over their cluster's typical one (NaN without an index)."""
    index = CodeIndex.open(store)
    if index is None:
        return np.full(len(labels), np.nan)
    k = NeighbourSettings().k
    z = model.standardise(open_array(store.codes, store.storage_options)[rows])
    d, _ = index.search(z, k)
    kth = np.where(np.isfinite(d), d, -np.inf).max(1)
    scale = np.array([typical.get(int(c), np.nan) for c in labels])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(kth) & (scale > 0), kth / scale, np.nan)
