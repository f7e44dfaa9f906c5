"""Near-identical images: perceptual hashes and groups of confirmed pairs.

A pair of images is a near-duplicate when the code index puts them among each other's nearest
neighbours, close by code distance, and their perceptual hashes (the DCT hash imagededup and
ImageHash call PHash) differ in few bits. Codes find resized, recompressed, lightly cropped or
brightened copies among millions without comparing every pair; the hash keeps look-alikes that
are not copies (two photos of one scene) out. Byte-identical files never get here: discovery
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


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes ``a`` and ``b`` (same shape) -> int64."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1).astype(np.int64).reshape(np.shape(x))


def group_pairs(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Connected groups of the pairs (a[i], b[i]): member -> its group's smallest member."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: root(x) for x in parent}
