"""The space codes are clustered in: standardised codes, optionally embedded on a manifold.

``CodeSpace`` is fitted state kept as plain arrays (no pickled estimator): the per-dimension mean
and scale, and when the preset embeds with UMAP the sample it was fitted on with its embedding,
from which any new code is placed (``imgclust.cluster.embedding.place``).
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

UNIT_NORM_TOLERANCE = 1e-3  # squared norms this close to 1: codes on the unit sphere


def code_scale(sd: np.ndarray, sq_norm_min: float, sq_norm_max: float) -> np.ndarray:
    """Divisor per dimension: the standard deviation (constant dimensions: 1), or all ones for codes
    on the unit sphere (contrastive models), whose angles per-dimension scaling would distort
    (Fashion-70k, UMAP of a 20k sample + K-means: ACC 0.634 unscaled, 0.594 standardised)."""
    if abs(sq_norm_min - 1) < UNIT_NORM_TOLERANCE and abs(sq_norm_max - 1) < UNIT_NORM_TOLERANCE:
        return np.ones_like(sd, dtype=np.float64)
    return np.where(sd > 1e-8, sd, 1.0)


def standardise(codes: da.Array) -> tuple[da.Array, np.ndarray, np.ndarray]:
    """Zero mean, unit variance per dimension (constant dimensions are left at zero); also mean, std.

    Codes on the unit sphere are only centred (``code_scale``).
    """
    if codes.shape[0] == 0:
        return codes, np.zeros(codes.shape[1]), np.ones(codes.shape[1])
    sq = (codes.astype(np.float64) ** 2).sum(axis=1)
    mu, sd, lo, hi = dask.compute(codes.mean(axis=0), codes.std(axis=0), sq.min(), sq.max())
    sd = code_scale(sd, lo, hi)
    return (codes - mu) / sd, np.asarray(mu, np.float64), np.asarray(sd, np.float64)


@dataclass
class CodeSpace:
    """Fitted map from codes (N, D) to the features (N, d) that clustering sees.

    Attributes
    ----------
    mean, std:
        (D,) float64: ``(codes - mean) / std`` are the standardised codes.
    reference, embedding:
        (S, D) standardised codes of the sample the embedding was fitted on and their (S, d)
        embedding; both None when the codes are clustered as they are (d = D).
    """

    mean: np.ndarray
    std: np.ndarray
    reference: np.ndarray | None = None
    embedding: np.ndarray | None = None

    def standardise(self, codes: np.ndarray) -> np.ndarray:
        """(N, D) codes -> (N, D) float64 standardised codes."""
        return (np.asarray(codes, np.float64) - self.mean) / self.std

    def features(self, codes: np.ndarray) -> np.ndarray:
        """(N, D) codes -> (N, d) float64 features."""
        x = self.standardise(codes)
        if self.reference is None or self.embedding is None:
            return x
        from imgclust.cluster.embedding import place

        return place(x.astype(np.float32), self.reference, self.embedding).astype(np.float64)
