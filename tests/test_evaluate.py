"""Scoring a run against known labels: the metrics and the `imgclust evaluate` command."""

import json

import numpy as np
import pandas as pd
import pytest

from imgclust.metrics import hungarian_accuracy, purity, score
from tests.test_cli import imgclust


def test_metrics_on_a_known_contingency():
    labels = np.array(["a"] * 4 + ["b"] * 4)
    clusters = np.array([1, 1, 1, 0, 0, 0, 0, 2])
    assert hungarian_accuracy(labels, clusters) == pytest.approx(6 / 8)  # one cluster per label
    assert purity(labels, clusters) == pytest.approx(7 / 8)
    perfect = score(labels, np.array([5] * 4 + [9] * 4))
    assert perfect["accuracy"] == perfect["nmi"] == perfect["ari"] == pytest.approx(1.0)
    assert perfect["contingency"]["counts"] == [[4, 0], [0, 4]]


def test_knn_vote_accuracy_is_the_majority_label_of_the_nearest_codes():
    from imgclust.metrics import knn_vote_accuracy

    codes = np.array([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [10.0], [10.1], [10.2], [10.3], [10.4], [10.5]])
    labels = np.array(["a"] * 6 + ["b"] * 6)
    assert knn_vote_accuracy(codes, labels, 5) == 1.0
    flipped = labels.copy()
    flipped[0] = "b"  # its neighbours still vote a: wrong for it, right for the rest
    assert knn_vote_accuracy(codes, flipped, 5) == pytest.approx(11 / 12)


def test_evaluate_command_with_folder_names_and_a_csv(finished_run, tmp_path):
    _, out, counts, _ = finished_run
    r = imgclust("evaluate", str(out), "--labels", "parent-folder")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "accuracy" in r.stdout and "contingency" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == counts["accepted"] and 0 < metrics["accuracy"] <= 1
    assert set(metrics["contingency"]["labels"]) <= {f"digit_{d}" for d in range(10)}
    assert "accuracy (Hungarian)" in (out / "report" / "index.html").read_text()
    assert 0 < metrics["knn5_vote_accuracy"] <= 1 and "5-NN vote" in r.stdout

    a = pd.read_parquet(out / "assignments.parquet")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"path": a["path"][:10], "label": a["cluster"][:10]}).to_csv(csv, index=False)
    r = imgclust("evaluate", str(out), "--labels", str(csv))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 10 and m["accuracy"] == 1.0 and m["unlabelled"] == counts["accepted"] - 10
    r = imgclust("evaluate", str(out), "--labels", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "labels file not found" in r.stderr
