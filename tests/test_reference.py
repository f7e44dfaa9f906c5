"""Same seed, same assignments: short runs must reproduce the assignments stored in ``tests/data/``.

The reference files were written by these exact commands; regenerate them (``IMGCLUST_WRITE_REFERENCE=1``)
only for a change of results made on purpose, with the accuracy before and after in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import imgclust

DATA = Path(__file__).parent / "data"
DIGITS_SETTINGS = ["-k", "10", "--seed", "0", "--epochs", "2", "--image-size", "16", "--no-progress"]


def check_against(reference: Path, out: Path) -> None:
    got = pd.read_parquet(out / "assignments.parquet")[["path", "cluster", "distance"]]
    if os.environ.get("IMGCLUST_WRITE_REFERENCE") == "1":
        got.to_csv(reference, index=False, float_format="%.6g")
    want = pd.read_csv(reference, keep_default_na=False)
    assert got["path"].tolist() == want["path"].tolist()
    assert (got["cluster"].to_numpy() == want["cluster"].to_numpy()).all(), \
        f"{(got['cluster'].to_numpy() != want['cluster'].to_numpy()).sum()} images changed cluster"
    np.testing.assert_allclose(got["distance"].to_numpy(), want["distance"].to_numpy(), rtol=1e-3, atol=1e-4)


def test_the_test_corpus_run_gives_the_reference_assignments(finished_run):
    """The shared short run (odd formats, rejects, duplicates; 16 px, 2 epochs, k = 3)."""
    _, out, _, _ = finished_run
    check_against(DATA / "reference-corpus.csv", out)


@pytest.mark.slow
def test_the_digits_sample_with_refinement_gives_the_reference_assignments(tmp_path):
    """The digits sample with the default preset, K-means and refinement (16 px, 2 epochs, k = 10)."""
    src, out = tmp_path / "digits", tmp_path / "out"
    r = imgclust("sample", str(src))
    assert r.returncode == 0, r.stderr
    r = imgclust("run", str(src), str(out), *DIGITS_SETTINGS)
    assert r.returncode == 0, r.stderr[-3000:]
    check_against(DATA / "reference-digits.csv", out)
