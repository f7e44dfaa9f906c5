import numpy as np
from sklearn.cluster import KMeans
from sklearn.datasets import make_moons

from imgclust.cluster.merge import merge_subclusters, subcluster_count
from imgclust.metrics import score


def test_pieces_joined_along_the_manifold_recover_shapes_that_kmeans_cuts():
    """Two interleaved moons: K-means cuts across them; its pieces joined by k-NN links do not."""
    x, y = make_moons(2000, noise=0.05, random_state=0)
    kmeans = KMeans(2, n_init=10, random_state=0).fit_predict(x)
    n_pieces = subcluster_count(2, len(x))
    pieces = KMeans(n_pieces, n_init=3, random_state=0).fit_predict(x)
    merged = merge_subclusters(x, pieces, 2, seed=0)
    assert n_pieces == 10 and merged.shape == (n_pieces,) and set(merged.tolist()) == {0, 1}
    assert score(y, merged[pieces])["accuracy"] > 0.99 > 0.9 > score(y, kmeans)["accuracy"]


def test_small_corpora_are_not_cut_into_pieces_too_small_to_link():
    assert subcluster_count(10, 1797) == 50
    assert subcluster_count(10, 300) == 15 and subcluster_count(3, 40) == 3


def test_new_codes_take_the_cluster_of_their_nearest_piece():
    """A merged cluster is not convex: its own centre may lie nearer another cluster's points."""
    from imgclust.cluster.placement import ClusterPlacement

    sub_centres = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 1.0]])
    model = ClusterPlacement(centres=np.array([[5.0, 0.0], [5.0, 1.0]]), sub_centres=sub_centres,
                             sub_to_cluster=np.array([0, 0, 1]))
    labels, dist = model.assign(np.array([[0.5, 0.0], [9.0, 0.0], [5.0, 1.2]]))
    assert labels.tolist() == [0, 0, 1]  # the nearest centre of the first two would be cluster 1's
    assert np.allclose(dist, [4.5, 4.0, 0.2])
