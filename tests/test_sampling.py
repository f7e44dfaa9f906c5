"""Samples: the same seed draws the same rows, and the samples grow with k where quality needs it."""

import numpy as np

from imgclust.cluster.sampling import refine_rows, sample_rows, umap_fit_rows


def test_sample_rows_are_sorted_distinct_and_fixed_by_the_seed():
    a = sample_rows(1000, 100, 3)
    assert len(a) == 100 and (np.diff(a) > 0).all() and (a == sample_rows(1000, 100, 3)).all()
    assert len(sample_rows(50, 100, 3)) == 50


def test_samples_grow_with_k_and_never_exceed_the_corpus():
    assert umap_fit_rows(10_000_000) == 20_000 and umap_fit_rows(10_000_000, 1_000) == 50_000
    assert umap_fit_rows(5_000, 1_000) == 5_000
    assert refine_rows(10_000_000, 20) == 20_000
    assert refine_rows(10_000_000, 1_000) == 300_000  # 300 images per cluster at k = 1,000
    assert refine_rows(70_000, 1_000) == 70_000
