"""Near-identical images: perceptual hashes and groups of confirmed pairs.

A pair of images is a near-duplicate when the code index puts one among the other's nearest
neighbours, their perceptual hashes (the DCT hash imagededup and ImageHash call PHash) differ in
few bits, and their grey thumbnails, brightness and contrast taken out, correlate almost
perfectly once either is cut by the best of a grid of light crops. Codes find resized, recompressed, lightly cropped or
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


BASE_SIDE, SIGNATURE_SIDE = 64, 32
CROP_FRACTIONS = (0.0, 0.02, 0.04, 0.06, 0.08)  # cut off each border, independently, in the crop search


def content_bases(pixels: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 thumbnails -> (N, 64, 64) float32: the grey image without its black
    letterbox bars, stretched to 64 x 64 (the signatures' source; crops of it are signatures of
    crops of the image, the aspect ratio being the same stretch for a copy and its source)."""
    out = np.zeros((len(pixels), BASE_SIDE, BASE_SIDE), np.float32)
    for i, im in enumerate(pixels):
        grey = Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).convert("L")
        arr = np.asarray(grey)
        rows, cols = np.flatnonzero(arr.max(1) > 0), np.flatnonzero(arr.max(0) > 0)
        if len(rows) and len(cols):
            grey = grey.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
        out[i] = np.asarray(grey.resize((BASE_SIDE, BASE_SIDE), Image.Resampling.BILINEAR), np.float32)
    return out


def _resampler(cut_start: float, cut_end: float) -> np.ndarray:
    """(32, 64): the box filter that takes a 64-sample line less ``cut_start`` and ``cut_end`` of
    its length to 32 samples (each output averages the input it covers, partial pixels weighted)."""
    a, b = cut_start * BASE_SIDE, (1.0 - cut_end) * BASE_SIDE
    edges = a + (b - a) * np.arange(SIGNATURE_SIDE + 1) / SIGNATURE_SIDE
    px = np.arange(BASE_SIDE)
    w = np.clip(np.minimum(edges[1:, None], px[None] + 1) - np.maximum(edges[:-1, None], px[None]), 0.0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


# (F * F, 32, 64): every pair of cuts (start, end) of one axis; index 0 cuts nothing
_CUTS = np.stack([_resampler(s, e) for s in CROP_FRACTIONS for e in CROP_FRACTIONS])


def _normalised(z: np.ndarray) -> np.ndarray:
    """Rows less their mean, at unit length: a dot product of two is their correlation."""
    z = z - z.mean(-1, keepdims=True)
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-9)


def whole_signatures(bases: np.ndarray) -> np.ndarray:
    """(N, 64, 64) ``content_bases`` -> (N, 32 * 32) signatures of the whole images: at 32 x 32,
    less the mean, unit length (so brightness and contrast do not count)."""
    r = _CUTS[0]
    return _normalised((r @ bases @ r.T).reshape(len(bases), -1))


def cropped_signatures(base: np.ndarray) -> np.ndarray:
    """(64, 64) ``content_bases`` row -> (F**4, 32 * 32): signatures of the image with every
    combination of ``CROP_FRACTIONS`` cut off its four borders (row 0: the whole image)."""
    rows = _CUTS @ base  # (F*F, 32, 64): cuts of top and bottom
    return _normalised((rows[:, None] @ _CUTS.transpose(0, 2, 1)[None]).reshape(-1, SIGNATURE_SIDE**2))


def content_similarity(bases: np.ndarray, a: np.ndarray, b: np.ndarray, enough: float = 1.0) -> np.ndarray:
    """Correlation (P,) of the pairs of images ``bases[a[i]]``, ``bases[b[i]]`` (``content_bases``):
    1 for a copy. The best of the whole images and of either one cut by up to 8 % at each border
    (``CROP_FRACTIONS``, each border on its own) against the other whole, so a light crop, even an
    uneven one, still matches its source. Pairs whose whole images already correlate at
    ``enough`` or more are not searched; each image's crops are made once, whatever its pairs."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    whole = whole_signatures(bases)
    best = (whole[a] * whole[b]).sum(1)
    todo = np.flatnonzero(best < enough)
    for image in np.unique(np.concatenate([a[todo], b[todo]])):
        as_a, as_b = todo[a[todo] == image], todo[b[todo] == image]
        partners = np.concatenate([b[as_a], a[as_b]])
        scores = (cropped_signatures(bases[image]) @ whole[partners].T).max(0)
        pairs = np.concatenate([as_a, as_b])
        np.maximum.at(best, pairs, scores)
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
