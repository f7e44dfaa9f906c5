"""The libjpeg-turbo fast path gives Pillow's pixels exactly, and hands Pillow whatever it is unsure of."""

import io

import numpy as np
import pytest
from PIL import Image

import imgclust.io.jpeg as jpeg
from imgclust.io.imagefile import ImageRejected, decode_image

pytestmark = pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg is not installed")


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: JPEG-like content, not flat blocks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(im: Image.Image, orientation: int = 1, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def both_paths(monkeypatch, data: bytes, size, gray: bool, fit: str):
    fast = decode_image(data, size, gray, fit)
    with monkeypatch.context() as m:
        m.setattr(jpeg, "simplejpeg", None)
        slow = decode_image(data, size, gray, fit)
    return fast, slow


@pytest.mark.parametrize("w, h, size, gray, fit, orientation, kw", [
    (256, 256, (32, 32), False, "crop", 1, {}),  # the scale benchmark's case: 1/8 decode, no resize
    (256, 256, (32, 32), True, "crop", 1, {}),
    (640, 480, (28, 28), False, "crop", 1, {"progressive": True}),
    (641, 479, (16, 24), False, "pad", 1, {"subsampling": 0}),
    (300, 200, (64, 64), False, "crop", 6, {}),  # rotated: the draft covers the displayed aspect
    (300, 200, (50, 40), True, "pad", 3, {}),
    (120, 90, (32, 32), False, "crop", 8, {}),
    (33, 17, (32, 32), False, "crop", 1, {}),  # smaller than the target: full-scale decode, upsampled
])
def test_fast_path_gives_pillows_pixels(monkeypatch, w, h, size, gray, fit, orientation, kw):
    data = jpeg_bytes(photo(w, h), orientation, **kw)
    assert jpeg.decode_jpeg_scaled(data, gray, lambda *_: (1, 1)) is not None  # the fast path is taken
    fast, slow = both_paths(monkeypatch, data, size, gray, fit)
    assert fast.pixels.shape == ((1 if gray else 3), *size)
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    assert (fast.width, fast.height, fast.format) == (slow.width, slow.height, slow.format) == (w, h, "JPEG")


def test_grayscale_jpeg_to_rgb_matches(monkeypatch):
    data = jpeg_bytes(photo(200, 160).convert("L"))
    fast, slow = both_paths(monkeypatch, data, (32, 32), False, "crop")
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    assert (fast.pixels[0] == fast.pixels[1]).all()


@pytest.mark.parametrize("mode", ["CMYK"])
def test_other_colour_spaces_are_left_to_pillow(monkeypatch, mode):
    data = jpeg_bytes(photo(64, 64).convert(mode))
    assert jpeg.decode_jpeg_scaled(data, False, lambda *_: (8, 8)) is None
    fast, slow = both_paths(monkeypatch, data, (16, 16), False, "crop")
    np.testing.assert_array_equal(fast.pixels, slow.pixels)


def test_truncated_jpeg_gets_pillows_reason():
    data = jpeg_bytes(photo(200, 200))
    cut = data[: len(data) // 2]
    assert jpeg.decode_jpeg_scaled(cut, False, lambda *_: (8, 8)) is None
    with pytest.raises(ImageRejected, match="truncated"):
        decode_image(cut, (8, 8), gray=False)


def test_a_decode_above_the_limit_is_left_to_pillow_which_words_the_rejection():
    data = jpeg_bytes(photo(200, 100))
    assert jpeg.decode_jpeg_scaled(data, False, lambda *_: (200, 100), max_pixels=100 * 100) is None
    with pytest.raises(ImageRejected, match=r"too large to decode: 200x100 pixels is 0.0 megapixels.*--max-megapixels"):
        decode_image(data, (100, 200), gray=False, max_pixels=100 * 100)


def test_the_limit_counts_the_pixels_a_jpeg_decodes_at_not_its_stored_size():
    data = jpeg_bytes(photo(400, 400))  # 0.16 MP stored; an 8x8 target decodes it at 1/8 scale (50x50)
    assert decode_image(data, (8, 8), gray=False, max_pixels=50 * 50).pixels.shape == (3, 8, 8)
    with pytest.raises(ImageRejected, match="decoded at 100x100"):
        decode_image(data, (90, 90), gray=False, max_pixels=50 * 50)


def test_a_144_megapixel_jpeg_decodes_in_bounded_memory():
    """12,000 x 12,000 pixels, above Pillow's own 89.5 MP ceiling: decoded at 1/8 scale (2.25 MP)."""
    big = Image.new("L", (12_000, 12_000), 90)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=50)
    del big
    out = decode_image(buf.getvalue(), (32, 32), gray=True)
    assert (out.width, out.height) == (12_000, 12_000)
    assert abs(int(out.pixels.mean()) - 90) <= 2


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_missing_only_its_end_marker_is_decoded(progressive):
    data = jpeg_bytes(photo(96, 64), progressive=progressive)
    assert data.endswith(b"\xff\xd9")
    whole = decode_image(data, (16, 16), gray=False)
    cut = decode_image(data[:-2], (16, 16), gray=False)
    np.testing.assert_array_equal(cut.pixels, whole.pixels)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_jpeg_cut_inside_its_pixels_stays_rejected(keep):
    data = jpeg_bytes(photo(96, 64))
    assert jpeg.with_end_marker(data[: int(len(data) * keep)]) is None
    with pytest.raises(ImageRejected, match="truncated|corrupt"):
        decode_image(data[: int(len(data) * keep)], (16, 16), gray=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_like_pillow(orientation):
    data = jpeg_bytes(photo(16, 8), orientation)
    with Image.open(io.BytesIO(data)) as im:
        assert jpeg.exif_orientation(data) == im.getexif().get(0x0112, 1) == orientation


def test_exif_after_other_segments_and_big_endian():
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    app1 = b"Exif\x00\x00" + tiff
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    head = (b"\xff\xd8" + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp
            + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + b"\xff\xda")
    assert jpeg.exif_orientation(head) == 6
    assert jpeg.exif_orientation(b"\xff\xd8\xff\xda") == 1
    assert jpeg.exif_orientation(b"\xff\xd8garbage") is None


@pytest.mark.parametrize("w, h, need, want", [(256, 256, (32, 32), (32, 32)), (256, 256, (33, 33), (64, 64)),
                                              (3000, 2000, (96, 64), (375, 250)), (33, 17, (32, 32), (33, 17)),
                                              (250, 250, (100, 100), (125, 125))])
def test_pillow_draft_size(w, h, need, want):
    assert jpeg.pillow_draft_size(w, h, need) == want
    with Image.open(io.BytesIO(jpeg_bytes(photo(w, h)))) as im:
        im.draft("RGB", need)
        assert im.size == want


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_gray_probe_agrees_with_pillow(mode):
    from imgclust.io.imagefile import GRAY_MODES, probe_is_gray

    data = jpeg_bytes(photo(32, 32).convert(mode))
    with Image.open(io.BytesIO(data)) as im:
        assert probe_is_gray(data) == (im.mode in GRAY_MODES) == (mode == "L")
    assert jpeg.jpeg_is_gray(data) == {"L": True, "RGB": False, "CMYK": None}[mode]
