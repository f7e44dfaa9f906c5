"""How codes are scaled before clustering, decided in one place for the cluster stage and evaluation."""

from __future__ import annotations

import numpy as np

UNIT_NORM_TOLERANCE = 1e-3  # squared norms this close to 1: codes on the unit sphere


def code_scale(sd: np.ndarray, sq_norm_min: float, sq_norm_max: float) -> np.ndarray:
    """Divisor per dimension: the standard deviation (constant dimensions: 1), or all ones for codes
    on the unit sphere (contrastive models), whose angles per-dimension scaling would distort
    (Fashion-70k, UMAP of a 20k sample + K-means: ACC 0.634 unscaled, 0.594 standardised)."""
    if abs(sq_norm_min - 1) < UNIT_NORM_TOLERANCE and abs(sq_norm_max - 1) < UNIT_NORM_TOLERANCE:
        return np.ones_like(sd, dtype=np.float64)
    return np.where(sd > 1e-8, sd, 1.0)
