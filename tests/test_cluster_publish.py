import json

import dask.array as da
import numpy as np
import pandas as pd

from imgclust.cluster.code_space import standardise
from imgclust.cluster.kmeans import (
    choose_k,
    cluster_means,
    dask_centres_of_labels,
    dask_label_counts,
    distance_to_centre,
    relabel_by_size,
    size_order,
)
from imgclust.io.arrays import create_array
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.cluster import ClusterSettings, cluster_codes
from imgclust.stages.publish import publish, size_balance


def cluster_at(url, out, k, embedding, client, **settings):
    """The cluster stage's function on codes at ``url``, results under ``out``."""
    return cluster_codes(Location(str(url)), RunStore(str(out)), ClusterSettings(k, embedding, 0, **settings), client)


def saved_and_loaded(fit, folder):
    """The fitted clusters as a run's model stores them, read back."""
    RunModel(None, {}, fit.code_space, fit.placement).save(Location(str(folder)))
    return RunModel.load(Location(str(folder)))


def place(model, codes):
    return model.placement.assign(model.features(codes))


def blobs(n_per=60, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 1, (n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_kmeans_on_codes_recovers_separated_groups(tmp_path, client):
    x, truth = blobs()
    url = str(tmp_path / "codes.zarr")
    create_array(url, x.shape, 64, "float32")[:] = x
    fit = cluster_at(url, tmp_path, 4, "none", client)
    res = fit.clustering
    from imgclust.io.arrays import open_array
    labels = open_array(res.labels_url)[:]
    assert res.n_clusters == 4 and len(labels) == len(x)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(truth, labels) > 0.99
    again = cluster_at(url, tmp_path / "again", 4, "none", client).clustering
    assert (open_array(again.labels_url)[:] == labels).all()
    # The saved model places codes exactly where the run put them.
    model = saved_and_loaded(fit, tmp_path / "model")
    lab, dist = place(model, x)
    assert (lab == labels).all()
    np.testing.assert_allclose(dist, open_array(res.distances_url)[:], rtol=1e-4, atol=1e-4)


def test_dbscan_on_a_2d_map_finds_the_groups_itself_and_places_new_codes(tmp_path, client):
    from sklearn.metrics import adjusted_rand_score

    from imgclust.io.arrays import open_array

    x, truth = blobs(n_per=80, k=3)
    url = str(tmp_path / "codes.zarr")
    create_array(url, x.shape, 64, "float32")[:] = x
    fit = cluster_at(url, tmp_path, None, "tsne", client, method="dbscan", embedding_dim=2)
    res = fit.clustering
    labels = open_array(res.labels_url)[:]
    assert res.n_clusters == 3 and adjusted_rand_score(truth, labels) > 0.99
    model = saved_and_loaded(fit, tmp_path / "model")
    new = x[::10] + np.random.default_rng(1).normal(0, 0.1, x[::10].shape).astype(np.float32)
    lab, dist = place(model, new)
    assert (lab == labels[::10]).all() and (dist >= 0).all()


def test_k_is_chosen_from_the_data_when_not_given():
    x, _ = blobs(k=5)
    k, curve = choose_k(x, 0, k_max=9)
    assert k == 5 and set(curve) == set(range(2, 10))


def test_relabel_orders_by_size_and_removes_gaps():
    labels = np.array([3, 3, 3, 1, 1, 0])
    new, remap = relabel_by_size(labels, 4)
    assert new.tolist() == [0, 0, 0, 1, 1, 2] and remap.tolist() == [2, 1, 3, 0]


def test_publish_tables(tmp_path):
    out = str(tmp_path)
    n = 30
    RunStore(out).write_table("manifest", pd.DataFrame({
        "index": range(n), "path": [f"p{i:02d}.png" for i in range(n)], "sha256": [str(i) for i in range(n)],
        "width": 1, "height": 1, "format": "PNG"}))
    create_array(f"{out}/l.zarr", (n,), 8, "int32")[:] = np.arange(n) % 3
    create_array(f"{out}/d.zarr", (n,), 8, "float32")[:] = np.arange(n, dtype=np.float32)
    q = publish(RunStore(out), f"{out}/l.zarr", f"{out}/d.zarr")
    a = RunStore(out).read_table("assignments")
    assert list(a.columns) == ["path", "sha256", "cluster", "distance", "generation"] and len(a) == n
    assert a["cluster"].dtype == np.int64
    clusters = json.loads((tmp_path / "clusters.json").read_text())
    assert [c["size"] for c in clusters] == [10, 10, 10]
    assert clusters[1]["nearest"][:2] == ["p01.png", "p04.png"] and len(clusters[1]["nearest"]) == 9
    assert q["size_balance"] == __import__("pytest").approx(1.0) and size_balance(np.array([99.0, 1.0])) < 0.1


def _publish_inputs(root, n: int, rows_per_part: int) -> tuple[RunStore, str, str]:
    """A run with a manifest in parts, final labels (one large cluster, one empty id) and distances
    (with ties), and k-th neighbour distances for all but some images."""
    rng = np.random.default_rng(0)
    store = RunStore(str(root))
    store.write_table("manifest", pd.DataFrame({
        "index": range(n), "path": [f"d{i % 7}/p{i:05d}.png" for i in range(n)], "sha256": [f"{i:x}" for i in range(n)],
        "width": 1, "height": 1, "format": "PNG"}), rows_per_part=rows_per_part)
    labels = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 7, n))
    labels[labels == 4] = 5
    create_array(f"{root}/l.zarr", (n,), 256, "int32")[:] = labels
    create_array(f"{root}/d.zarr", (n,), 256, "float32")[:] = np.round(rng.gamma(2.0, 1.0, n), 2)
    known = np.sort(rng.choice(n, n - 50, replace=False))
    for part, rows in enumerate(np.array_split(rng.permutation(known), 3)):
        (root / "index" / "knn").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"index": rows, "kth_distance": rng.random(len(rows))}).to_parquet(
            root / "index" / "knn" / f"part-{part:05d}.parquet")
    return store, f"{root}/l.zarr", f"{root}/d.zarr"


def test_publish_on_workers_in_small_buckets_writes_what_one_pass_in_the_client_does(tmp_path, client):
    """The layout in many buckets (a cluster spread over several), written by the workers, equals
    the one-part layout of the whole table sorted here; so do the tables and clusters.json."""
    from imgclust.members import MemberLayout, write_members

    n = 6000
    whole, *arrays = _publish_inputs(tmp_path / "whole", n, 10**6)
    parts, *arrays_parts = _publish_inputs(tmp_path / "parts", n, 700)
    publish(whole, *arrays)
    publish(parts, *arrays_parts, client, bucket_rows=400)
    a, b = whole.read_table("assignments"), parts.read_table("assignments")
    pd.testing.assert_frame_equal(a, b)
    assert a["outlier"].isna().sum() == 50 and len(list((tmp_path / "parts" / "assignments.parquet").iterdir())) == 9
    assert json.loads((tmp_path / "whole" / "clusters.json").read_text()) == \
        json.loads((tmp_path / "parts" / "clusters.json").read_text())
    one, many = MemberLayout.open(whole), MemberLayout.open(parts)
    assert len(many.parts) >= n // 400 and len(one.parts) <= 2 and one.clusters == many.clusters
    assert 4 not in many.clusters and many.clusters[0][1] > 2000
    pd.testing.assert_frame_equal(one.read(0, n), many.read(0, n))
    reference = tmp_path / "reference"
    write_members(RunStore(str(reference)), a, np.arange(n), 0)  # the layout of the whole table, sorted here
    pd.testing.assert_frame_equal(MemberLayout.open(RunStore(str(reference))).read(0, n), many.read(0, n))
    pick = np.random.default_rng(1).choice(n, 300, replace=False)
    pd.testing.assert_frame_equal(many.rows_of(pick), many.read(0, n).set_index("index").loc[pick].reset_index()
                                  [["cluster", "distance", "path", "index"]])
    first, size = many.clusters[0]
    pd.testing.assert_frame_equal(many.members(0, size - 5, size + 5), many.read(first + size - 5, first + size))
    assert not (tmp_path / "parts" / "_work" / "publish").exists()
    assert sorted(p.name for p in (tmp_path / "parts" / "members").glob("*.parquet")) == [p[0] for p in many.parts]


def test_merged_pieces_follow_long_groups_and_the_clusterer_places_codes_as_the_run_did(tmp_path, client):
    """Two interleaved moons as codes: with ``merge`` the run cuts 10 K-means pieces and joins them per moon."""
    from sklearn.datasets import make_moons
    from sklearn.metrics import adjusted_rand_score

    from imgclust.io.arrays import open_array

    x, truth = make_moons(1200, noise=0.05, random_state=0)
    x = x.astype(np.float32)
    url = str(tmp_path / "codes.zarr")
    create_array(url, x.shape, 256, "float32")[:] = x
    plain = cluster_at(url, tmp_path / "plain", 2, "none", client).clustering
    fit = cluster_at(url, tmp_path / "merged", 2, "none", client, merge=True)
    labels = open_array(fit.clustering.labels_url)[:]
    assert adjusted_rand_score(truth, labels) > 0.95 > adjusted_rand_score(truth, open_array(plain.labels_url)[:])
    model = saved_and_loaded(fit, tmp_path / "merged" / "model")
    assert model.placement.sub_centres is not None and model.placement.sub_centres.shape == (10, 2)
    assert (place(model, x)[0] == labels).all()


def test_standardise_scales_each_dimension_but_keeps_unit_norm_codes_angles():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(500, 8)) * np.array([10, 1, 1, 1, 1, 1, 1, 0.1])
    x, mu, sd = standardise(da.from_array(raw, chunks=100))
    assert np.allclose(np.asarray(x).std(0), 1, atol=1e-6) and np.allclose(sd, raw.std(0))
    # Contrastive codes live on the unit sphere: per-dimension scaling would distort the angles
    # their loss shaped, so they are only centred (Euclidean distances unchanged).
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    y, mu, sd = standardise(da.from_array(unit, chunks=100))
    assert np.all(sd == 1.0) and np.allclose(mu, unit.mean(0))
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    assert np.allclose(d(np.asarray(y)), d(unit))


def test_publish_killed_at_every_write_never_reports_a_finished_run_until_it_is_one(finished_run, tmp_path):
    """The end of a run (tables, clusters.json, the report, run.json) killed before each of its
    writes in turn: the run never reads as finished before its last write, and doing the end again
    gives the uninterrupted run's tables, with every file in exactly one table."""
    import shutil

    from imgclust.io.storage import add_write_fence, remove_write_fence
    from imgclust.report.build import write_report
    from imgclust.stages.publish import write_run_record
    from tests.test_assign import Crash, CrashAt, every_file_in_exactly_one_table, frames

    root, out, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    record = {k: v for k, v in json.loads((run / "run.json").read_text()).items() if k != "versions"}
    store = RunStore(str(run))
    expected = frames(store.tables())
    for name in ("run.json", "clusters.json", "assignments.parquet", "report"):  # as if killed before publish
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    refined = (run / "_work" / "refined-labels.zarr").exists()
    labels, dist = (str(run / "_work" / f"{'refined-' if refined else ''}{a}.zarr") for a in ("labels", "distances"))

    def finish() -> None:
        publish(store, labels, dist)
        write_report(store, 0, record)
        write_run_record(store, record)

    kills = 0
    for n in range(1, 1000):
        fence = CrashAt(n)
        add_write_fence(fence)
        try:
            finish()
            break
        except Crash:
            kills += 1
            assert not store.is_finished, f"finished after a kill at write {n}"
        finally:
            remove_write_fence(fence)
    print(f"end of a run killed before each of its {kills} writes")
    assert kills >= 5 and fence.seen[-1].endswith("run.json"), fence.seen
    assert store.is_finished
    for name, frame in frames(store.tables()).items():
        pd.testing.assert_frame_equal(frame, expected[name], obj=name)
    every_file_in_exactly_one_table(run, root)
    assert (run / "report" / "index.html").exists()


def test_centres_counts_and_distances_computed_block_by_block_equal_the_whole_arrays():
    import dask
    import dask.array as da

    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(1000, 3)), rng.integers(0, 5, 1000)
    labels[labels == 3] = 4  # an empty cluster
    xd, ld = da.from_array(x, chunks=(128, 3)), da.from_array(labels, chunks=128)
    with dask.config.set(scheduler="sync"):
        counts = dask_label_counts(ld, 6)
        centres, out = dask_centres_of_labels(xd, ld[:, None], 6)
        out = out.compute()
    assert counts.tolist() == np.bincount(labels, minlength=6).tolist()
    assert np.allclose(centres, cluster_means(x, labels, 6)) and not centres[3].any()
    assert out[:, 0].tolist() == labels.tolist()
    assert np.allclose(out[:, 1], distance_to_centre(x, cluster_means(x, labels, 6), labels))
    assert size_order(counts).tolist() == relabel_by_size(labels, 6)[1].tolist()
