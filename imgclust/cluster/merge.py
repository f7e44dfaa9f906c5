"""Over-cluster, then merge by k-NN connectivity: K-means' partition of a UMAP manifold, repaired.

K-means on a UMAP embedding cuts long or large manifold clusters in two and lumps small neighbouring
ones together (Fashion-MNIST: bags split, sandals merged into sneakers). Cutting the manifold into
``SUBCLUSTERS_PER_CLUSTER`` times more K-means pieces and joining the pieces by spectral clustering of
how densely the k-NN graph links them follows the manifold's shape instead.

Opt-in (``--merge``), not the default: it can fix K-means' worst cuts, but does not reliably
improve whole runs (bench/RESULTS.md).
"""

from __future__ import annotations

import numpy as np

SUBCLUSTERS_PER_CLUSTER = 5
MIN_PER_SUBCLUSTER = 20  # pieces smaller than this are too noisy to link
NEIGHBOURS = 15  # as UMAP's own graph


def subcluster_count(k: int, n: int) -> int:
    """How many K-means pieces to cut ``n`` points into for ``k`` final clusters (``k`` = no merging)."""
    return max(k, min(SUBCLUSTERS_PER_CLUSTER * k, n // MIN_PER_SUBCLUSTER))


def merge_subclusters(sample: np.ndarray, pieces: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Final cluster (0..k-1) of each piece, from a sample of the features (S, d) and its pieces (S,).

    The affinity of two pieces is the number of k-NN edges between them over the geometric mean of
    their sizes (so big pieces do not attract everything); spectral clustering of that small
    (pieces x pieces) graph joins pieces that the manifold connects.
    """
    import scipy.sparse as sp
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    n_pieces = int(pieces.max()) + 1
    graph = kneighbors_graph(sample, min(NEIGHBOURS, len(sample) - 1), include_self=False)
    graph = graph + graph.T
    member = sp.csr_matrix((np.ones(len(pieces)), (pieces, np.arange(len(pieces)))), shape=(n_pieces, len(pieces)))
    links = (member @ graph @ member.T).toarray()
    sizes = np.maximum(np.bincount(pieces, minlength=n_pieces), 1)
    affinity = links / np.sqrt(np.outer(sizes, sizes))
    np.fill_diagonal(affinity, 0.0)
    spectral = SpectralClustering(k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr")
    return spectral.fit(affinity + 1e-9).labels_.astype(np.int64)
