"""UMAP fitted on a sample, the other codes placed by ``transform`` on the Dask workers.

Kept apart from test_cluster_publish (and after test_end_to_end in collection order): fitting UMAP
in the test process before the in-process reproducibility test coincided with one run whose
assignments differed from the CLI's; under investigation.
"""


from imgclust.zarr_store import create_array
from tasks.cluster import cluster_codes
from tests.test_cluster_publish import blobs


def test_umap_fitted_on_a_sample_places_the_other_codes_on_the_workers(tmp_path, client, monkeypatch):
    """Above UMAP_SAMPLE codes, UMAP is fitted on a sample and the rest go through ``transform``
    on the Dask workers; the saved clusterer must place codes where the run did."""
    from sklearn.metrics import adjusted_rand_score

    import tasks.cluster
    from imgclust.zarr_store import open_array
    from tasks.cluster import load_cluster_model

    monkeypatch.setattr(tasks.cluster, "UMAP_SAMPLE", 120)
    x, truth = blobs(n_per=100, k=3)
    url = str(tmp_path / "codes.zarr")
    create_array(url, x.shape, 50, "float32")[:] = x
    res = cluster_codes(url, str(tmp_path), {}, 3, "umap", 0, client)
    labels = open_array(res.labels_url)[:]
    assert adjusted_rand_score(truth, labels) > 0.99
    model = load_cluster_model(str(tmp_path / "model" / "clusterer.pkl"), {})
    assert model.reducer is not None and (model.assign(x)[0] == labels).mean() > 0.99
