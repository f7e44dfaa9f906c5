"""Which view augmentations the default's SimCLR pretext needs on colour archives.

Trains the default preset's encoder (the product's own ``train_autoencoder``) on a development set
decoded as the product decodes it (32x32, RGB), with ``augment_views`` swapped for a variant, then
reads out the L2-normalised codes: 5-NN leave-one-out label vote, and UMAP (10-d) + K-means ACC/NMI.
Labels are used for scoring only. One (set, variant, seed) per call; results appended to
bench/_work/research/colour.jsonl.

Run: PYTHONPATH=. python bench/research/colour.py --dataset shapes9 --variant colour --steps 1500
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import zarr
from PIL import Image

from bench.research.common import WORK, kmeans, load, umap_embed  # noqa: F401 (threads set there)
from imgclust.io.imagefile import decode_image
from imgclust.metrics import score
from imgclust.models import contrastive, training
from imgclust.models.encoding import encode_array


def decoded(name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load(name)
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(decode_image(buf.getvalue(), (size, size), gray=x.ndim == 3).pixels)
    return np.stack(out), y


def knn_vote(f: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(f).kneighbors(f)
    votes = y[idx[:, 1:]]
    pred = np.array([np.unique(v, return_counts=True)[0][np.argmax(np.unique(v, return_counts=True)[1])]
                     for v in votes])
    return float((pred == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--variant", default="preset",
                    help="preset (the default preset's own), base (no colour distortion), or a COLOUR_DISTORTIONS name")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32)
    a = ap.parse_args()
    t0 = time.perf_counter()
    x, y = decoded(a.dataset, a.size)
    _, yi = np.unique(y, return_inverse=True)
    arr = zarr.create_array(store={}, shape=x.shape, chunks=(1024, *x.shape[1:]), dtype="uint8")
    arr[:] = x
    if a.variant != "preset":  # "base": no colour distortion
        base = contrastive.augment_views
        colour = "none" if a.variant == "base" else a.variant
        training.augment_views = lambda v, g, colour=None, chosen=colour: base(v, g, colour=chosen)  # type: ignore[assignment]
    plan = training.TrainPlan(preset="default", steps=a.steps, batch_size=256, learning_rate=1e-3, seed=a.seed)
    res = training.train_autoencoder(arr, plan)
    codes, _, _ = encode_array(res.model, x, 512)
    f = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
    k = len(np.unique(yi))
    labels, _ = kmeans(umap_embed(f, a.seed), k, a.seed)
    s = score(yi, labels)
    row = {"dataset": a.dataset, "variant": a.variant, "steps": a.steps, "seed": a.seed, "size": a.size,
           "knn5": knn_vote(f, yi), "acc": s["accuracy"], "nmi": s["nmi"], "seconds": time.perf_counter() - t0}
    print(json.dumps(row))
    with open(WORK / "colour.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
