"""A small corpus of real image files in nested folders, with the broken files users really have."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("JPEG", "JPEG"), ("bmp", "BMP"), ("gif", "GIF"), ("webp", "WEBP"),
           ("tif", "TIFF")]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def digit_images(n: int, size: int = 28) -> tuple[list[np.ndarray], list[int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [np.asarray(Image.fromarray((d.images[i] * 15.9).astype(np.uint8)).resize((size, size)))
            for i in range(n)]
    return imgs, [int(t) for t in d.target[:n]]


def make_corpus(root: Path, n_good: int = 60) -> dict[str, int]:
    """Write the corpus; returns the expected counts (found, duplicates, rejected, accepted)."""
    imgs, labels = digit_images(n_good)
    for i, (img, label) in enumerate(zip(imgs, labels)):
        ext, fmt = FORMATS[i % len(FORMATS)]
        folder = root / f"set{i % 3}" / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img, "L")
        if i % 4 == 1:
            im = im.convert("RGB")
        name = f"img {i:03d}é.{ext}" if i == 5 else f"img{i:03d}.{ext}"
        im.save(folder / name, fmt)
    broken = root / "broken" / "deeper"
    broken.mkdir(parents=True)
    good_jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good_jpeg, "JPEG")
    (broken / "truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    (broken / "empty.png").write_bytes(b"")
    (broken / "notes.jpg").write_text("this is a text file, not a photo\n")
    (broken / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    (broken / "warn-range.png").write_bytes(png_header_only(12_000, 11_200))  # 1.5x Pillow's limit
    (root / "readme.txt").write_text("not an image and not an image extension: never listed\n")
    dup_dir = root / "x-copies"  # sorts after the originals
    dup_dir.mkdir()
    first = sorted(root.glob("set0/*/*.png"))[0]
    shutil.copy(first, dup_dir / "copy-a.png")
    shutil.copy(first, dup_dir / "copy-b.png")
    shutil.copy(sorted(root.glob("set1/*/*.jpg"))[0], dup_dir / "copy-c.jpg")
    rejected, duplicates = 5, 3
    return {"found": n_good + rejected + duplicates, "duplicates": duplicates, "rejected": rejected,
            "accepted": n_good}


def start_run_until_training(tmp_path: Path) -> tuple[object, Path]:
    """A real ``imgclust run`` on 300 digits, returned (process, log) once it has started training."""
    import os
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i, img in enumerate(digit_images(300)[0]):
        Image.fromarray(img).save(src / f"{i:03d}.png")
    log = tmp_path / "log.txt"
    import signal

    def as_from_a_terminal() -> None:
        # A child inherits an ignored SIGINT from its parent (Python then installs no Ctrl-C
        # handler); a command started at a terminal has the default, which the tests mean to test.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "imgclust.cli", "run", str(src), str(tmp_path / "out"), "-k",
                                 "3", "--no-progress"], stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 300
    while "train:" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    return proc, log
