"""Compaction: the tables read the same before, at every kill during, and after; then only the new parts remain."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from imgclust.io.storage import add_write_fence, remove_write_fence
from imgclust.io.tables import part_files
from imgclust.runstore import RunStore
from imgclust.stages.compact import compact_tables
from tests.test_assign import Crash, CrashAt, every_file_in_exactly_one_table, frames
from tests.test_cli import imgclust
from tests.test_tables import run  # noqa: F401 (fixture: two generations with corrections)


def current(store: RunStore) -> dict[str, pd.DataFrame]:
    """The current rows without the generation that wrote them (compaction rewrites it)."""
    return {k: v.drop(columns=["generation"]) for k, v in frames(store.tables()).items()}


def test_compaction_killed_at_every_write_leaves_the_tables_as_they_read(run, tmp_path):  # noqa: F811
    (tmp_path / "run.json").write_text('{"tables_generation": 1}')
    before = current(run)
    kills = 0
    for n in range(1, 100):
        fence = CrashAt(n)
        add_write_fence(fence)
        try:
            result = compact_tables(run, rows_per_part=2)
            break
        except Crash:
            kills += 1
            for name, frame in current(run).items():
                pd.testing.assert_frame_equal(frame, before[name], check_dtype=False, obj=f"{name} after a kill at write {n}")
        finally:
            remove_write_fence(fence)
    print(f"compaction killed before each of its {kills} writes")
    assert kills >= 10, fence.seen  # parts, run.json, and the removal of every old part
    assert result["generation"] == 2 and result["rows"]["manifest"] == 4
    for name, frame in current(run).items():
        pd.testing.assert_frame_equal(frame, before[name], check_dtype=False, obj=name)
    assert {g for name in ("manifest", "rejected", "duplicates", "assignments")
            for g, _ in part_files(run.table(name))} == {2}
    assert len(part_files(run.table("manifest"))) == 2  # 4 rows, 2 per part
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["tables_base"] == record["tables_generation"] == 2


def test_compact_command_then_assign_on_a_real_run(finished_run, tmp_path, client):
    from imgclust.runstore import Location
    from imgclust.stages.assign import assign_new

    root, out, _, _ = finished_run
    run_dir, src = tmp_path / "run", tmp_path / "src"
    shutil.copytree(out, run_dir)
    shutil.copytree(root, src)
    store = RunStore(str(run_dir))
    edited = store.read_table("manifest")["path"].iloc[0]
    Image.fromarray(np.full((28, 28), 99, np.uint8)).save(src / edited, Image.open(src / edited).format)
    assert assign_new(store, Location(str(src)), client)["accepted"] == 1  # a correction: generation 1
    before = current(store)
    r = imgclust("compact", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-> generation 2" in r.stdout
    for name, frame in current(store).items():
        pd.testing.assert_frame_equal(frame, before[name], check_dtype=False, obj=name)
    assert {g for g, _ in part_files(store.table("manifest"))} == {2}
    Image.new("L", (28, 28), 200).save(src / "later.png")
    assert assign_new(store, Location(str(src)), client)["accepted"] == 1  # generation 3 on top of the base
    every_file_in_exactly_one_table(run_dir, src)
    assert imgclust("compact", str(tmp_path / "nothing")).returncode == 2
