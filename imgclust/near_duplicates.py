"""Near-identical images: perceptual hashes and groups of confirmed pairs.

A pair of images is a near-duplicate when the code index puts one among the other's nearest
neighbours, their perceptual hashes (the DCT hash imagededup and ImageHash call PHash) differ in
few bits, and their grey thumbnails, brightness and contrast taken out, correlate almost
perfectly (allowing either a light crop). Codes find resized, recompressed, lightly cropped or
brightened copies among millions without comparing every pair; the hash and the correlation keep
look-alikes that are not copies (two views of one scene) out. Byte-identical files never get here: discovery
keeps one of them and lists the others in ``duplicates.parquet``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_SIDE, HASH_BITS = 32, 8  # the image is reduced to 32 x 32 grey; its 8 x 8 lowest frequencies make the hash


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 images -> (N,) uint64 DCT hashes (64 bits: low frequencies above their median)."""
    out = np.zeros(len(pixels), np.uint64)
    weights = (np.uint64(1) << np.arange(64, dtype=np.uint64)).reshape(HASH_BITS, HASH_BITS)
    for i, im in enumerate(pixels):
        mode = "L" if im.shape[0] == 1 else "RGB"
        img = Image.fromarray(im[0] if mode == "L" else im.transpose(1, 2, 0), mode).convert("L")
        small = np.asarray(img.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), np.float64)
        low = dctn(small, type=2, norm="ortho")[:HASH_BITS, :HASH_BITS]
        bits = low >= np.median(low.ravel()[1:])  # the mean (DC) term left out of the median
        out[i] = np.bitwise_or.reduce(np.where(bits, weights, np.uint64(0)).ravel())
    return out


SIGNATURE_SIDE, SIGNATURE_CROPS = 32, (0.0, 0.03, 0.06)


def content_signatures(pixels: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 thumbnails -> (N, len(SIGNATURE_CROPS), 32 * 32) float32: the grey image
    without its black letterbox bars, centre-cropped by each fraction of ``SIGNATURE_CROPS``, at
    32 x 32, less its mean and scaled to unit length (so brightness and contrast do not count)."""
    out = np.zeros((len(pixels), len(SIGNATURE_CROPS), SIGNATURE_SIDE**2), np.float32)
    for i, im in enumerate(pixels):
        grey = Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).convert("L")
        arr = np.asarray(grey)
        rows, cols = np.flatnonzero(arr.max(1) > 0), np.flatnonzero(arr.max(0) > 0)
        if len(rows) and len(cols):
            grey = grey.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
        w, h = grey.size
        for j, f in enumerate(SIGNATURE_CROPS):
            dx, dy = int(w * f), int(h * f)
            small = grey.crop((dx, dy, w - dx, h - dy)).resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BILINEAR)
            x = np.asarray(small, np.float64).ravel()
            x = x - x.mean()
            out[i, j] = x / (np.linalg.norm(x) + 1e-9)
    return out


def content_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation (N,) of signature pairs ``a[i]``, ``b[i]`` (``content_signatures``), the best of
    the whole images and of either one lightly cropped against the other whole: 1 for a copy."""
    whole_a, whole_b = a[:, 0], b[:, 0]
    best = (whole_a * whole_b).sum(1)
    for j in range(1, a.shape[1]):
        best = np.maximum(best, np.maximum((a[:, j] * whole_b).sum(1), (whole_a * b[:, j]).sum(1)))
    return best


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes ``a`` and ``b`` (same shape) -> int64."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1).astype(np.int64).reshape(np.shape(x))


def group_pairs(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Groups of the confirmed pairs (a[i], b[i]): member -> its group's first image.

    Groups are stars, not chains: the image with the most partners (then the smallest) founds a
    group with its partners not yet grouped, and so on. A run of look-alikes each a little
    different from the next (a thousand similar digits) thus makes many small groups, not one
    that joins images no one would call copies.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    partners: dict[int, list[int]] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        partners.setdefault(x, []).append(y)
        partners.setdefault(y, []).append(x)
    order = sorted(partners, key=lambda m: (-len(partners[m]), m))
    group: dict[int, int] = {}
    for m in order:
        if m in group:
            continue
        free = [p for p in partners[m] if p not in group]
        if not free:
            continue
        first = min([m, *free])
        for p in [m, *free]:
            group[p] = first
    return group
