"""A self-contained HTML report of a run: what people look at to judge clusters.

Thumbnails are packed into one grid PNG per cluster (never one file per image), charts are
matplotlib PNGs, every picture is an ``<img>`` with ``alt`` text and a relative ``src``.
"""

from __future__ import annotations

import html
import io
import logging
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from prefect import task

from imgclust.progress import track
from imgclust.storage import join, open_fs, read_json, read_parquet, write_bytes_atomic
from imgclust.zarr_store import open_array

logger = logging.getLogger("imgclust")
NEAREST_IN_GRID, RANDOM_IN_GRID, THUMB = 16, 8, 64
MAP_SAMPLE = 2000


def _png(fig_or_image: Any) -> bytes:
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, "PNG", optimize=True)
    else:
        fig_or_image.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig_or_image)
    return buf.getvalue()


def to_rgb_thumbs(pixels: np.ndarray, size: int = THUMB) -> list[Image.Image]:
    """uint8 (N, C, H, W) -> RGB thumbnails whose longer side is ``size``."""
    out = []
    for p in pixels:
        im = Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0), "L" if p.shape[0] == 1 else "RGB")
        scale = size / max(im.size)
        out.append(im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                            Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR))
    return out


def grid(thumbs: list[Image.Image], cols: int = 8, pad: int = 2) -> Image.Image:
    """Pack thumbnails into one image, row by row."""
    if not thumbs:
        return Image.new("RGB", (THUMB, THUMB), "white")
    w, h = max(t.width for t in thumbs), max(t.height for t in thumbs)
    rows = -(-len(thumbs) // cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, t in enumerate(thumbs):
        sheet.paste(t, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return sheet


def cluster_members(assignments: pd.DataFrame, cluster: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows closest to the centre, and a few random other members (indices into the manifest)."""
    members = assignments.index[assignments["cluster"] == cluster].to_numpy()
    order = members[np.argsort(assignments.loc[members, "distance"].to_numpy(), kind="stable")]
    near = order[:NEAREST_IN_GRID]
    rest = order[NEAREST_IN_GRID:]
    rng = np.random.default_rng(seed + cluster)
    rand = np.sort(rng.choice(rest, size=min(RANDOM_IN_GRID, len(rest)), replace=False)) if len(rest) else rest
    return near, rand


def _rows(array: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a Zarr array, read chunk by chunk."""
    if len(idx) == 0:
        return np.zeros((0, *array.shape[1:]), array.dtype)
    return array.get_orthogonal_selection((np.asarray(idx),))


def prototype_and_attention(model: Any, codes: np.ndarray, pixels: np.ndarray) -> Image.Image:
    """[decoded mean code | up to 4 members with their attention maps] as one strip.

    Attention map: the encoder's last feature map, max over channels, upsampled over the image.
    A dense encoder has no map: its strip shows the members without one.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        mean = torch.from_numpy(codes.mean(0, keepdims=True)).float()
        if getattr(model, "contrastive", False):  # its decoder only ever saw unit-length codes
            mean = F.normalize(mean, dim=1)
        proto = model.decode(mean)
        x = torch.from_numpy(pixels[:4]).float() / 255
        fmap = model.feature_maps(x)
    tiles = to_rgb_thumbs((proto.numpy() * 255).astype(np.uint8), 96)
    if fmap is None:
        return grid(tiles + to_rgb_thumbs(pixels[:4], 96), cols=1 + len(x), pad=4)
    with torch.inference_mode():
        att = F.interpolate(fmap.amax(dim=1, keepdim=True), size=x.shape[-2:], mode="bilinear", align_corners=False)
        lo = att.amin(dim=(2, 3), keepdim=True)
        att = (att - lo) / (att.amax(dim=(2, 3), keepdim=True) - lo + 1e-8)
    heat = np.stack([(att[i, 0].numpy() * 255).astype(np.uint8) for i in range(len(x))]) if len(x) else []
    for i in range(len(x)):
        base = np.asarray(to_rgb_thumbs(pixels[i:i + 1], 96)[0]).astype(float)
        h = np.asarray(Image.fromarray(heat[i]).resize(base.shape[1::-1], Image.Resampling.BILINEAR)).astype(float)
        over = base * 0.5 + np.stack([h, h * 0.3, 255 - h], axis=-1) * 0.5
        tiles += [Image.fromarray(base.astype(np.uint8)), Image.fromarray(over.clip(0, 255).astype(np.uint8))]
    return grid(tiles, cols=len(tiles), pad=4)


def reconstructions(model: Any, pixels: np.ndarray) -> Image.Image:
    """Originals (top row) above their reconstructions (bottom row)."""
    import torch

    with torch.inference_mode():
        rec = model(torch.from_numpy(pixels).float() / 255).numpy()
    originals = to_rgb_thumbs(pixels, 64)
    return grid(originals + to_rgb_thumbs((rec * 255).clip(0, 255).astype(np.uint8), 64), cols=len(originals))


def map_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE of a sample of the clustered features (a few seconds for 2,000 points)."""
    from sklearn.manifold import TSNE

    if len(features) < 5:
        return np.zeros((len(features), 2))
    return TSNE(n_components=2, perplexity=min(30.0, (len(features) - 1) / 3), random_state=seed,
                init="pca").fit_transform(features.astype(np.float64))


def charts(sizes: list[int], losses: list[float], xy: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(sizes) + 2), 3))
    ax.bar(range(len(sizes)), sizes, color="#4477aa")
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title("Cluster sizes")
    ax.set_xticks(range(len(sizes)))
    out["sizes.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses, marker="o" if len(losses) < 30 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    out["loss.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    k = int(labels.max()) + 1 if len(labels) else 1
    cmap = "tab10" if k <= 10 else "tab20" if k <= 20 else "nipy_spectral"
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=(10 if k <= 10 else max(20, k)) - 0.5, s=4)
    for c in np.unique(labels):
        m = xy[labels == c].mean(0)
        ax.annotate(str(c), m, fontsize=9, weight="bold", ha="center")
    ax.set_title(f"t-SNE map of {len(xy)} images' codes, coloured by cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(sc, ax=ax, label="cluster")
    out["map.png"] = _png(fig)
    return out


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{f" class={cls!r}" if cls else ""}>'


def render_html(run: dict[str, Any], clusters: list[dict[str, Any]], metrics: dict[str, Any] | None,
                reclustered: list[int] | None = None) -> str:
    q = run.get("quality", {})
    counts = run.get("counts", {})
    signals = [("images", counts.get("accepted")), ("clusters", counts.get("clusters")),
               ("rejected", counts.get("rejected")), ("duplicates", counts.get("duplicates")),
               ("reconstruction MSE", q.get("reconstruction_mse")), ("silhouette (sample)", q.get("silhouette_sample")),
               ("size balance (1 = equal)", q.get("size_balance"))]
    if metrics:
        signals += [("accuracy (Hungarian)", metrics.get("accuracy")), ("NMI", metrics.get("nmi")),
                    ("ARI", metrics.get("ari")), ("purity", metrics.get("purity"))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in signals)
    nav = " ".join(f'<a href="#cluster-{c["id"]}">{c["id"]}</a>' for c in clusters)
    sections = []
    for c in clusters:
        cid = c["id"]
        near = "".join(f"<li>{html.escape(p)}</li>" for p in c["nearest"][:9])
        sub = (f'<p><a href="recluster-{cid}.html">Cluster {cid} re-clustered</a></p>'
               if cid in (reclustered or []) else "")
        sections.append(
            f'<section id="cluster-{cid}"><h2>Cluster {cid} <small>{c["size"]} images</small></h2>{sub}'
            f'<p>Top rows: the {NEAREST_IN_GRID} images closest to the centre; last row: random members.</p>'
            f'{_img(f"cluster-{cid}.png", f"sample images of cluster {cid}", "grid")}'
            f'<p>Prototype (the cluster\'s mean code, decoded), then members with their attention maps.</p>'
            f'{_img(f"cluster-{cid}-prototype.png", f"prototype and attention maps of cluster {cid}")}'
            f'<details><summary>Paths closest to the centre</summary><ol>{near}</ol></details></section>')
    cfg = run.get("config", {})
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
<div class="charts">{_img("sizes.png", "bar chart of cluster sizes")}{_img("loss.png", "training loss per epoch")}</div>
{_img("map.png", "2-D map of a sample of codes coloured by cluster")}
<h2>Reconstructions</h2><p>Originals (top) and the autoencoder's reconstructions (bottom).</p>
{_img("reconstructions.png", "original images above their reconstructions")}
<nav>Clusters: {nav}</nav>
{''.join(sections)}
</body></html>
"""


def write_report(output: str, storage_options: dict[str, Any] | None = None, seed: int = 0,
                 run: dict[str, Any] | None = None) -> str:
    """Write ``OUTPUT/report/``; returns the URL of index.html.

    ``run`` is the run record when the flow reports before writing run.json (which marks the run
    finished); otherwise run.json is read.
    """
    from tasks.train import load_model

    so = storage_options or {}
    run = run if run is not None else read_json(join(output, "run.json"), so)
    clusters = read_json(join(output, "clusters.json"), so)
    assignments = read_parquet(join(output, "assignments.parquet"), so)
    images = open_array(join(output, "images.zarr"), so)
    codes = open_array(join(output, "codes.zarr"), so)
    model = load_model(join(output, "model"), so)
    rep = join(output, "report")
    for c in track(clusters, total=len(clusters), desc="report", unit="cluster"):
        near, rand = cluster_members(assignments, c["id"], seed)
        idx = np.concatenate([near, rand]).astype(int)
        write_bytes_atomic(join(rep, f"cluster-{c['id']}.png"), _png(grid(to_rgb_thumbs(_rows(images, idx)))), so)
        members = assignments.index[assignments["cluster"] == c["id"]].to_numpy()
        sample = np.sort(np.random.default_rng(seed).choice(members, size=min(2000, len(members)), replace=False))
        strip = prototype_and_attention(model, _rows(codes, sample), _rows(images, near[:4]))
        write_bytes_atomic(join(rep, f"cluster-{c['id']}-prototype.png"), _png(strip), so)
    n = len(assignments)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(8, n), replace=False))
    write_bytes_atomic(join(rep, "reconstructions.png"), _png(reconstructions(model, _rows(images, pick))), so)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(MAP_SAMPLE, n), replace=False))
    xy = map_2d(_rows(open_array(join(output, "_work", "features.zarr"), so), sample), seed)
    labels = assignments["cluster"].to_numpy()[sample]
    for name, data in charts([c["size"] for c in clusters], run.get("train_loss", []), xy, labels).items():
        write_bytes_atomic(join(rep, name), data, so)
    return render_index(output, so, run)


def render_index(output: str, storage_options: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> str:
    """(Re)write index.html only: after ``imgclust evaluate`` it shows the metrics too."""
    so = storage_options or {}
    run = run if run is not None else read_json(join(output, "run.json"), so)
    clusters = read_json(join(output, "clusters.json"), so)
    try:
        metrics = read_json(join(output, "metrics.json"), so)
    except FileNotFoundError:
        metrics = None
    fs, root = open_fs(join(output, "report"), so)
    pages = fs.glob(f"{root}/recluster-*.html") if fs.exists(root) else []
    reclustered = sorted(int(p.rsplit("-", 1)[1].split(".")[0]) for p in pages)
    url = join(output, "report", "index.html")
    write_bytes_atomic(url, render_html(run, clusters, metrics, reclustered).encode(), so)
    logger.info("report: %s", url)
    return url


@task(name="report", retries=1, retry_delay_seconds=5)
def report_task(output: str, storage_options: dict[str, Any], seed: int, run: dict[str, Any] | None = None) -> str:
    return write_report(output, storage_options, seed, run)
