"""A self-contained HTML report of a run: what people look at to judge clusters.

Thumbnails are packed into one grid PNG per cluster (never one file per image), charts are
matplotlib PNGs, every picture is an ``<img>`` with ``alt`` text and a relative ``src``.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import numpy as np

from imgclust.curation import Curation
from imgclust.io.arrays import open_array, read_rows
from imgclust.io.storage import open_fs, read_json, with_retries, write_bytes_atomic
from imgclust.members import MemberLayout, write_members
from imgclust.progress import track
from imgclust.report.figures import (
    NEAREST_IN_GRID,
    charts,
    grid,
    grid_positions,
    map_2d,
    png_bytes,
    prototype_and_attention,
    reconstructions,
    to_rgb_thumbs,
)
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore

logger = logging.getLogger("imgclust")
MAP_SAMPLE = 2000
PROTOTYPE_SAMPLE = 2000  # members whose mean code is decoded into a cluster's prototype
MEAN_IMAGE_SAMPLE = 500  # members averaged into the prototype of an encoder without a decoder


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{f" class={cls!r}" if cls else ""}>'


APP = "http://127.0.0.1:8000"  # where `imgclust serve RUN` listens by default


def render_html(run: dict[str, Any], clusters: list[dict[str, Any]], metrics: dict[str, Any] | None,
                reclustered: list[int] | None = None, curation: Curation | None = None) -> str:
    """The report's index.html; with ``curation``, clusters carry their given names and merges."""
    curation = curation or Curation()
    q = run.get("quality", {})
    counts = run.get("counts", {})
    signals = [("images", counts.get("accepted")), ("clusters", counts.get("clusters")),
               ("rejected", counts.get("rejected")), ("duplicates", counts.get("duplicates")),
               ("reconstruction MSE", q.get("reconstruction_mse")), ("silhouette (sample)", q.get("silhouette_sample")),
               ("size balance (1 = equal)", q.get("size_balance"))]
    signals = [(k, v) for k, v in signals if v is not None or k != "reconstruction MSE"]  # no decoder: no MSE
    if metrics:
        signals += [("accuracy (Hungarian)", metrics.get("accuracy")), ("NMI", metrics.get("nmi")),
                    ("ARI", metrics.get("ari")), ("purity", metrics.get("purity"))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in signals)
    nav = " ".join(f'<a href="#cluster-{c["id"]}">{c["id"]}</a>' for c in clusters)
    decoded = q.get("reconstruction_mse") is not None
    proto_text = ("Prototype (the cluster's mean code, decoded), then members with their attention maps." if decoded
                  else "Prototype (the mean of the members' pixels: this encoder has no decoder), then members "
                  "with their attention maps where the encoder has a feature map.")
    sections = []
    for c in clusters:
        cid = c["id"]
        near = "".join(f"<li>{html.escape(p)}</li>" for p in c["nearest"][:9])
        sub = (f'<p><a href="recluster-{cid}.html">Cluster {cid} re-clustered</a></p>'
               if cid in (reclustered or []) else "")
        named = f": {html.escape(curation.names[cid])}" if cid in curation.names else ""
        merged = (f' <small>(merged into <a href="#cluster-{curation.target(cid)}">cluster {curation.target(cid)}</a>)'
                  '</small>' if curation.target(cid) != cid else "")
        if cid in curation.splits:
            merged += (' <small>(split into clusters ' + ", ".join(
                f'<a href="{APP}/cluster/{p}">{p}</a>' for p in curation.splits[cid]) + ' in the app)</small>')
        app = f'<p><a href="{APP}/cluster/{curation.target(cid)}">Every member, in order of distance, in the app</a></p>'
        sections.append(
            f'<section id="cluster-{cid}"><h2>Cluster {cid}{named} <small>{c["size"]} images</small>{merged}</h2>'
            f'{app}{sub}'
            f'<p>Top rows: the {NEAREST_IN_GRID} images closest to the centre; last row: random members.</p>'
            f'{_img(f"cluster-{cid}.png", f"sample images of cluster {cid}", "grid")}'
            f'<p>{proto_text}</p>'
            f'{_img(f"cluster-{cid}-prototype.png", f"prototype and attention maps of cluster {cid}")}'
            f'<details><summary>Paths closest to the centre</summary><ol>{near}</ol></details></section>')
    cfg = run.get("config", {})
    loss = _img("loss.png", "training loss by optimiser step") if run.get("train_loss") else ""
    rec = ('<h2>Reconstructions</h2><p>Originals (top) and the autoencoder\'s reconstructions (bottom).</p>'
           + _img("reconstructions.png", "original images above their reconstructions")) if decoded else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>imgclust report: {html.escape(str(cfg.get('source', '')))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222}}
img{{max-width:100%;image-rendering:pixelated}} table{{border-collapse:collapse}} th,td{{padding:2px 10px;text-align:left}}
section{{border-top:1px solid #ccc;margin-top:1.5rem}} nav a{{margin-right:.4rem}} small{{color:#666;font-weight:normal}}
.charts img{{max-height:340px;margin-right:1rem}}
</style></head><body>
<h1>Clusters of {html.escape(str(cfg.get('source', '')))}</h1>
<p>Preset <b>{html.escape(str(cfg.get('preset')))}</b>, seed {html.escape(str(cfg.get('seed')))},
output {html.escape(str(cfg.get('output')))}.</p>
<table>{rows}</table>
<p>To page through every member of every cluster, search for similar images and rename, merge or correct clusters:
<code>imgclust serve {html.escape(str(cfg.get('output', 'RUN')))}</code>, then open <a href="{APP}/">{APP}/</a>.</p>
<div class="charts">{_img("sizes.png", "bar chart of cluster sizes")}{loss}</div>
{_img("map.png", "2-D map of a sample of the clustered features coloured by cluster")}
{rec}
<nav>Clusters: {nav}</nav>
{''.join(sections)}
</body></html>
"""


def write_report(store: RunStore, seed: int = 0, run: dict[str, Any] | None = None) -> str:
    """Write ``RUN/report/``; returns the URL of index.html.

    ``run`` is the run record when the flow reports before writing run.json (which marks the run
    finished); otherwise run.json is read. Members come from the run's members layout
    (``imgclust.members``) a few row groups at a time: the report holds samples, never a table of
    all images.
    """
    so = store.storage_options
    run = run if run is not None else read_json(store.run_record, so)
    clusters = read_json(store.clusters, so)
    layout = members_layout(store)
    images = open_array(store.images, so)
    codes = open_array(store.codes, so)
    model = RunModel.load(Location(store.model, so))
    autoencoder = model.autoencoder
    decodes = getattr(autoencoder, "has_decoder", True)
    for c in track(clusters, total=len(clusters), desc="report", unit="cluster"):
        near, rand = grid_members(layout, c["id"], seed)
        idx = np.concatenate([near, rand]).astype(np.int64)
        write_bytes_atomic(store.report_file(f"cluster-{c['id']}.png"),
                           png_bytes(grid(to_rgb_thumbs(read_rows(images, idx)))), so)
        sampled = member_sample(layout, c["id"], seed, PROTOTYPE_SAMPLE)
        mean_image = None if decodes else read_rows(images, sampled[:MEAN_IMAGE_SAMPLE]).mean(0).round().astype(np.uint8)
        strip = prototype_and_attention(autoencoder, read_rows(codes, sampled) if decodes else codes[:0],
                                        read_rows(images, idx[:4]), mean_image)
        write_bytes_atomic(store.report_file(f"cluster-{c['id']}-prototype.png"), png_bytes(strip), so)
    n = layout.rows
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(8, n), replace=False))
    if decodes:
        shown = layout.at(pick, ["index"])["index"].to_numpy(np.int64)
        write_bytes_atomic(store.report_file("reconstructions.png"),
                           png_bytes(reconstructions(autoencoder, read_rows(images, shown))), so)
    positions = np.sort(np.random.default_rng(seed).choice(n, size=min(MAP_SAMPLE, n), replace=False))
    sample = layout.at(positions, ["index", "cluster"]).sort_values("index", kind="stable")
    features = open_array(store.work("features.zarr"), so)
    sample = sample[sample["index"] < features.shape[0]]  # images added by assign have no run features
    xy = map_2d(read_rows(features, sample["index"].to_numpy(np.int64)), seed)
    labels = sample["cluster"].to_numpy()
    embedded = model.code_space is not None and model.code_space.embedding is not None
    features = "UMAP features" if embedded or run.get("resolved", {}).get("embedding") == "umap" else "codes"
    pictures = charts([c["size"] for c in clusters], run.get("train_loss", []), xy, labels,
                      model.spec.get("loss_kinds"), features, int(model.spec.get("round_steps", 1)))
    for name, data in pictures.items():
        write_bytes_atomic(store.report_file(name), data, so)
    return render_index(store, run)


def members_layout(store: RunStore) -> MemberLayout:
    """The run's members layout; a run made before layouts gets one, written once from its tables."""
    layout = MemberLayout.open(store)
    if layout is None:
        assignments = store.read_table("assignments")
        write_members(store, assignments, image_rows(store, assignments), store.generations[1])
        layout = MemberLayout.open(store)
        assert layout is not None
    return layout


def grid_members(layout: MemberLayout, cluster: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """images.zarr rows (int64) of the grid's images of ``cluster`` (``grid_positions``: the nearest
    its centre, then random others in order of distance), read from ``layout``."""
    first, size = layout.clusters.get(cluster, (0, 0))
    near, rand = grid_positions(size, cluster, seed)
    return (layout.read(first, first + len(near))["index"].to_numpy(np.int64),
            layout.at(first + rand, ["index"])["index"].to_numpy(np.int64))


def member_sample(layout: MemberLayout, cluster: int, seed: int, limit: int) -> np.ndarray:
    """Sorted images.zarr rows of up to ``limit`` members of ``cluster``: all of a cluster that
    small, else the members of randomly chosen whole row groups of its span (each a band of
    distances), so that a cluster of millions costs a few row groups, not a scan."""
    first, size = layout.clusters.get(cluster, (0, 0))
    if size <= limit:
        return np.sort(layout.read(first, first + size)["index"].to_numpy(np.int64))
    per = layout.rows_per_group
    groups = np.arange(first // per, (first + size - 1) // per + 1)
    rng = np.random.default_rng(seed + cluster)
    taken: list[np.ndarray] = []
    for g in rng.permutation(groups).tolist():
        a, b = max(first, g * per), min(first + size, (g + 1) * per)
        taken.append(layout.read(a, b)["index"].to_numpy(np.int64))
        if sum(len(t) for t in taken) >= limit:
            break
    rows = np.concatenate(taken)
    return np.sort(rng.choice(rows, size=limit, replace=False))


def image_rows(store: RunStore, assignments: Any) -> np.ndarray:
    """The images.zarr row of each assignments row (through the manifest's ``index``)."""
    manifest = store.read_table("manifest")
    index_of = dict(zip(manifest["path"], manifest["index"]))
    return assignments["path"].map(index_of).to_numpy(np.int64)


def render_index(store: RunStore, run: dict[str, Any] | None = None) -> str:
    """(Re)write index.html only: after ``imgclust evaluate`` it shows the metrics too."""
    so = store.storage_options
    run = run if run is not None else read_json(store.run_record, so)
    clusters = read_json(store.clusters, so)
    try:
        metrics = read_json(store.metrics, so)
    except FileNotFoundError:
        metrics = None
    fs, root = open_fs(store.report, so)
    pages = with_retries(fs.glob, f"{root}/recluster-*.html") if with_retries(fs.exists, root) else []
    reclustered = sorted(int(p.rsplit("-", 1)[1].split(".")[0]) for p in pages)
    url = store.report_file("index.html")
    write_bytes_atomic(url, render_html(run, clusters, metrics, reclustered, Curation.of(store)).encode(), so)
    logger.info("report: %s", url)
    return url
