"""A run and an ``assign`` on storage that fails 5 % of its reads, writes and listings (``tests.faults``):
the product's retries must carry them to the same tables as on storage that never fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests import faults
from tests.conftest import SETTINGS

RATE = 0.05


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process that knows the ``faulty://`` protocol."""
    code = "import sys, tests.faults; from imgclust.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                          env=os.environ.copy(), cwd=Path(__file__).resolve().parents[1])


def tables(run: str, storage_options: dict | None = None) -> dict[str, pd.DataFrame]:
    from imgclust.runstore import RunStore

    current = RunStore(run, storage_options or {}).tables()
    return {name: current[name].sort_values("path").reset_index(drop=True)
            for name in ("manifest", "duplicates", "rejected", "assignments")}


def assert_same_tables(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=1e-5, obj=name)


def new_files(folder: Path) -> None:
    folder.mkdir()
    for i in range(6):
        a = np.zeros((28, 28), np.uint8)
        a[4 + i:20 + i, 6:22] = 60 + 30 * i
        Image.fromarray(a).save(folder / f"new-{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_a_listing_that_fails_is_asked_again_never_shortened(tmp_path):
    """fsspec's generic walk leaves out a folder whose listing failed; the product's never does."""
    from imgclust.runstore import Location
    from imgclust.stages.discover import list_source

    for d in range(12):
        (tmp_path / f"d{d:02d}" / "deeper").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (4, 4), i).save(tmp_path / f"d{d:02d}" / "deeper" / f"{i}.png")
    log = str(tmp_path / "faults.log")
    for seed in range(5):
        source = Location(f"faulty://{tmp_path}", {"fault_rate": 0.2, "fault_log": log, "fault_seed": seed})
        assert len(list_source(source).paths) == 36
    assert faults.injected(log) >= 5


@pytest.mark.slow
def test_a_run_and_an_assign_under_injected_faults_end_with_the_clean_tables(finished_run, client, tmp_path):
    root, clean_out, _, _ = finished_run
    log = str(tmp_path / "faults.log")
    so = {"fault_rate": RATE, "fault_log": log}
    client.run(faults.register)  # the workers learn the protocol; the flow's process imports it
    src = tmp_path / "src"
    shutil.copytree(root, src)
    out = f"faulty://{tmp_path}/out"
    address = client.scheduler.address
    r = cli("run", f"faulty://{src}", out, "--storage-options", json.dumps(so), "--dask-address", address,
            "--batch-size", "16", "--color", "gray", *SETTINGS)
    assert r.returncode == 0, r.stderr[-4000:]
    in_run = faults.injected(log)
    assert in_run >= 5, in_run  # reads, writes and listings failed throughout the run (about 30 expected)
    assert "retrying" in r.stderr
    assert_same_tables(tables(str(tmp_path / "out")), tables(str(clean_out)))

    # assign: the same new files into the faulty run and into a copy of the clean one
    new_files(src / "day2")
    clean = tmp_path / "clean"
    shutil.copytree(clean_out, clean)
    ok = cli("assign", str(clean), str(src))
    assert ok.returncode == 0, ok.stderr[-4000:]
    r = cli("assign", out, f"faulty://{src}", "--storage-options", json.dumps(so), "--dask-address", address)
    assert r.returncode == 0, r.stderr[-4000:]
    assert faults.injected(log) > in_run
    print(f"faults injected: {in_run} in the run, {faults.injected(log) - in_run} in the assign")
    counts = lambda out: out.split("new files")[1].split("(")[0]  # noqa: E731 (the seconds differ)
    assert "7 new files of" in r.stdout and counts(r.stdout) == counts(ok.stdout)
    assert_same_tables(tables(str(tmp_path / "out")), tables(str(clean)))
