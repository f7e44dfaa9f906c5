"""Explorations of a finished run: nearest neighbours of an image, and re-clustering one cluster."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from imgclust.codeindex import CodeIndex
from imgclust.curation import Curation, add_edit
from imgclust.io.arrays import chunk_spans, create_array, open_array, read_rows
from imgclust.io.imagefile import ImageRejected
from imgclust.io.storage import open_fs, read_json, with_retries, write_bytes_atomic, write_json
from imgclust.members import write_members
from imgclust.progress import track
from imgclust.report.build import image_rows, render_index
from imgclust.report.figures import cluster_members, grid, png_bytes, to_rgb_thumbs
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.cluster import ClusterSettings, cluster_codes
from imgclust.stages.ingest import PixelSpec
from imgclust.stages.publish import cluster_summaries

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class Neighbour:
    path: str
    distance: float


def query_code(store: RunStore, model: RunModel, image: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Code (D,) of ``image``: a path of the run (relative to its source) or an image file anywhere,
    decoded and encoded as the run's images were.

    Returns (code, pixels (C, H, W), manifest index or None).
    """
    so = store.storage_options
    manifest = store.read_table("manifest")
    images = open_array(store.images, so)
    codes = open_array(store.codes, so)
    hit = manifest.index[manifest["path"] == image.replace("\\", "/")]
    if len(hit):
        i = int(manifest.loc[hit[0], "index"])
        return codes[i].astype(np.float64), images[i], i
    fs, path = open_fs(image, so)
    if not with_retries(fs.exists, path):
        raise FileNotFoundError(f"{image} is neither a path of the run nor a readable file")
    spec = PixelSpec.of_images(dict(images.attrs))
    try:
        pixels = spec.decode(with_retries(fs.cat_file, path)).pixels
    except ImageRejected as exc:
        raise ValueError(f"{image}: {exc}") from None
    return model.encode(pixels[None], 1)[0].astype(np.float64), pixels, None


def nearest_neighbours(store: RunStore, image: str, k: int = 5, strip_url: str | None = None) -> list[Neighbour]:
    """The ``k`` images of the run closest to ``image`` by Euclidean distance of standardised codes.

    The standardisation is the clustering's own (the run's model). The run's code index
    (``imgclust.codeindex``) is searched, and the rows ``assign`` added after it are compared one by
    one; a run made without an index is scanned chunk by chunk. Writes a PNG strip (query, then neighbours)
    to ``strip_url`` (default ``RUN/neighbors/<name>.png``).
    """
    so = store.storage_options
    codes = open_array(store.codes, so)
    manifest = store.read_table("manifest", ["path", "index"]).drop_duplicates("index", keep="last")
    model = RunModel.load(Location(store.model, so))
    q, qpix, self_index = query_code(store, model, image)
    q = model.standardise(q[None])[0]
    path_at = manifest.set_index("index")["path"]
    index = CodeIndex.open(store)
    start, spare = 0, k + 8  # spare: rows no manifest row points at (replaced by assign) are not images
    best_d, best_i = np.full(0, np.inf), np.zeros(0, dtype=np.int64)
    if index is not None:  # the index's nearest lists, then the rows added after it, one by one
        best_d, best_i = index.search(q[None], spare, exclude=np.array([-1 if self_index is None else self_index]))
        best_d, best_i = best_d[0].astype(np.float64), best_i[0]
        start = index.rows
    spans = [(start + a, start + b) for a, b in chunk_spans(codes.shape[0] - start, codes.chunks[0])]
    for a, b in track(spans, total=len(spans), desc="neighbors", unit="chunk"):
        d = np.sqrt(((model.standardise(codes[a:b]) - q) ** 2).sum(1))
        if self_index is not None and a <= self_index < b:
            d[self_index - a] = np.inf
        best_d, best_i = np.concatenate([best_d, d]), np.concatenate([best_i, np.arange(a, b)])
        keep = np.argsort(best_d, kind="stable")[:spare]
        best_d, best_i = best_d[keep], best_i[keep]
    listed = np.isfinite(best_d) & (best_i >= 0) & np.isin(best_i, path_at.index.to_numpy())
    best_d, best_i = best_d[listed][:k], best_i[listed][:k]
    found = [Neighbour(str(path_at[int(i)]), float(dist)) for i, dist in zip(best_i, best_d)]
    images = open_array(store.images, so)
    rows = read_rows(images, best_i)  # in the order of best_i
    strip = grid(to_rgb_thumbs(np.concatenate([qpix[None], rows]), 96), cols=len(found) + 1, pad=4)
    name = posixpath.splitext(posixpath.basename(image))[0] or "query"
    write_bytes_atomic(strip_url or store.neighbors_file(f"{name}.png"), png_bytes(strip), so)
    return found


@dataclass(frozen=True)
class Reclustered:
    directory: str
    sizes: list[int]
    report_url: str


def recluster(store: RunStore, cluster: int, n_clusters: int | None, seed: int, client: Client,
              dest: RunStore | None = None) -> Reclustered:
    """Cluster the members of one cluster again; results under ``RUN/recluster/cluster-<c>/`` and
    the report's ``recluster-<c>.html``, or (a curation split) under ``dest`` with no report page."""
    so = store.storage_options
    assignments = store.read_table("assignments")
    members = np.flatnonzero(assignments["cluster"].to_numpy() == cluster)
    if len(members) == 0:
        known = sorted(set(assignments["cluster"].tolist()))
        raise ValueError(f"cluster {cluster} does not exist; the run has clusters {known[0]}..{known[-1]}")
    if n_clusters is not None and n_clusters > len(members):
        raise ValueError(f"n_clusters={n_clusters} is larger than cluster {cluster}'s {len(members)} images")
    if len(members) < 3:
        raise ValueError(f"cluster {cluster} has only {len(members)} images: nothing to split")
    run = read_json(store.run_record, so)
    sub = dest or store.recluster(cluster)
    codes = open_array(store.codes, so)
    sub_codes = Location(sub.work("codes.zarr"), so)
    rows = image_rows(store, assignments)[members]
    order = np.argsort(rows, kind="stable")
    subset = np.empty((len(members), codes.shape[1]), np.float32)
    subset[order] = read_rows(codes, rows[order])
    create_array(sub_codes.url, subset.shape, codes.chunks[0], "float32", so)[:] = subset
    embedding = run.get("resolved", {}).get("embedding", "none")
    fit = cluster_codes(sub_codes, sub, ClusterSettings(n_clusters, embedding, seed), client)
    RunModel(None, {}, fit.code_space, fit.placement).save(Location(sub.model, so))
    res = fit.clustering
    labels = open_array(res.labels_url, so)[:]
    dist = open_array(res.distances_url, so)[:]
    table = pd.DataFrame({"path": assignments["path"].to_numpy()[members],
                          "sha256": assignments["sha256"].to_numpy()[members], "cluster": cluster,
                          "subcluster": labels.astype(np.int64), "distance": dist.astype(np.float64),
                          "index": rows.astype(np.int64)})
    sub.write_table("assignments", table)
    summaries = cluster_summaries(table.rename(columns={"cluster": "parent", "subcluster": "cluster"}))
    write_json(sub.clusters, summaries, so)
    report_url = "" if dest is not None else _recluster_report(store, cluster, table, rows, summaries, seed)
    logger.info("recluster: cluster %d (%d images) -> %d subclusters", cluster, len(members), len(summaries))
    return Reclustered(sub.url, [s["size"] for s in summaries], report_url)


def _recluster_report(store: RunStore, cluster: int, table: pd.DataFrame, rows: np.ndarray,
                      summaries: list[dict[str, Any]], seed: int) -> str:
    """``report/recluster-<c>.html``: one grid per subcluster (``rows``: images.zarr row of each
    member), linked from the cluster's section."""
    so = store.storage_options
    images = open_array(store.images, so)
    local = table.rename(columns={"cluster": "parent", "subcluster": "cluster"}).reset_index(drop=True)
    parts = []
    for s in summaries:
        near, rand = cluster_members(local, s["id"], seed)
        idx = rows[np.concatenate([near, rand]).astype(int)]
        name = f"recluster-{cluster}-{s['id']}.png"
        write_bytes_atomic(store.report_file(name), png_bytes(grid(to_rgb_thumbs(read_rows(images, np.sort(idx))))), so)
        parts.append(f'<section id="subcluster-{s["id"]}"><h2>Subcluster {cluster}.{s["id"]} <small>{s["size"]} '
                     f'images</small></h2><img src="{name}" alt="sample images of subcluster {cluster}.{s["id"]}">'
                     '</section>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Cluster {cluster} re-clustered</title>'
            '<style>body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px}img{max-width:100%;'
            'image-rendering:pixelated}section{border-top:1px solid #ccc}small{color:#666}</style></head><body>'
            f'<h1>Cluster {cluster} re-clustered into {len(summaries)}</h1><p><a href="index.html#cluster-{cluster}">'
            f'back to cluster {cluster}</a></p>{"".join(parts)}</body></html>')
    url = store.report_file(f"recluster-{cluster}.html")
    write_bytes_atomic(url, page.encode(), so)
    render_index(store)  # the cluster's section now links to its split
    return url



def split_cluster(store: RunStore, cluster: int, n_parts: int | None, seed: int, client: Client,
                  who: str | None = None) -> dict[str, Any]:
    """Split one of the model's clusters by curation: re-cluster its members (``n_parts``, or a
    k chosen by silhouette), lay the parts out for paging (``RUN/curation/splits/cluster-<c>/``),
    then append the ``split`` edit. Nothing retrains; the run's lease is held only for the append.

    Returns the stored edit (``into``: the parts' ids, the cluster's own first; ``sizes``).
    """
    so = store.storage_options
    model_ids = {int(c["id"]) for c in read_json(store.clusters, so)}
    cur = Curation.of(store)
    first_new = max(cur.units(model_ids)) + 1
    cur.check({"action": "split", "cluster": cluster, "into": [cluster, first_new]}, model_ids)  # fail before work
    dest = store.split(cluster)
    res = recluster(store, cluster, n_parts, seed, client, dest=dest)
    into = [cluster] + list(range(first_new, first_new + len(res.sizes) - 1))
    table = dest.read_table("assignments", ["path", "subcluster", "distance", "index"])
    parts = table.assign(cluster=np.asarray(into, np.int64)[table["subcluster"].to_numpy(np.int64)])
    write_members(dest, parts, parts["index"].to_numpy(np.int64), 0)
    cohesion = parts.groupby("cluster")["distance"].mean()
    stored = add_edit(store, {"action": "split", "cluster": cluster, "into": into, "sizes": res.sizes,
                              "cohesion": [float(cohesion.get(c, 0.0)) for c in into]}, who=who)
    logger.info("split: cluster %d (%d images) -> clusters %s of sizes %s", cluster, sum(res.sizes), into, res.sizes)
    return stored
