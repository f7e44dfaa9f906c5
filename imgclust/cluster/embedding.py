"""A UMAP manifold of the codes, fitted on a sample and kept as arrays.

A fitted ``umap.UMAP`` object cannot be stored without pickling it. What placing a new point
needs is small: the fitted sample and its embedding. ``place`` does what the first step of UMAP's
own ``transform`` does: each new point goes to the weighted mean of the embeddings of its
``n_neighbors`` nearest fitted points, with UMAP's fuzzy membership weights
``exp(-(d - rho) / sigma)`` (``rho`` the distance to the nearest one, ``sigma`` set so the weights
sum to ``log2(n_neighbors)``). With ``min_dist=0`` the embedded clusters are tight, so a point
among one cluster's neighbours lands inside that cluster (``tests/test_embedding.py`` measures
how often held-out points land where a fit on all of them put them).
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from imgclust.cluster.sampling import sample_rows, umap_fit_rows

N_NEIGHBORS = 15  # as UMAP's own default and fit


@dataclass(frozen=True)
class FittedSample:
    """The fitted sample (S, D) float32 and its embedding (S, d) float32."""

    reference: np.ndarray
    embedding: np.ndarray


def fit_umap(sample: np.ndarray, seed: int, n_components: int = 10) -> np.ndarray:
    """UMAP embedding (S, d) float32 of a sample (S, D), single-threaded for a fixed result."""
    import umap

    reducer = umap.UMAP(n_neighbors=min(N_NEIGHBORS, max(2, len(sample) - 1)),
                        n_components=min(n_components, max(2, len(sample) - 2)),
                        min_dist=0.0, metric="euclidean", random_state=seed, n_jobs=1)
    return reducer.fit_transform(sample).astype(np.float32)


def _membership_weights(dist: np.ndarray, iterations: int = 64) -> np.ndarray:
    """UMAP's smooth k-NN weights for rows of sorted neighbour distances (N, k)."""
    k = dist.shape[1]
    target = np.log2(k)
    rho = dist[:, :1]
    excess = np.maximum(dist - rho, 0.0)
    lo, hi = np.zeros(len(dist)), np.full(len(dist), np.inf)
    sigma = np.ones(len(dist))
    for _ in range(iterations):
        total = np.exp(-excess / sigma[:, None]).sum(1)
        too_big = total > target  # weights too wide: shrink sigma
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    floor = 1e-3 * np.maximum(dist.mean(1), 1e-12)  # UMAP's MIN_K_DIST_SCALE
    sigma = np.maximum(sigma, floor)
    return np.exp(-excess / sigma[:, None])


def place(x: np.ndarray, reference: np.ndarray, embedding: np.ndarray,
          n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """Embed new rows (N, D) on the manifold of ``reference`` (S, D) -> ``embedding`` (S, d).

    Returns (N, d) float32.
    """
    from sklearn.neighbors import NearestNeighbors

    if len(x) == 0:
        return np.zeros((0, embedding.shape[1]), np.float32)
    k = min(n_neighbors, len(reference))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(np.asarray(x, np.float32))
    w = _membership_weights(dist.astype(np.float64))
    out = (w[:, :, None] * embedding[idx].astype(np.float64)).sum(1) / w.sum(1, keepdims=True)
    return out.astype(np.float32)


def _place_block(block: np.ndarray, fitted: FittedSample) -> np.ndarray:
    return place(block, fitted.reference, fitted.embedding)


def umap_embed(x: da.Array, seed: int, n_components: int = 10,
               fit_rows: int | None = None) -> tuple[da.Array, FittedSample]:
    """UMAP fitted on a sample of ``x`` (at most ``fit_rows``, default ``umap_fit_rows``); every
    other row placed on it with ``place``.

    When the sample is all of ``x``, the rows keep their fitted embedding. Returns the (N, d)
    features and the fitted sample.
    """
    n = x.shape[0]
    rows = sample_rows(n, fit_rows or umap_fit_rows(n), seed)
    sample = x[rows].compute().astype(np.float32)
    emb = fit_umap(sample, seed, n_components)
    fitted = FittedSample(sample, emb)
    if len(rows) == n:
        return da.from_array(emb, chunks=(x.chunks[0], emb.shape[1])), fitted
    # The fitted sample enters the graph once, as one key: each worker fetches and keeps one copy.
    held = dask.delayed(fitted, pure=True)
    return x.map_blocks(_place_block, held, chunks=(x.chunks[0], (emb.shape[1],)), dtype=np.float32,
                        meta=np.zeros((0, emb.shape[1]), np.float32)), fitted
