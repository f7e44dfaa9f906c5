"""Benchmark corpora written as real image files, labels in the folder names (used for scoring only)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx(name: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION / f"{name}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{name}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(int)
    return x, y


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and their labels: ``digits``, ``fashion10k`` or ``fashion70k``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        arr = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        x = np.stack([np.asarray(Image.fromarray(a, "L").resize((28, 28), Image.Resampling.BILINEAR)) for a in arr])
        return x, d.target
    if not FASHION.exists():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    if name == "fashion10k":
        return _idx("t10k")
    if name == "fashion70k":
        a, b = _idx("train")
        c, d = _idx("t10k")
        return np.concatenate([a, c]), np.concatenate([b, d])
    raise SystemExit(f"unknown dataset {name}")


def write_folder(name: str, root: Path) -> Path:
    """Write the dataset as PNG files ``root/name/<label>/<i>.png`` once; reuse it afterwards."""
    out = root / name
    done = out / ".complete"
    if done.exists():
        return out
    x, y = load(name)
    for i, (img, label) in enumerate(zip(x, y)):
        d = out / str(label)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(d / f"{i:05d}.png")
    done.write_text(str(len(x)))
    return out
