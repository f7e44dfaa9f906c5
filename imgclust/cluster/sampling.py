"""Random samples of rows, drawn the same way everywhere so that the same seed gives the same sample."""

from __future__ import annotations

import numpy as np


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, size)`` distinct rows of ``range(n)``, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


# Samples that grow where quality needs it: each is at least a fixed size, and grows with k so
# that every cluster keeps enough members in it. Their cost is linear in the rows they hold.
UMAP_FIT_ROWS, UMAP_ROWS_PER_CLUSTER = 20_000, 50
REFINE_ROWS, REFINE_ROWS_PER_CLUSTER = 20_000, 300


def umap_fit_rows(n: int, k: int | None = None) -> int:
    """Rows UMAP is fitted on: ``min(n, max(20,000, 50 k))`` (k when given; the rest of the codes
    are placed from their 15 nearest fitted ones). Fitting costs about 40 s per 20k rows here."""
    return min(n, max(UMAP_FIT_ROWS, UMAP_ROWS_PER_CLUSTER * (k or 0)))


def refine_rows(n: int, k: int) -> int:
    """Images the cluster net trains on: ``min(n, max(20,000, 300 k))``, so that at k = 1,000 each
    cluster still has about 300 (its confident half labels the net's last phase). The steps are
    fixed, so the cost grows only with reading and scoring the sample."""
    return min(n, max(REFINE_ROWS, REFINE_ROWS_PER_CLUSTER * k))
