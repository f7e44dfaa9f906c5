"""Clustering scores against known labels (used for evaluation only, never for training)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(labels: np.ndarray, clusters: np.ndarray) -> pd.DataFrame:
    """Rows are clusters, columns are labels, cells are image counts."""
    return pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(labels, name="label"))


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one matching of clusters to labels; extra clusters count as wrong."""
    table = contingency(labels, clusters).to_numpy()
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of images whose cluster's majority label is their own."""
    return float(contingency(labels, clusters).to_numpy().max(axis=1).sum() / len(labels))


def score(labels: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    table = contingency(labels, clusters)
    return {
        "n": len(labels),
        "accuracy": hungarian_accuracy(labels, clusters),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "purity": purity(labels, clusters),
        "contingency": {"clusters": [int(c) for c in table.index], "labels": [str(c) for c in table.columns],
                        "counts": table.to_numpy().tolist()},
    }


def knn_vote_accuracy(codes: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of images whose label is the majority label of their ``k`` nearest other images
    (Euclidean distance between codes): the VAE write-up's measure of how well codes group labels.
    Ties go to the label of the nearest neighbour among the tied ones."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    k = min(k, len(labels) - 1)
    if k < 1:
        return float("nan")
    idx = NearestNeighbors(n_neighbors=k + 1).fit(codes).kneighbors(codes)[1]
    hits = 0
    for i, row in enumerate(idx):
        neigh = [j for j in row if j != i][:k]
        votes = pd.Series(labels[neigh]).value_counts(sort=False)
        top = votes[votes == votes.max()].index
        winner = next(labels[j] for j in neigh if labels[j] in top)
        hits += winner == labels[i]
    return hits / len(labels)
