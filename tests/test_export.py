"""imgclust export: every image of the run exactly once, curation applied, as tables or folders."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from imgclust.curation import add_edit
from imgclust.export import ExportError, export_run, folder_name
from imgclust.runstore import Location, RunStore
from tests.test_cli import imgclust


@pytest.fixture
def curated(finished_run, tmp_path):
    root, out, _, _ = finished_run
    shutil.copytree(out, tmp_path / "run")
    store = RunStore(str(tmp_path / "run"))
    ids = sorted(store.read_table("assignments")["cluster"].unique().tolist())
    add_edit(store, {"action": "rename", "cluster": ids[0], "name": "Round / ones"})
    add_edit(store, {"action": "merge", "into": ids[0], "clusters": [ids[1]]})
    return root, store, ids


def test_a_table_holds_every_manifest_row_once_with_curated_clusters(curated, tmp_path):
    _, store, ids = curated
    r = imgclust("export", store.url, str(tmp_path / "out.csv"))
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "out.csv")
    manifest = store.read_table("manifest")
    assert sorted(table["path"]) == sorted(manifest["path"]) and table["path"].is_unique
    merged = table[table["model_cluster"].isin(ids[:2])]
    assert (merged["cluster"] == ids[0]).all() and (merged["name"] == "Round / ones").all()
    export_run(store, Location(str(tmp_path / "out.parquet")), "parquet", cluster=ids[0])
    part = pd.read_parquet(tmp_path / "out.parquet")
    assert len(part) == len(merged) and set(part["cluster"]) == {ids[0]}


def test_folders_of_copies_or_links(curated, tmp_path):
    root, store, ids = curated
    n = len(store.read_table("manifest"))
    res = export_run(store, Location(str(tmp_path / "copies")), "folders")
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "copies") for f in fs]
    assert res["rows"] == n == len(files)
    assert (tmp_path / "copies" / folder_name(ids[0], "Round / ones")).is_dir()
    assert folder_name(ids[0], "Round / ones") == f"{ids[0]}-Round-ones"
    r = imgclust("export", store.url, str(tmp_path / "links"), "--format", "folders", "--link", "--cluster", str(ids[2]))
    assert r.returncode == 0, r.stderr
    links = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "links") for f in fs]
    assert links and all(os.path.islink(p) and os.path.exists(p) for p in links)
    assert all(os.path.realpath(p).startswith(os.path.realpath(root)) for p in links)


def test_an_export_that_cannot_be_made_says_why(curated, tmp_path):
    _, store, _ = curated
    with pytest.raises(ExportError, match="there is no cluster 999"):
        export_run(store, Location(str(tmp_path / "x.csv")), "csv", cluster=999)
    with pytest.raises(ExportError, match="needs SOURCE and DEST both on the local disk"):
        export_run(store, Location("memory://elsewhere"), "folders", link=True)
    r = imgclust("export", str(tmp_path / "nothing"), str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "holds no finished run" in r.stderr
