"""Which cluster a point of the feature space belongs to, kept as arrays: the fitted clusters of a run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgclust.cluster.density import nearest_reference
from imgclust.cluster.kmeans import distance_to_centre, nearest_centre


@dataclass
class ClusterPlacement:
    """Final clusters in the feature space.

    Attributes
    ----------
    centres:
        (k, d) float64 centre of final cluster ``i`` (distances are measured to it).
    reference, reference_labels:
        Density presets: (S, d) sampled features and their cluster (S,); a point takes the cluster
        of its nearest reference (DBSCAN has no ``predict``).
    sub_centres, sub_to_cluster:
        Merged presets: (P, d) K-means pieces and the cluster (P,) each was joined into.
    """

    centres: np.ndarray
    reference: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
    sub_centres: np.ndarray | None = None
    sub_to_cluster: np.ndarray | None = None

    @property
    def kind(self) -> str:
        if self.reference is not None:
            return "reference"
        if self.sub_centres is not None:
            return "pieces"
        return "centres"

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cluster (N,) int64 and distance (N,) float64 to its centre for features (N, d)."""
        if len(x) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if self.reference is not None:
            lab = nearest_reference(x, self.reference, self.reference_labels)[:, 0].astype(np.int64)
            return lab, distance_to_centre(x, self.centres, lab)
        if self.sub_centres is not None:
            lab = self.sub_to_cluster[nearest_centre(x, self.sub_centres)[:, 0].astype(np.int64)].astype(np.int64)
            return lab, distance_to_centre(x, self.centres, lab)
        out = nearest_centre(x, self.centres)
        return out[:, 0].astype(np.int64), out[:, 1]

    def distances(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Distance (N,) of each feature row to the centre of the cluster it was given (by a refiner, say)."""
        if len(x) == 0:
            return np.zeros(0)
        return distance_to_centre(x, self.centres, labels)
