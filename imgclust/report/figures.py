"""Pictures of a run: thumbnails packed into grids, prototypes and attention maps, charts."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

NEAREST_IN_GRID, RANDOM_IN_GRID, THUMB = 16, 8, 64


def png_bytes(fig_or_image: Any) -> bytes:
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


def grid_positions(size: int, cluster: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions, among a cluster's ``size`` members in order of distance, of its grid's images:
    the ``NEAREST_IN_GRID`` nearest, and up to ``RANDOM_IN_GRID`` random others (ascending)."""
    near = np.arange(min(size, NEAREST_IN_GRID))
    rest = size - len(near)
    if rest <= 0:
        return near, np.zeros(0, np.int64)
    chosen = np.random.default_rng(seed + cluster).choice(rest, size=min(RANDOM_IN_GRID, rest), replace=False)
    return near, len(near) + np.sort(chosen)


def cluster_members(assignments: pd.DataFrame, cluster: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows closest to the centre, and a few random other members (indices into ``assignments``,
    the random ones ascending): the rows of ``grid_positions``."""
    members = assignments.index[assignments["cluster"] == cluster].to_numpy()
    ordered = members[np.argsort(assignments.loc[members, "distance"].to_numpy(), kind="stable")]
    near, rand = grid_positions(len(ordered), cluster, seed)
    return ordered[near], np.sort(ordered[rand])


def prototype_and_attention(model: Any, codes: np.ndarray, pixels: np.ndarray,
                            mean_image: np.ndarray | None = None) -> Image.Image:
    """[prototype | up to 4 members with their attention maps] as one strip.

    Prototype: the cluster's mean code, decoded; for an encoder without a decoder, ``mean_image``
    (C, H, W) uint8, the mean of the members' pixels. Attention map: the encoder's last feature
    map, max over channels, upsampled over the image. An encoder without a map (dense, raw pixels,
    a TorchScript or ONNX file) shows the members without one.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        if getattr(model, "has_decoder", True):
            mean = torch.from_numpy(codes.mean(0, keepdims=True)).float()
            if getattr(model, "contrastive", False):  # its decoder only ever saw unit-length codes
                mean = F.normalize(mean, dim=1)
            proto = model.decode(mean)
        else:
            assert mean_image is not None, "an encoder without a decoder needs the members' mean image"
            proto = torch.from_numpy(mean_image[None].astype(np.float32) / 255)
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


def loss_chart(losses: list[float], kinds: list[str] | None = None, round_steps: int = 1) -> Any:
    """The loss of each round of ``round_steps`` optimiser steps, one axis per kind of loss (a
    contrastive pretext, then the decoder's reconstruction loss): the two are on different scales
    and mean different things."""
    import matplotlib.pyplot as plt

    kinds = list(kinds or [])[:len(losses)]
    kinds += ["reconstruction"] * (len(losses) - len(kinds))
    names = list(dict.fromkeys(kinds))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        rounds = [i for i, k in enumerate(kinds) if k == name]
        values = [losses[i] for i in rounds]
        ax.plot([(i + 1) * round_steps for i in rounds], values, marker="o" if len(values) < 30 else None)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{name} loss")
        if min(values, default=1) > 0:
            ax.set_yscale("log")
        ax.set_title(f"Training: {name} loss" if len(names) > 1 else "Training loss")
    fig.tight_layout()
    return fig


def charts(sizes: list[int], losses: list[float], xy: np.ndarray, labels: np.ndarray,
           loss_kinds: list[str] | None = None, features: str = "codes", round_steps: int = 1) -> dict[str, bytes]:
    """Cluster sizes, the training loss and the 2-D map of a sample, as PNG bytes by file name."""
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
    out["sizes.png"] = png_bytes(fig)
    if losses:  # an encoder used as it is trained nothing
        out["loss.png"] = png_bytes(loss_chart(losses, loss_kinds, round_steps))
    fig, ax = plt.subplots(figsize=(6, 5))
    k = int(labels.max()) + 1 if len(labels) else 1
    cmap = "tab10" if k <= 10 else "tab20" if k <= 20 else "nipy_spectral"
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=(10 if k <= 10 else max(20, k)) - 0.5, s=4)
    for c in np.unique(labels):
        m = xy[labels == c].mean(0)
        ax.annotate(str(c), m, fontsize=9, weight="bold", ha="center")
    ax.set_title(f"t-SNE map of {len(xy)} images' {features}, coloured by cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(sc, ax=ax, label="cluster")
    out["map.png"] = png_bytes(fig)
    return out


