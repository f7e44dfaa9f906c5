"""The tables' rule: append-only parts, the highest generation of a path wins across the file tables."""

from __future__ import annotations

import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq
import pytest

from imgclust.io.tables import drop_parts, part_files
from imgclust.runstore import RunStore


def manifest(paths, sha="x", start=0):
    return pd.DataFrame({"index": range(start, start + len(paths)), "path": paths, "sha256": sha,
                         "width": 8, "height": 8, "format": "PNG"})


def assignments(paths, cluster=0):
    return pd.DataFrame({"path": paths, "sha256": "x", "cluster": cluster, "distance": 0.5})


@pytest.fixture
def run(tmp_path) -> RunStore:
    """Generation 0: a, b, c accepted, d rejected, e a duplicate of a. Generation 1 (an assign): b
    edited, c now broken, d now readable, f new."""
    store = RunStore(str(tmp_path))
    store.write_table("manifest", manifest(["a", "b", "c"]))
    store.write_table("rejected", pd.DataFrame({"path": ["d"], "reason": ["truncated"], "sha256": ["y"]}))
    store.write_table("duplicates", pd.DataFrame({"path": ["e"], "sha256": ["x"], "duplicate_of": ["a"]}))
    store.write_table("assignments", assignments(["a", "b", "c"]))
    (tmp_path / "run.json").write_text('{"tables_generation": 0}')
    store.write_table("manifest", manifest(["b", "d", "f"], "z", 3), 1)
    store.write_table("rejected", pd.DataFrame({"path": ["c"], "reason": ["truncated"], "sha256": ["w"]}), 1)
    store.write_table("duplicates", pd.DataFrame(columns=["path", "sha256", "duplicate_of"]), 1)
    store.write_table("assignments", assignments(["b", "d", "f"], 1), 1)
    return store


def test_a_later_generation_supersedes_a_path_only_once_it_is_committed(run, tmp_path):
    before = run.tables()  # generation 1 is not named by run.json yet: an interrupted assign's
    assert sorted(before.manifest["path"]) == ["a", "b", "c"] and before.rejected["path"].tolist() == ["d"]
    (tmp_path / "run.json").write_text('{"tables_generation": 1}')
    now = run.tables()
    assert sorted(now.manifest["path"]) == ["a", "b", "d", "f"]
    assert now.manifest.set_index("path").loc["b", "generation"] == 1
    assert now.rejected["path"].tolist() == ["c"] and now.duplicates["path"].tolist() == ["e"]
    assert sorted(zip(now.assignments["path"], now.assignments["cluster"])) == [("a", 0), ("b", 1), ("d", 1), ("f", 1)]
    assert run.read_table("manifest")["path"].tolist() == now.manifest["path"].tolist()


def test_a_crashed_generation_is_dropped_and_a_rewrite_replaces_its_own_parts(run, tmp_path):
    url = run.table("manifest")
    assert [g for g, _ in part_files(url)] == [0, 1]
    assert drop_parts(url, None, lambda g, _: g > 0) == 1
    assert [g for g, _ in part_files(url)] == [0]
    run.write_table("manifest", manifest(["a"]))  # a stage done again writes its generation afresh
    assert run.read_table("manifest")["path"].tolist() == ["a"]


def test_every_reader_reads_a_table_folder_as_one_table(run, tmp_path):
    """pandas, pyarrow, Dask and DuckDB see all parts' rows; the README's DuckDB query applies the rule."""
    import duckdb

    (tmp_path / "run.json").write_text('{"tables_generation": 1}')
    folder = tmp_path / "manifest.parquet"
    assert len(pd.read_parquet(folder)) == len(pq.read_table(folder)) == len(dd.read_parquet(str(folder))) == 6
    t = str(tmp_path)
    query = f"""
        SELECT path, t FROM (SELECT *, 'manifest' AS t FROM '{t}/manifest.parquet/*.parquet' UNION ALL BY NAME
                       SELECT *, 'rejected' AS t FROM '{t}/rejected.parquet/*.parquet' UNION ALL BY NAME
                       SELECT *, 'duplicates' AS t FROM '{t}/duplicates.parquet/*.parquet')
        QUALIFY row_number() OVER (PARTITION BY path ORDER BY generation DESC) = 1 ORDER BY path"""
    rows = duckdb.sql(query).fetchall()
    now = run.tables()
    expected = sorted([(p, name) for name in ("manifest", "rejected", "duplicates") for p in now[name]["path"]])
    assert rows == expected
