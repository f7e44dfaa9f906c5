import io

import numpy as np
import pytest
from PIL import Image

from imgclust.io.imagefile import ImageRejected, decode_image, probe_is_gray
from tests.corpus import png_header_only


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "RGB"])
@pytest.mark.parametrize("gray", [True, False])
def test_every_mode_decodes_to_requested_channels(mode, gray):
    im = RGB.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.arange(40 * 60).reshape(40, 60) * 20).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    out = decode_image(encode(im, fmt), (16, 24), gray=gray)
    assert out.pixels.shape == ((1 if gray else 3), 16, 24)
    assert out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (60, 40)


def test_sixteen_bit_is_rescaled_not_clipped():
    a = np.full((8, 8), 32768, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(a), "PNG"), (8, 8), gray=True)
    assert 120 < out.pixels.mean() < 135  # half of full scale, not saturated at 255


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, (40, 20), gray=False, fit="pad")
    # Displayed image is 20 wide x 40 tall with blue on top; padded into 40x20 (h x w).
    top, bottom = out.pixels[:, 2, :], out.pixels[:, -3, :]
    assert top[2].max() > 200 and bottom[0].max() > 200


def test_animated_gif_gives_first_frame():
    frames = [Image.new("L", (10, 10), v) for v in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), (10, 10), gray=True)
    assert out.pixels.max() < 60


@pytest.mark.parametrize("size", [(1, 1), (5000, 3), (3, 4000)])
def test_any_size_and_aspect_is_accepted(size):
    im = Image.new("RGB", size, (200, 100, 50))
    out = decode_image(encode(im, "PNG"), (32, 32), gray=False)
    assert out.pixels.shape == (3, 32, 32)
    assert abs(int(out.pixels[0].mean()) - 200) <= 2


def test_large_jpeg_uses_draft_and_keeps_content():
    big = Image.new("RGB", (3000, 2000), (0, 128, 255))
    out = decode_image(encode(big, "JPEG"), (64, 64), gray=False)
    assert out.format == "JPEG" and out.pixels.shape == (3, 64, 64)
    assert abs(int(out.pixels[2].mean()) - 255) < 6


def test_pad_letterboxes_on_black():
    out = decode_image(encode(Image.new("L", (100, 20), 255), "PNG"), (20, 20), gray=True, fit="pad")
    assert out.pixels[0, 0].max() == 0 and out.pixels[0, 10].min() == 255


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not a recognised image format"),
    (png_header_only(100_000, 100_000), "too large to decode: 100000x100000 pixels is 10000.0 megapixels"),
    (png_header_only(12_000, 11_200), "above the limit of 89.5"),
])
def test_bad_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data, (8, 8), gray=True)


def test_truncated_jpeg_is_rejected():
    data = encode(RGB.resize((200, 200)), "JPEG")
    with pytest.raises(ImageRejected, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], (8, 8), gray=False)


def test_probe_is_gray():
    assert probe_is_gray(encode(RGB.convert("L"), "PNG")) is True
    assert probe_is_gray(encode(RGB, "PNG")) is False
    assert probe_is_gray(b"nope") is None


@pytest.mark.parametrize("w, h, tw, th, fit", [(256, 256, 32, 32, "crop"), (3000, 2000, 64, 64, "crop"),
                                               (3000, 2000, 64, 64, "pad"), (641, 479, 24, 16, "crop"),
                                               (100, 7, 32, 32, "pad"), (7, 100, 32, 32, "crop")])
def testdraft_size_is_the_smallest_that_covers_the_target(w, h, tw, th, fit):
    from imgclust.io.imagefile import draft_size

    nw, nh = draft_size(w, h, tw, th, fit)
    scale = max(tw / w, th / h) if fit == "crop" else min(tw / w, th / h)
    assert (nw, nh) == (max(1, int(np.ceil(w * scale - 1e-9))), max(1, int(np.ceil(h * scale - 1e-9))))
    if fit == "crop":
        assert nw >= tw and nh >= th
    assert draft_size(256, 256, 32, 32, "crop") == (32, 32)  # not 33: that would decode at 64x64


def test_a_thumbnail_is_the_whole_image_letterboxed_from_the_same_decode():
    a = np.zeros((60, 240, 3), np.uint8)
    a[:, :120] = (255, 0, 0)  # left half red, right half black: a crop to a square would lose the black
    for fmt in ("PNG", "JPEG"):
        out = decode_image(encode(Image.fromarray(a), fmt), (16, 16), gray=False, thumbnail=64)
        assert out.pixels.shape == (3, 16, 16) and out.thumbnail.shape == (3, 64, 64)
        band = out.thumbnail[:, 24:40]  # the image is 64 x 16 in the middle of the square
        assert band[0, :, :28].mean() > 200 and band[0, :, 36:].mean() < 30
        assert out.thumbnail[:, :20].max() < 30 and out.thumbnail[:, 44:].max() < 30  # black bars
    assert decode_image(encode(Image.fromarray(a), "PNG"), (16, 16), gray=False).thumbnail is None
