"""A sample corpus of real images that ships with scikit-learn: the 1,797 handwritten digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(folder: str | Path, size: int = 28) -> int:
    """Write each 8x8 digit, upscaled to ``size``, as ``folder/<digit>/<index>.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(folder)
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        arr = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").resize((size, size), Image.Resampling.BILINEAR).save(d / f"{i:04d}.png")
    return len(digits.images)
