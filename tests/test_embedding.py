"""The UMAP manifold kept as arrays: new codes placed from their nearest fitted codes."""

from __future__ import annotations

import numpy as np

from imgclust.cluster.embedding import _membership_weights, fit_umap, place


def blobs(n_per: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (k, d))
    x = np.concatenate([c + rng.normal(0, 1, (n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_weights_sum_to_log2_k_like_umaps_fuzzy_neighbourhoods():
    dist = np.sort(np.random.default_rng(0).random((50, 15)) * 3, axis=1)
    w = _membership_weights(dist)
    np.testing.assert_allclose(w.sum(1), np.log2(15), rtol=1e-3)
    assert (w[:, 0] == 1).all() and (np.diff(w, axis=1) <= 1e-12).all()  # nearest weighs most


def test_held_out_codes_land_in_the_cluster_their_neighbours_were_embedded_in():
    """Fit on 70 % of the rows, place the other 30 %: each lands among its own group's embedding."""
    from sklearn.cluster import KMeans

    x, truth = blobs(120, 5, 16, 0)
    rng = np.random.default_rng(1)
    fit_rows = np.sort(rng.choice(len(x), size=420, replace=False))
    rest = np.setdiff1d(np.arange(len(x)), fit_rows)
    emb = fit_umap(x[fit_rows], seed=0, n_components=4)
    km = KMeans(5, n_init=10, random_state=0).fit(emb)
    placed = place(x[rest], x[fit_rows], emb)
    assert placed.shape == (len(rest), 4) and placed.dtype == np.float32
    # The cluster each held-out code gets is the one its group got in the fit.
    group_cluster = {g: np.bincount(km.labels_[truth[fit_rows] == g]).argmax() for g in range(5)}
    expected = np.array([group_cluster[g] for g in truth[rest]])
    assert (km.predict(placed) == expected).mean() >= 0.98
    # A fitted code placed again lands next to its own embedding.
    again = place(x[fit_rows[:50]], x[fit_rows], emb)
    spread = np.linalg.norm(emb - emb.mean(0), axis=1).mean()
    assert np.median(np.linalg.norm(again - emb[:50], axis=1)) < 0.2 * spread
