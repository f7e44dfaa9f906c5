"""The whole product on a corpus of real files with broken ones and duplicates in nested folders."""

import json

import numpy as np
import pandas as pd

from imgclust.config import RunConfig
from imgclust.io.arrays import open_array
from imgclust.io.tables import read_parts


def test_outputs_exist_and_counts_add_up(finished_run):
    _, out, counts, r = finished_run
    for name in ("images.zarr", "codes.zarr", "model/weights.pt", "model/model.json", "model/clustering.npz", "manifest.parquet",
                 "rejected.parquet", "duplicates.parquet", "assignments.parquet", "clusters.json", "run.json",
                 "near_duplicates.parquet", "index/index.json"):
        assert (out / name).exists(), name
    manifest = pd.read_parquet(out / "manifest.parquet")
    rejected = pd.read_parquet(out / "rejected.parquet")
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert len(manifest) + len(rejected) + len(dups) == counts["found"]
    assert (len(manifest), len(rejected), len(dups)) == (counts["accepted"], counts["rejected"], counts["duplicates"])
    run = json.loads((out / "run.json").read_text())
    near = read_parts(str(out / "near_duplicates.parquet"))
    assert run["counts"] == {"found": counts["found"], "duplicates": counts["duplicates"],
                             "rejected": counts["rejected"], "accepted": counts["accepted"], "clusters": 3,
                             "near_duplicate_groups": near["group"].nunique(), "near_duplicate_images": len(near)}
    assert set(near["path"]) <= set(manifest["path"])
    assert set(run["seconds"]) == {"discover", "ingest", "train", "encode", "cluster", "refine", "neighbours", "publish",
                                   "report"}
    assert run["refine"] == {"skipped": "fewer than 50 images per cluster"}  # 60 images, k=3
    assert run["resolved"]["color"] == "gray" and run["config"]["batch_size"] == 16
    assert run["versions"]["torch"].startswith("2.")
    assert len(run["train_loss"]) == 2
    assert open_array(str(out / "images.zarr")).shape == (counts["accepted"], 1, 16, 16)
    assert open_array(str(out / "codes.zarr")).shape[0] == counts["accepted"]
    assert "rejected" in r.stdout and str(out) in r.stdout


def test_every_image_has_a_cluster_and_clusters_are_not_empty(finished_run):
    _, out, counts, _ = finished_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    a = pd.read_parquet(out / "assignments.parquet")
    assert a["path"].tolist() == manifest["path"].tolist()
    assert a["cluster"].dtype == np.int64 and set(a["cluster"]) == {0, 1, 2}
    assert (a["distance"] >= 0).all()
    clusters = json.loads((out / "clusters.json").read_text())
    assert [c["id"] for c in clusters] == [0, 1, 2]
    assert sum(c["size"] for c in clusters) == counts["accepted"]
    assert all(c["size"] > 0 and 1 <= len(c["nearest"]) <= 9 for c in clusters)
    assert all(set(c["nearest"]) <= set(a.loc[a["cluster"] == c["id"], "path"]) for c in clusters)


def test_rejected_reasons_are_readable(finished_run):
    _, out, _, _ = finished_run
    rejected = pd.read_parquet(out / "rejected.parquet")
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert reasons["broken/deeper/empty.png"] == "empty file (0 bytes)"
    assert reasons["broken/deeper/notes.jpg"] == "not a recognised image format"
    assert "truncated" in reasons["broken/deeper/truncated.jpg"]
    assert all(len(r) > 10 and "Traceback" not in r for r in reasons.values())


def test_same_seed_gives_same_assignments_and_overwrite_replaces(finished_run, prefect_harness, tmp_path):
    from flows.cluster_archive import cluster_archive

    root, out, _, _ = finished_run
    before = pd.read_parquet(out / "assignments.parquet")
    again = tmp_path / "again"
    again.mkdir()
    (again / "run.json").write_text("{}")  # an earlier finished run ...
    (again / "notes.txt").write_text("mine")  # ... and a file of the user's, which must survive
    cfg = RunConfig(source=str(root), output=str(again), image_size=16, epochs=2, n_clusters=3, seed=0,
                    shard_size=16, batch_size=16, color="gray", overwrite=True)
    cluster_archive(cfg)
    pd.testing.assert_frame_equal(before, pd.read_parquet(again / "assignments.parquet"))
    assert (again / "notes.txt").read_text() == "mine"
    assert json.loads((again / "run.json").read_text())["counts"]["clusters"] == 3
