"""Benchmark corpora written as real image files, labels in the folder names (used for scoring only).

Grey sets, (N, 28, 28) uint8, written as grey PNG:
  ``digits``, ``fashion10k``, ``fashion70k``, and ``fashion-uneven`` (Fashion-MNIST train subsample,
  class sizes geometric from 1,000 down to 50, 20:1).
Colour sets, each deterministic (fixed seeds), made only from material on this machine or in PyPI packages:
  ``shapes9``          1,800 synthetic 64x64 RGBA graphics, 9 groups = 3 shapes x 3 hues (size, position,
                       rotation, background tint and alpha, noise vary), (N, 64, 64, 4), RGBA PNG;
  ``photos16``         crops of the real colour photographs bundled in scikit-image's ``skimage.data``
                       (8 exist there, so 8 groups despite the name), 120 per photo, scale 0.3-0.7,
                       random position, horizontal flips, 160x120, (N, 120, 160, 3), JPEG quality 90;
                       group = source photo;
  ``fashion-tint10k``  Fashion-MNIST test set colourised with a random foreground and background colour
                       independent of the class, (N, 28, 28, 3), RGB PNG; group = the class.
"""

from __future__ import annotations

import colorsys
import gzip
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FASHION = Path("/usr/share/datasets/fashion-mnist")

GREY = ("digits", "fashion10k", "fashion70k", "fashion-uneven")
COLOUR = ("shapes9", "photos16", "fashion-tint10k")
DATASETS = GREY + COLOUR

# Real colour photographs bundled in scikit-image (skimage.data), no download needed. Left out: cat
# (the same picture as chelsea), motorcycle_right (stereo twin of motorcycle_left), colorwheel, logo,
# horse, phantom, chessboard (graphics), and lily/skin/kidney (they need a download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry",
          "hubble_deep_field", "retina")
JPEG_QUALITY = 90


def _idx(name: str) -> tuple[np.ndarray, np.ndarray]:
    if not FASHION.exists():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(FASHION / f"{name}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{name}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(int)
    return x, y


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _shapes9(per_group: int = 200, size: int = 64, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """3 shapes x 3 hues; everything else (size, place, rotation, background, alpha, noise) is nuisance."""
    rng = np.random.default_rng(seed)
    shapes = ("circle", "square", "triangle")
    hues = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}
    ss = 4  # supersampling for anti-aliased edges
    images, labels = [], []
    for shape in shapes:
        for hue_name, hue in hues.items():
            for _ in range(per_group):
                r = rng.uniform(10, 26)  # circumradius, pixels
                cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
                rot = rng.uniform(0, 2 * np.pi)
                mask = Image.new("L", (size * ss, size * ss), 0)
                draw = ImageDraw.Draw(mask)
                if shape == "circle":
                    rr = r * 0.85
                    draw.ellipse([(cx - rr) * ss, (cy - rr) * ss, (cx + rr) * ss, (cy + rr) * ss], fill=255)
                else:
                    n = 4 if shape == "square" else 3
                    pts = [((cx + r * np.cos(rot + 2 * np.pi * j / n)) * ss, (cy + r * np.sin(rot + 2 * np.pi * j / n)) * ss)
                           for j in range(n)]
                    draw.polygon(pts, fill=255)
                m = np.asarray(mask.resize((size, size), Image.Resampling.LANCZOS), np.float64)[..., None] / 255.0
                fg = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
                bg = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.7, 1.0))
                rgb = bg * (1 - m) + fg * m + rng.normal(0, 8.0, (size, size, 3))
                bg_alpha = rng.uniform(128, 255)
                alpha = bg_alpha * (1 - m[..., 0]) + 255.0 * m[..., 0]
                img = np.dstack([np.clip(rgb, 0, 255), alpha]).round().astype(np.uint8)
                images.append(img)
                labels.append(f"{hue_name}-{shape}")
    return np.stack(images), np.array(labels)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@lru_cache(maxsize=1)
def _photos16_jpegs(per_photo: int = 120, out_wh: tuple[int, int] = (160, 120),
                    seed: int = 4321) -> tuple[list[bytes], np.ndarray]:
    """Random 4:3 crops (side 0.3-0.7 of the largest 4:3 window), flips, resized, encoded as JPEG."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise SystemExit("photos16 needs scikit-image: pip install scikit-image") from None
    rng = np.random.default_rng(seed)
    w_out, h_out = out_wh
    images, labels = [], []
    for name in PHOTOS:
        src = Image.fromarray(np.ascontiguousarray(_photo(name)[..., :3]), "RGB")
        W, H = src.size
        h_max = min(H, W * h_out / w_out)
        for _ in range(per_photo):
            h = h_max * rng.uniform(0.3, 0.7)
            w = h * w_out / h_out
            x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
            crop = src.resize((w_out, h_out), Image.Resampling.LANCZOS, box=(x0, y0, x0 + w, y0 + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(_jpeg(crop))
            labels.append(name)
    return images, np.array(labels)


def _photos16() -> tuple[np.ndarray, np.ndarray]:
    """The crops' pixels as decoded from the very JPEG files that ``write_folder`` writes."""
    jpegs, labels = _photos16_jpegs()
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]), labels


def _fashion_tint(seed: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Each image: out = bg * (1 - g) + fg * g with random fg/bg colours (luma contrast >= 0.35), class-independent."""
    x, y = _idx("t10k")
    rng = np.random.default_rng(seed)
    luma = np.array([0.299, 0.587, 0.114])
    fg = np.empty((len(x), 3))
    bg = np.empty((len(x), 3))
    for i in range(len(x)):
        while True:
            f = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0))
            b = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0))
            if abs(f @ luma - b @ luma) >= 0.35 * 255:
                break
        fg[i], bg[i] = f, b
    g = x.astype(np.float64)[..., None] / 255.0
    out = bg[:, None, None, :] * (1 - g) + fg[:, None, None, :] * g
    return np.clip(out.round(), 0, 255).astype(np.uint8), y


def _fashion_uneven(largest: int = 1000, smallest: int = 50, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST train subsample; class sizes geometric largest..smallest in a seeded class order."""
    x, y = _idx("train")
    rng = np.random.default_rng(seed)
    classes = rng.permutation(10)
    sizes = np.round(largest * (smallest / largest) ** (np.arange(10) / 9)).astype(int)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in zip(classes, sizes)])
    idx = rng.permutation(idx)
    return x[idx], y[idx]


@lru_cache(maxsize=2)
def _load_cached(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        arr = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        x = np.stack([np.asarray(Image.fromarray(a, "L").resize((28, 28), Image.Resampling.BILINEAR)) for a in arr])
        return x, d.target
    if name == "shapes9":
        return _shapes9()
    if name == "photos16":
        return _photos16()
    if name == "fashion-tint10k":
        return _fashion_tint()
    if name == "fashion-uneven":
        return _fashion_uneven()
    if name == "fashion10k":
        return _idx("t10k")
    if name == "fashion70k":
        a, b = _idx("train")
        c, d = _idx("t10k")
        return np.concatenate([a, c]), np.concatenate([b, d])
    raise SystemExit(f"unknown dataset {name} (known: {', '.join(DATASETS)})")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and their labels: (N, 28, 28) uint8 for the grey sets, (N, H, W, 3|4) uint8 for the colour sets."""
    x, y = _load_cached(name)
    return x.copy(), y.copy()


def write_folder(name: str, root: Path) -> Path:
    """Write the dataset as image files ``root/name/<label>/<i>.<ext>`` once; reuse it afterwards.

    Grey sets: grey PNG; ``shapes9``: RGBA PNG; ``fashion-tint10k``: RGB PNG; ``photos16``: JPEG (quality 90,
    the same encoding whose decoded pixels ``load`` returns)."""
    out = root / name
    done = out / ".complete"
    if done.exists():
        return out
    if name == "photos16":
        jpegs, y = _photos16_jpegs()
        for i, (data, label) in enumerate(zip(jpegs, y)):
            d = out / str(label)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(data)
        done.write_text(str(len(jpegs)))
        return out
    x, y = load(name)
    for i, (img, label) in enumerate(zip(x, y)):
        d = out / str(label)
        d.mkdir(parents=True, exist_ok=True)
        if img.ndim == 3 and img.shape[2] == 4:
            Image.fromarray(img, "RGBA").save(d / f"{i:05d}.png")
        elif img.ndim == 3:
            Image.fromarray(img, "RGB").save(d / f"{i:05d}.png")
        else:
            Image.fromarray(img, "L").save(d / f"{i:05d}.png")
    done.write_text(str(len(x)))
    return out
