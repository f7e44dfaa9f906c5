"""Incremental runs: only new content is ingested, encoded and assigned; a second call does nothing."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgclust.io.arrays import open_array
from tests.test_cli import imgclust


def test_assign_new_images_to_a_finished_run(finished_run, tmp_path):
    root, out, counts, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)  # the shared run stays as it was for other tests
    before = pd.read_parquet(run / "assignments.parquet")
    new = tmp_path / "incoming"
    (new / "day2").mkdir(parents=True)
    first = before["path"].iloc[0]
    shutil.copy(root / first, new / "day2" / "already-known.png")  # content the run has
    for i in range(4):
        img = np.zeros((28, 28), np.uint8)
        img[4 + i:12 + i, 6:22] = 255
        Image.fromarray(img).save(new / "day2" / f"bar{i}.png")
    shutil.copy(new / "day2" / "bar0.png", new / "day2" / "zcopy.png")  # duplicate within the batch
    (new / "day2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")

    r = imgclust("assign", str(run), str(new))
    assert r.returncode == 0, r.stderr[-3000:]
    # already-known.png holds content the run has under another path: a duplicate of that path
    assert "7 new files of 7: 4 assigned, 1 rejected, 2 duplicates" in r.stdout, r.stdout
    manifest = pd.read_parquet(run / "manifest.parquet")
    after = pd.read_parquet(run / "assignments.parquet")
    n_old = counts["accepted"]
    assert len(manifest) == len(after) == n_old + 4
    assert manifest["index"].tolist() == list(range(n_old + 4))
    pd.testing.assert_frame_equal(after.iloc[:n_old], before)  # old rows untouched
    assert sorted(after["path"].iloc[n_old:]) == [f"day2/bar{i}.png" for i in range(4)]
    assert set(after["cluster"].iloc[n_old:]) <= set(before["cluster"])
    assert open_array(str(run / "images.zarr")).shape[0] == open_array(str(run / "codes.zarr")).shape[0] == n_old + 4
    thumbs = open_array(str(run / "thumbs.zarr"))
    assert thumbs.shape[0] == n_old + 4 and all(thumbs[i].max() == 255 for i in range(n_old, n_old + 4))
    from imgclust.runstore import RunStore
    from imgclust.serve.catalog import RunCatalog

    catalog = RunCatalog(RunStore(str(run)))  # the app shows the new images after the layout's
    bar0 = after.set_index("path").loc["day2/bar0.png", "cluster"]
    assert "day2/bar0.png" in set(catalog.members(int(bar0), 0, 10_000)["path"])
    assert after["outlier"].iloc[n_old:].notna().all()  # scored against the run's index
    from imgclust.codeindex import CodeIndex

    assert CodeIndex.open(RunStore(str(run))).rows == n_old + 4  # the new codes joined the index
    similar = catalog.similar(index=int(manifest.loc[manifest["path"] == "day2/bar0.png", "index"].iloc[0]), k=3)
    assert similar["path"].iloc[0].startswith("day2/bar")  # added after the index: compared one by one
    assert sum(c.size for c in catalog.clusters()) == n_old + 4
    dups = pd.read_parquet(run / "duplicates.parquet").set_index("path")
    assert dups.loc["day2/zcopy.png", ["sha256", "duplicate_of", "generation"]].to_dict() == {
        "sha256": manifest["sha256"].iloc[n_old], "duplicate_of": "day2/bar0.png", "generation": 1}
    assert dups.loc["day2/already-known.png", "duplicate_of"] == first
    rejected = pd.read_parquet(run / "rejected.parquet")
    assert "day2/broken.jpg" in set(rejected["path"])
    clusters = json.loads((run / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == n_old + 4
    assert json.loads((run / "run.json").read_text())["assign_runs"][-1]["accepted"] == 4

    again = imgclust("assign", str(run), str(new))
    assert again.returncode == 0 and "0 new files of 7" in again.stdout
    assert len(pd.read_parquet(run / "manifest.parquet")) == n_old + 4


def test_assign_refuses_a_folder_without_a_run(tmp_path):
    r = imgclust("assign", str(tmp_path), str(tmp_path))
    assert r.returncode == 2 and "run_dir" in r.stderr


def test_a_refined_run_assigns_new_images_with_its_cluster_net(tmp_path):
    """A refined run (``--refine``) places K-means' clusters with a cluster net; new images must go
    through the same net."""
    from sklearn.datasets import load_digits

    from imgclust.runmodel import RunModel
    from imgclust.runstore import Location

    d = load_digits()
    keep = np.flatnonzero(d.target < 4)
    src, new = tmp_path / "digits", tmp_path / "incoming"
    for j, i in enumerate(keep):
        folder = (new if j % 10 == 0 else src) / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 15.9).astype(np.uint8)).resize((16, 16)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    r = imgclust("run", str(src), str(out), "--image-size", "16", "--epochs", "20", "-k", "4", "--seed", "0",
                 "--no-progress", "--refine")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert {"warm", "neighbours", "selflabel"} <= set(record["refine"]), record["refine"]
    model = RunModel.load(Location(str(out / "model")))
    assert model.refiner is not None and len(model.refiner_spec["remap"]) == 4
    a = pd.read_parquet(out / "assignments.parquet")
    own = model.refine_labels(open_array(str(out / "images.zarr"))[:], model.features(open_array(str(out / "codes.zarr"))[:]))
    assert (own == a["cluster"].to_numpy()).all()  # the net reproduces the run's own assignments

    r = imgclust("assign", str(out), str(new))
    assert r.returncode == 0, r.stderr[-3000:]
    after = pd.read_parquet(out / "assignments.parquet")
    fresh = after.iloc[len(a):]
    assert len(fresh) == len(list(new.rglob("*.png")))
    # Each new digit lands in the cluster that holds most of the run's images of the same digit.
    home = a.assign(digit=a["path"].str.split("/").str[0]).groupby("digit")["cluster"].agg(lambda c: c.mode()[0])
    hits = (fresh["path"].str.split("/").str[0].map(home) == fresh["cluster"]).mean()
    assert hits >= 0.8, hits


def every_file_in_exactly_one_table(run, source) -> None:
    from imgclust.io.listing import list_local
    from imgclust.runstore import RunStore

    current = RunStore(str(run)).tables()
    tables = {name: current[name]["path"] for name in ("manifest", "rejected", "duplicates")}
    listed = list_local(str(source))
    found = set(listed.paths) | {p for p, _ in listed.refused}
    for name, paths in tables.items():
        assert paths.is_unique, (name, paths[paths.duplicated()].tolist())
    everywhere = pd.concat(tables.values())
    assert set(everywhere) == found and len(everywhere) == len(found), set(everywhere) ^ found
    assert sorted(current.assignments["path"]) == sorted(tables["manifest"])
    images = open_array(str(run / "images.zarr"))
    assert current.manifest["index"].is_unique and current.manifest["index"].max() < images.shape[0]


class CrashAt:
    """A write fence that fails the ``n``-th write it sees: a process killed just before that write."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __call__(self, url: str) -> None:
        self.seen.append(url)
        if len(self.seen) == self.n:
            raise Crash(f"killed before write {self.n}: {url}")


class Crash(Exception):
    pass


def frames(tables) -> dict[str, pd.DataFrame]:
    return {name: tables[name].sort_values("path").reset_index(drop=True)
            for name in ("manifest", "duplicates", "rejected", "assignments")}


def test_assign_accounts_for_copies_edits_and_files_that_became_readable_killed_at_every_write(
        finished_run, tmp_path, client):
    """A copy of known content is a duplicate, an edited file supersedes its row, a once-broken file
    that now decodes leaves rejected for the manifest. ``assign`` is killed before each of its
    writes in turn (and once inside compaction, on a worker): each time the run's tables read as
    before, and the call that finally completes leaves every file in exactly one table, with the
    same tables as an assign that was never interrupted."""
    from imgclust.io.storage import add_write_fence, remove_write_fence
    from imgclust.runstore import Location, RunStore
    from imgclust.stages.assign import assign_new

    root, out, _, _ = finished_run
    run, clean, src = tmp_path / "run", tmp_path / "clean", tmp_path / "src"
    shutil.copytree(out, run)
    shutil.copytree(out, clean)
    shutil.copytree(root, src)
    manifest = pd.read_parquet(run / "manifest.parquet")
    original = manifest["path"].iloc[0]
    shutil.copy(src / original, src / "new-copy.png")  # known content, new path
    edited = manifest["path"].iloc[1]
    Image.fromarray(np.full((28, 28), 77, np.uint8)).save(src / edited, Image.open(src / edited).format)
    fixed = "broken/deeper/truncated.jpg"
    Image.fromarray(np.full((28, 28), 150, np.uint8)).save(src / fixed, "JPEG")
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 + 60 * i, np.uint8)).save(src / f"fresh-{i}.png")
    store, source = RunStore(str(run)), Location(str(src))
    before = frames(store.tables())

    # Inside compaction, on a worker: the task fails, and with it the call.
    import imgclust.stages.assign as stage

    try:
        real = stage.compact_into

        def compact_with_worker_fence(*args, **kwargs):
            client.run(add_write_fence, CrashAt(1))
            try:
                return real(*args, **kwargs)
            finally:
                client.run(lambda: __import__("imgclust.io.storage").io.storage._FENCES.clear())

        stage.compact_into = compact_with_worker_fence
        with pytest.raises(Exception, match="killed before write 1: .*(thumbs|images).zarr"):
            assign_new(store, source, client)
    finally:
        stage.compact_into = real
        client.run(lambda: __import__("imgclust.io.storage").io.storage._FENCES.clear())
    for name, frame in frames(store.tables()).items():
        pd.testing.assert_frame_equal(frame, before[name])

    kills = 0
    for n in range(1, 100):
        fence = CrashAt(n)
        add_write_fence(fence)
        try:
            summary = assign_new(store, source, client)
            break
        except Crash:
            kills += 1
            for name, frame in frames(store.tables()).items():  # a killed call changes nothing that counts
                pd.testing.assert_frame_equal(frame, before[name], obj=f"{name} after a kill at write {n}")
        finally:
            remove_write_fence(fence)
    print(f"killed at {kills} writes:", *fence.seen[:kills], sep="\n  ")
    assert kills >= 8, fence.seen  # tables, clusters.json, run.json and the arrays were all written
    assert summary["accepted"] == 5, summary  # the edited file, the one that became readable, three new
    every_file_in_exactly_one_table(run, src)
    after = frames(store.tables())
    uninterrupted = assign_new(RunStore(str(clean)), source, client)
    assert {k: v for k, v in uninterrupted.items() if k not in ("at", "seconds")} == \
        {k: v for k, v in summary.items() if k not in ("at", "seconds")}
    for name, frame in frames(RunStore(str(clean)).tables()).items():
        pd.testing.assert_frame_equal(after[name], frame, obj=name)
    from imgclust.codeindex import CodeIndex

    killed, whole = CodeIndex.open(store), CodeIndex.open(RunStore(str(clean)))
    assert killed.rows == whole.rows == open_array(str(run / "codes.zarr")).shape[0]  # every new code indexed once
    ids = np.arange(killed.n_lists)
    assert sorted(np.concatenate([r for _, r, _ in killed.read_lists(ids).values()]).tolist()) == \
        sorted(np.concatenate([r for _, r, _ in whole.read_lists(ids).values()]).tolist())
    dups = after["duplicates"].set_index("path")
    assert dups.loc["new-copy.png", "duplicate_of"] == original
    now = after["manifest"].set_index("path")
    assert now.loc[edited, "sha256"] != manifest.set_index("path").loc[edited, "sha256"]
    assert now.loc[edited, "generation"] == 1
    assert fixed in now.index and fixed not in set(after["rejected"]["path"])
    again = assign_new(store, source, client)
    assert again["new"] == 0  # nothing is new the second time


def test_a_nightly_assign_reads_only_the_new_files(finished_run, tmp_path, client):
    """Files whose path, size and modification time the tables hold are not read again: the cost
    of an assign is what is new, not the archive."""
    from imgclust.runstore import Location, RunStore
    from imgclust.stages.assign import assign_new
    from tests import faults

    client.run(faults.register)
    root, out, counts, _ = finished_run
    run, src = tmp_path / "run", tmp_path / "src"
    shutil.copytree(out, run)
    shutil.copytree(root, src)  # modification times are copied too
    new = [f"tonight/{i}.png" for i in range(3)]
    (src / "tonight").mkdir()
    for i, path in enumerate(new):
        Image.fromarray(np.full((28, 28), 30 + 70 * i, np.uint8)).save(src / path)
    log = tmp_path / "reads.log"
    source = Location(f"faulty://{src}", {"fault_rate": 0.0, "read_log": str(log)})
    summary = assign_new(RunStore(str(run)), source, client)
    assert summary["files"] == counts["found"] + 3 and summary["read"] == 3 and summary["accepted"] == 3
    read = {line.strip() for line in log.read_text().splitlines()}
    assert read == {str(src / p) for p in new}, sorted(read)[:10]
    log.unlink()
    again = assign_new(RunStore(str(run)), source, client)
    assert again["read"] == 0 and again["new"] == 0 and not log.exists()


def test_assign_predicts_on_the_workers_not_in_the_flow_process(finished_run, tmp_path, client, monkeypatch):
    """The new images' pixels and codes stay on the workers: predicting in this process fails."""
    from imgclust.runmodel import RunModel
    from imgclust.runstore import Location, RunStore
    from imgclust.stages.assign import assign_new

    root, out, _, _ = finished_run
    run, src = tmp_path / "run", tmp_path / "src"
    shutil.copytree(out, run)
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((28, 28), 20 + 40 * i, np.uint8)).save(src / f"{i}.png")

    def here(*args, **kwargs):
        raise AssertionError("predicted in the flow process")

    monkeypatch.setattr(RunModel, "predict", here)  # this process only: the workers are others
    before = pd.read_parquet(run / "assignments.parquet")
    summary = assign_new(RunStore(str(run)), Location(str(src)), client)
    assert summary["accepted"] == 5
    after = pd.read_parquet(run / "assignments.parquet")
    added = after[~after["path"].isin(before["path"])]
    assert len(added) == 5 and added["cluster"].between(0, before["cluster"].max()).all()
    assert np.isfinite(added["distance"]).all()


def test_a_run_with_tables_of_an_older_layout_is_refused_with_what_to_do(finished_run, tmp_path):
    root, out, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    table = pd.read_parquet(run / "manifest.parquet")
    shutil.rmtree(run / "manifest.parquet")
    table.to_parquet(run / "manifest.parquet")  # one file, as older versions wrote it
    for command in (("assign", str(run), str(root)), ("compact", str(run))):
        r = imgclust(*command)
        assert r.returncode == 2 and "written by an older version" in r.stderr and "--overwrite" in r.stderr, r.stderr
