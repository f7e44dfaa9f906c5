"""Random samples of rows, drawn the same way everywhere so that the same seed gives the same sample."""

from __future__ import annotations

import numpy as np


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, size)`` distinct rows of ``range(n)``, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, size), replace=False))
