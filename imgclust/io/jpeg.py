"""JPEG fast path: libjpeg-turbo's scaled decode through simplejpeg, twice Pillow's rate per image.

Pillow's JPEG loop spends about half its time in Python and plugin machinery around the same
libjpeg-turbo call (bench/ingest.py). This path decodes at exactly the scale Pillow's draft mode
would pick, so the pixels are identical; anything it is unsure of (other colour spaces, odd
headers, warnings, huge images, simplejpeg missing) returns None and Pillow decodes the file, which
also words the rejection reasons.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

try:  # an optional accelerator: without it every JPEG goes through Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_FAST_COLORSPACES = {"YCbCr", "Gray"}


def is_jpeg(data: bytes) -> bool:
    return data[:2] == _SOI


def exif_orientation(data: bytes) -> int | None:
    """EXIF orientation (1-8) of a JPEG from its APP1 segment, 1 when there is none, None when
    the markers before the scan cannot be walked (the caller then lets Pillow read the file)."""
    try:
        i, n = 2, len(data)
        while i + 2 <= n:
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before the pixels
                return 1
            length = struct.unpack_from(">H", data, i + 2)[0]
            if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
                return _tiff_orientation(data[i + 10:i + 2 + length])
            i += 2 + length
        return None
    except (struct.error, IndexError):
        return None


def _tiff_orientation(tiff: bytes) -> int | None:
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return None
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    for k in range(struct.unpack_from(order + "H", tiff, ifd)[0]):
        tag, kind = struct.unpack_from(order + "HH", tiff, ifd + 2 + 12 * k)
        if tag == 0x0112:
            return struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k + 8)[0] if kind == 3 else None
    return 1


def jpeg_is_gray(data: bytes) -> bool | None:
    """Whether a JPEG's header says grayscale, from libjpeg-turbo's header parse (a twentieth of
    Pillow's ``open``); None when unsure."""
    return jpeg_header(data)[0]


def jpeg_header(data: bytes) -> tuple[bool | None, int | None]:
    """(grayscale?, largest side in pixels) from a JPEG's header; (None, None) when unsure."""
    if simplejpeg is None or not is_jpeg(data):
        return None, None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None, None
    return {"Gray": True, "YCbCr": False, "RGB": False}.get(colorspace), max(int(height), int(width))


def pillow_draft_size(width: int, height: int, need: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) Pillow's ``draft`` decodes to for a requested ``need``: the largest of
    1/8, 1/4, 1/2, 1 that still covers it, rounded up."""
    scale = min(width // max(1, need[0]), height // max(1, need[1]))
    s = next((s for s in (8, 4, 2) if scale >= s), 1)
    return (width + s - 1) // s, (height + s - 1) // s


def with_end_marker(data: bytes) -> bytes | None:
    """``data`` with the end-of-image marker it lacks, when all its pixels are there; else None.

    Writers cut off mid-flush often lose exactly these two bytes. libjpeg-turbo's strict decode of
    the completed stream fails on any missing image data ("premature end of data segment"), so a
    file truncated inside its pixels is never mistaken for one that lost only its marker.
    """
    if simplejpeg is None or not is_jpeg(data) or data.endswith(_EOI):
        return None
    whole = data + _EOI
    try:
        simplejpeg.decode_jpeg(whole, colorspace="GRAY", min_width=1, min_height=1, strict=True)
    except (ValueError, MemoryError):
        return None
    return whole


def decode_jpeg_scaled(data: bytes, gray: bool, need_for: Callable[[int, int, int], tuple[int, int]],
                       max_pixels: int | None = None) -> tuple[np.ndarray, int, int, int] | None:
    """(H, W[, 3]) uint8 decoded at Pillow's draft scale, the stored width and height, and the EXIF
    orientation; None when Pillow should decode this file instead.

    ``need_for(width, height, orientation)`` gives the (width, height) the draft must cover; a
    decode above ``max_pixels`` is left to Pillow's path, which words the rejection.
    """
    if simplejpeg is None or not is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_COLORSPACES or width < 1 or height < 1:
            return None
        orientation = exif_orientation(data)
        if orientation is None:
            return None
        dw, dh = pillow_draft_size(width, height, need_for(width, height, orientation))
        if max_pixels is not None and dw * dh > max_pixels:
            return None
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", min_width=dw, min_height=dh)
    except (ValueError, MemoryError):  # corrupt, truncated, or a warning under strict mode
        return None
    if arr.shape[:2] != (dh, dw):  # libjpeg-turbo picked a finer scale than Pillow would have
        return None
    return (arr[:, :, 0] if gray else arr), width, height, orientation
