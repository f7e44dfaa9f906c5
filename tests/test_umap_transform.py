"""UMAP fitted on a sample, the other codes placed on its manifold on the Dask workers.

Kept apart from test_cluster_publish (and after test_end_to_end in collection order): fitting UMAP
in the test process first changes nothing, but keeps the order the suite has always run in.
"""


from imgclust.io.arrays import create_array
from tests.test_cluster_publish import blobs, cluster_at, place, saved_and_loaded


def test_umap_fitted_on_a_sample_places_the_other_codes_on_the_workers(tmp_path, client, monkeypatch):
    """Above the UMAP fit sample's size (``umap_fit_rows``), UMAP is fitted on a sample and the rest are placed on its manifold
    on the Dask workers; the saved model must place codes where the run did."""
    from sklearn.metrics import adjusted_rand_score

    import imgclust.cluster.sampling
    from imgclust.io.arrays import open_array

    monkeypatch.setattr(imgclust.cluster.sampling, "UMAP_FIT_ROWS", 120)
    x, truth = blobs(n_per=100, k=3)
    url = str(tmp_path / "codes.zarr")
    create_array(url, x.shape, 50, "float32")[:] = x
    fit = cluster_at(url, tmp_path, 3, "umap", client)
    labels = open_array(fit.clustering.labels_url)[:]
    assert adjusted_rand_score(truth, labels) > 0.99
    model = saved_and_loaded(fit, tmp_path / "model")
    # max(120, 50 k) rows with k = 3: the fit sample grows with k
    assert model.code_space.reference is not None and len(model.code_space.reference) == 150
    assert (place(model, x)[0] == labels).mean() > 0.99
