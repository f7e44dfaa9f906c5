"""Explorations of a finished run: nearest neighbours of an image, and re-clustering one cluster."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client
from prefect import task

from imgclust.imagefile import ImageRejected, decode_image
from imgclust.progress import track
from imgclust.storage import (
    join,
    open_fs,
    read_json,
    read_parquet,
    write_bytes_atomic,
    write_json,
    write_parquet,
)
from imgclust.zarr_store import chunk_spans, create_array, open_array
from tasks.cluster import cluster_codes, load_cluster_model
from tasks.publish import cluster_summaries
from tasks.report import _png, _rows, cluster_members, grid, to_rgb_thumbs

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class Neighbour:
    path: str
    distance: float


def query_code(run_dir: str, image: str, storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Code of ``image``: a path of the run (relative to its source) or an image file anywhere.

    Returns (code, pixels, manifest index or None).
    """
    so = storage_options or {}
    manifest = read_parquet(join(run_dir, "manifest.parquet"), so)
    images = open_array(join(run_dir, "images.zarr"), so)
    codes = open_array(join(run_dir, "codes.zarr"), so)
    hit = manifest.index[manifest["path"] == image.replace("\\", "/")]
    if len(hit):
        i = int(manifest.loc[hit[0], "index"])
        return codes[i].astype(np.float64), images[i], i
    from tasks.encode import encode_array
    from tasks.train import load_model

    fs, path = open_fs(image, so)
    if not fs.exists(path):
        raise FileNotFoundError(f"{image} is neither a path of the run nor a readable file")
    attrs = dict(images.attrs)
    try:
        pixels = decode_image(fs.cat(path), (attrs["height"], attrs["width"]), attrs["color"] == "gray",
                              attrs.get("fit", "crop")).pixels
    except ImageRejected as exc:
        raise ValueError(f"{image}: {exc}") from None
    model = load_model(join(run_dir, "model"), so)
    code, _, _ = encode_array(model, pixels[None], 1)
    return code[0].astype(np.float64), pixels, None


def nearest_neighbours(run_dir: str, image: str, k: int = 5, storage_options: dict[str, Any] | None = None,
                       strip_url: str | None = None) -> list[Neighbour]:
    """The ``k`` images of the run closest to ``image`` by Euclidean distance of standardised codes.

    The standardisation is the clustering's own (saved in model/clusterer.pkl). Streams the codes
    chunk by chunk, so it works on runs far larger than memory. Writes a PNG strip
    (query, then neighbours) to ``strip_url`` (default ``RUN_DIR/neighbors/<name>.png``).
    """
    so = storage_options or {}
    codes = open_array(join(run_dir, "codes.zarr"), so)
    manifest = read_parquet(join(run_dir, "manifest.parquet"), so)
    clusterer = load_cluster_model(join(run_dir, "model", "clusterer.pkl"), so)
    mu, sd = clusterer.mean, clusterer.std
    q, qpix, self_index = query_code(run_dir, image, so)
    q = (q - mu) / sd
    best_d, best_i = np.full(0, np.inf), np.zeros(0, dtype=np.int64)
    spans = chunk_spans(codes.shape[0], codes.chunks[0])
    for a, b in track(spans, total=len(spans), desc="neighbors", unit="chunk"):
        d = np.sqrt((((codes[a:b] - mu) / sd - q) ** 2).sum(1))
        idx = np.arange(a, b)
        if self_index is not None and a <= self_index < b:
            d[self_index - a] = np.inf
        best_d, best_i = np.concatenate([best_d, d]), np.concatenate([best_i, idx])
        keep = np.argsort(best_d, kind="stable")[:k]
        best_d, best_i = best_d[keep], best_i[keep]
    found = [Neighbour(str(manifest.loc[manifest["index"] == i, "path"].iloc[0]), float(dist))
             for i, dist in zip(best_i, best_d) if np.isfinite(dist)]
    images = open_array(join(run_dir, "images.zarr"), so)
    strip = grid(to_rgb_thumbs(np.concatenate([qpix[None], _rows(images, np.sort(best_i))[np.argsort(np.argsort(best_i))]]), 96),
                 cols=len(found) + 1, pad=4)
    name = posixpath.splitext(posixpath.basename(image))[0] or "query"
    write_bytes_atomic(strip_url or join(run_dir, "neighbors", f"{name}.png"), _png(strip), so)
    return found


@dataclass(frozen=True)
class Reclustered:
    directory: str
    sizes: list[int]
    report_url: str


def recluster(run_dir: str, cluster: int, n_clusters: int | None, seed: int, storage_options: dict[str, Any],
              client: Client) -> Reclustered:
    """Cluster the members of one cluster again; results under ``RUN_DIR/recluster/cluster-<c>/``."""
    so = storage_options
    assignments = read_parquet(join(run_dir, "assignments.parquet"), so)
    members = np.flatnonzero(assignments["cluster"].to_numpy() == cluster)
    if len(members) == 0:
        known = sorted(set(assignments["cluster"].tolist()))
        raise ValueError(f"cluster {cluster} does not exist; the run has clusters {known[0]}..{known[-1]}")
    if n_clusters is not None and n_clusters > len(members):
        raise ValueError(f"n_clusters={n_clusters} is larger than cluster {cluster}'s {len(members)} images")
    if len(members) < 3:
        raise ValueError(f"cluster {cluster} has only {len(members)} images: nothing to split")
    run = read_json(join(run_dir, "run.json"), so)
    out = join(run_dir, "recluster", f"cluster-{cluster}")
    codes = open_array(join(run_dir, "codes.zarr"), so)
    sub_url = join(out, "_work", "codes.zarr")
    create_array(sub_url, (len(members), codes.shape[1]), codes.chunks[0], "float32", so)[:] = _rows(codes, members)
    embedding = run.get("resolved", {}).get("embedding", "none")
    res = cluster_codes(sub_url, out, so, n_clusters, embedding, seed, client)
    labels = open_array(res.labels_url, so)[:]
    dist = open_array(res.distances_url, so)[:]
    sub = pd.DataFrame({"path": assignments["path"].to_numpy()[members], "sha256": assignments["sha256"].to_numpy()[members],
                        "cluster": cluster, "subcluster": labels.astype(np.int64), "distance": dist.astype(np.float64)})
    write_parquet(join(out, "assignments.parquet"), sub, so)
    summaries = cluster_summaries(sub.rename(columns={"cluster": "parent", "subcluster": "cluster"}))
    write_json(join(out, "clusters.json"), summaries, so)
    report_url = _recluster_report(run_dir, cluster, sub, members, summaries, seed, so)
    logger.info("recluster: cluster %d (%d images) -> %d subclusters", cluster, len(members), len(summaries))
    return Reclustered(out, [s["size"] for s in summaries], report_url)


def _recluster_report(run_dir: str, cluster: int, sub: pd.DataFrame, members: np.ndarray,
                      summaries: list[dict[str, Any]], seed: int, so: dict[str, Any]) -> str:
    """``report/recluster-<c>.html``: one grid per subcluster, linked from nowhere else but stable."""
    images = open_array(join(run_dir, "images.zarr"), so)
    local = sub.rename(columns={"cluster": "parent", "subcluster": "cluster"}).reset_index(drop=True)
    parts = []
    for s in summaries:
        near, rand = cluster_members(local, s["id"], seed)
        idx = members[np.concatenate([near, rand]).astype(int)]
        name = f"recluster-{cluster}-{s['id']}.png"
        write_bytes_atomic(join(run_dir, "report", name), _png(grid(to_rgb_thumbs(_rows(images, np.sort(idx))))), so)
        parts.append(f'<section id="subcluster-{s["id"]}"><h2>Subcluster {cluster}.{s["id"]} <small>{s["size"]} '
                     f'images</small></h2><img src="{name}" alt="sample images of subcluster {cluster}.{s["id"]}">'
                     '</section>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Cluster {cluster} re-clustered</title>'
            '<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px}img{max-width:100%;'
            'image-rendering:pixelated}section{border-top:1px solid #ccc}small{color:#666}</style></head><body>'
            f'<h1>Cluster {cluster} re-clustered into {len(summaries)}</h1><p><a href="index.html#cluster-{cluster}">'
            f'back to cluster {cluster}</a></p>{"".join(parts)}</body></html>')
    url = join(run_dir, "report", f"recluster-{cluster}.html")
    write_bytes_atomic(url, page.encode(), so)
    from tasks.report import render_index

    render_index(run_dir, so)  # the cluster's section now links to its split
    return url


@task(name="recluster", retries=1, retry_delay_seconds=5)
def recluster_task(run_dir: str, cluster: int, n_clusters: int | None, seed: int, storage_options: dict[str, Any],
                   address: str) -> Reclustered:
    with Client(address, set_as_default=False) as client:
        return recluster(run_dir, cluster, n_clusters, seed, storage_options, client)

