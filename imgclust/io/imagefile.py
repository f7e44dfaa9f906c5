"""Decode any image Pillow can read into a fixed-size uint8 array, or say clearly why not."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclust.io.jpeg import decode_jpeg_scaled, jpeg_header, with_end_marker

# Pillow's own ceiling (89.5 MP, judged on the stored size) would refuse a 144 MP JPEG that draft
# mode decodes at an eighth of its size. imgclust judges the pixels a decode really holds instead
# (``max_pixels`` of ``decode_image``), before any of them are decoded.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_MEGAPIXELS = 89.5

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageRejected(Exception):
    """The file is not a usable image; ``str(exc)`` is the reason shown to users."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (C, H, W) uint8
    width: int
    height: int
    format: str
    thumbnail: np.ndarray | None = None  # (C, T, T) uint8, the whole image letterboxed, when asked for


def _flatten_alpha(im: Image.Image, background: int = 0) -> Image.Image:
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _to_mode(im: Image.Image, gray: bool) -> Image.Image:
    """Every Pillow mode to L or RGB; 16/32-bit and float data are rescaled, not clipped."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        im = _flatten_alpha(im)
    target = "L" if gray else "RGB"
    return im if im.mode == target else im.convert(target)


def draft_size(w: int, h: int, tw: int, th: int, fit: str) -> tuple[int, int]:
    """Smallest (width, height) that still covers the ``tw`` x ``th`` target after ``fit``, in exact
    integers: JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale only while the result is at least
    this big, so one pixel too many (e.g. 33 for a 256 px image and a 32 px target) costs a 2x
    larger decode."""
    by_width = tw * h >= th * w if fit == "crop" else tw * h <= th * w  # scale = tw / w, else th / h
    if by_width:
        return tw, max(1, -(-h * tw // w))
    return max(1, -(-w * th // h)), th


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that undoes it


def _draft_need(width: int, height: int, orientation: int, size: tuple[int, int], fit: str,
                thumbnail: int = 0) -> tuple[int, int]:
    """(width, height) of the stored image that a scaled JPEG decode must still cover: the target,
    and the ``thumbnail`` x ``thumbnail`` letterboxed thumbnail when one is asked for."""
    th, tw = size
    rotated = orientation in _ROTATED
    w, h = (height, width) if rotated else (width, height)
    need = draft_size(w, h, tw, th, fit)
    if thumbnail:
        other = draft_size(w, h, thumbnail, thumbnail, "pad")
        need = (max(need[0], other[0]), max(need[1], other[1]))
    return need[::-1] if rotated else need


def _fit(arr: np.ndarray, orientation: int, size: tuple[int, int], fit: str) -> np.ndarray:
    """Undo the EXIF orientation, then crop or pad to ``size``; a no-op when it already fits."""
    th, tw = size
    if orientation in _TRANSPOSE or arr.shape[:2] != (th, tw):
        im = Image.fromarray(arr)
        if orientation in _TRANSPOSE:
            im = im.transpose(_TRANSPOSE[orientation])
        if fit == "pad":
            im = ImageOps.pad(im, (tw, th), method=Image.Resampling.BILINEAR, color=0)
        else:
            im = ImageOps.fit(im, (tw, th), method=Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr


def _check_pixels(width: int, height: int, max_pixels: int, stored: tuple[int, int]) -> None:
    if width * height > max_pixels:
        scaled = "" if (width, height) == stored else f", decoded at {width}x{height}"
        raise ImageRejected(f"too large to decode: {stored[0]}x{stored[1]} pixels{scaled} is "
                            f"{width * height / 1e6:.1f} megapixels, above the limit of {max_pixels / 1e6:g} "
                            "(raise it with --max-megapixels)")


def _decode_with_pillow(data: bytes, need: Callable[[int, int, int], tuple[int, int]], gray: bool,
                        max_pixels: int) -> tuple[np.ndarray, int, int, int, str]:
    """(pixels as stored, before orientation and fit; width; height; EXIF orientation; format)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "unknown"
            width, height = im.size
            if width < 1 or height < 1:
                raise ImageRejected(f"image has no pixels ({width}x{height})")
            if fmt != "JPEG":  # no reduced-scale decode: the stored size is what load() would hold
                _check_pixels(width, height, max_pixels, (width, height))
            try:
                im.seek(0)
            except EOFError:
                pass
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            if fmt == "JPEG":  # decodes at 1/2, 1/4 or 1/8 scale where that still covers the target
                im.draft("L" if gray else "RGB", need(width, height, orientation))
                _check_pixels(*im.size, max_pixels, (width, height))  # before a single pixel is decoded
            im.load()
            arr = np.asarray(_to_mode(im, gray), dtype=np.uint8)
    return arr, width, height, orientation, fmt


def decode_image(data: bytes, size: tuple[int, int], gray: bool, fit: str = "crop",
                 max_pixels: int = int(DEFAULT_MAX_MEGAPIXELS * 1e6), thumbnail: int = 0) -> DecodedImage:
    """Decode ``data`` to (C, H, W) uint8 at ``size`` = (height, width).

    EXIF orientation is applied; animated images give their first frame; JPEGs are decoded at a
    reduced scale when that still covers the target (draft mode), which is much faster, and
    through libjpeg-turbo directly where that gives the same pixels (``imgclust.jpeg``).
    ``fit="crop"`` centre-crops to the target aspect, ``fit="pad"`` letterboxes on black.
    ``max_pixels`` bounds the pixels a decode holds in memory (a JPEG counts at its draft scale).
    A JPEG that lacks only its two-byte end marker, all its pixels present, is decoded as if it
    had one; truncated image data is rejected. ``thumbnail`` > 0 also makes a square thumbnail of
    that side from the same decode (the whole image, letterboxed on black).
    Raises ``ImageRejected`` with a readable reason for anything that cannot be decoded.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        return _decode(data, size, gray, fit, max_pixels, thumbnail)
    except ImageRejected as exc:
        if not str(exc).startswith("truncated"):
            raise
        whole = with_end_marker(data)
        if whole is None:
            raise
        return _decode(whole, size, gray, fit, max_pixels, thumbnail)


def _decode(data: bytes, size: tuple[int, int], gray: bool, fit: str, max_pixels: int, thumbnail: int) -> DecodedImage:
    def need(w: int, h: int, o: int) -> tuple[int, int]:
        return _draft_need(w, h, o, size, fit, thumbnail)

    fast = decode_jpeg_scaled(data, gray, need, max_pixels)
    if fast is not None:
        raw, width, height, orientation = fast
        fmt = "JPEG"
    else:
        try:
            raw, width, height, orientation, fmt = _decode_with_pillow(data, need, gray, max_pixels)
        except ImageRejected:
            raise
        except UnidentifiedImageError:
            raise ImageRejected("not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                ZeroDivisionError) as exc:
            msg = str(exc) or type(exc).__name__
            if "truncated" in msg.lower():
                raise ImageRejected(f"truncated image data: {msg}") from None
            raise ImageRejected(f"corrupt or unsupported image data: {msg}") from None
        except MemoryError:
            raise ImageRejected("not enough memory to decode this image") from None
    thumb = _channels_first(_fit(raw, orientation, (thumbnail, thumbnail), "pad")) if thumbnail else None
    return DecodedImage(_channels_first(_fit(raw, orientation, size, fit)), width, height, fmt, thumb)


def _channels_first(arr: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) to a contiguous (C, H, W)."""
    return np.ascontiguousarray(arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def probe_is_gray(data: bytes) -> bool | None:
    """Whether the image header says grayscale; None when unreadable. Reads only the header."""
    return probe_header(data)[0]


def probe_header(data: bytes) -> tuple[bool | None, int | None]:
    """(grayscale?, largest side in pixels) from the image's header alone; None for what it does
    not say (an unreadable file: both)."""
    gray, side = jpeg_header(data)
    if gray is not None:
        return gray, side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                side = max(im.size)
                if im.mode == "P":
                    pal = im.getpalette() or []
                    rgb = np.asarray(pal[: 3 * 256]).reshape(-1, 3) if len(pal) >= 3 else None
                    return bool(rgb is not None and (rgb == rgb[:, :1]).all()), side
                return im.mode in GRAY_MODES, side
    except Exception:
        return None, None
