"""Killing real runs with SIGKILL during ingest, training, encode and refine; the same command then finishes the job.

The interrupted run must redo only unfinished work (its logs say what it reused) and end with the
same assignments as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.corpus import digit_images

LEASE = 15.0
SETTINGS = ["--image-size", "16", "--shard-size", "8", "--epochs", "10", "--batch-size", "32", "-k", "5",
            "--seed", "0", "--no-progress", "--refine", "--n-workers", "2", "--lease-seconds", str(LEASE)]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    imgs, labels = digit_images(800, size=16)
    for i, (img, label) in enumerate(zip(imgs, labels)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img, "L").save(root / str(label) / f"{i:04d}.png")
    return root


def start(source: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The CLI in its own process group, so the test can kill it the way a crash would."""
    return subprocess.Popen([sys.executable, "-m", "imgclust.cli", "run", str(source), str(out), *SETTINGS, *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ.copy())


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the client as soon as ``ready()`` holds, then its whole tree (workers, temp server)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def records(out: Path, pattern: str) -> list[str]:
    return glob.glob(str(out / "_work" / "resume" / pattern))


def test_killed_runs_resume_to_the_uninterrupted_result(digits_folder, tmp_path):
    base = tmp_path / "uninterrupted"
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "run", str(digits_folder), str(base), *SETTINGS],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    out = tmp_path / "interrupted"
    logs = [tmp_path / f"attempt{i}.log" for i in range(5)]
    kill_when(start(digits_folder, out, logs[0]), lambda: records(out, "ingest-*/*.json"), "an ingested shard")
    n_ingested = len(records(out, "ingest-*/*.json"))
    assert 0 < n_ingested < 100 and not (out / "manifest.parquet").exists()

    # The killed run's lease is still fresh, but its holder was a process of this host and is gone:
    # it is taken over at once. A live holder (here: one on another host) is refused, named.
    from imgclust.state.lease import holder_is_dead

    lease_file = out / "_lease.json"
    lease = json.loads(lease_file.read_text())
    assert holder_is_dead(lease["owner"]) and time.time() - lease["heartbeat_at"] < LEASE
    lease_file.write_text(json.dumps({**lease, "owner": "another-host:4242:feedbeef", "heartbeat_at": time.time()}))
    busy = subprocess.run([sys.executable, "-m", "imgclust.cli", "run", str(digits_folder), str(out), *SETTINGS],
                          capture_output=True, text=True, timeout=120)
    assert busy.returncode == 3 and "in use by another run" in busy.stderr, busy.stderr[-2000:]
    assert "another-host:4242" in busy.stderr
    lease_file.write_text(json.dumps(lease))  # the dead run's lease again

    kill_when(start(digits_folder, out, logs[1]), lambda: records(out, "train-*.pt"), "a training checkpoint")
    assert "ingest: resuming" in logs[1].read_text() and "already decoded" in logs[1].read_text()
    assert "taking over the expired lease" in logs[1].read_text()
    assert re.search(r"discover: (\d+) of \1 batches hashed by an earlier attempt", logs[1].read_text())  # none twice

    # The impatient way: take the dead run's lease at once.
    kill_when(start(digits_folder, out, logs[2], "--force-unlock"), lambda: records(out, "encode-*/*.json"), "an encoded chunk")
    text = logs[2].read_text()
    assert "ingest: already done" in text and "train: resuming from the checkpoint after step" in text
    assert "taking over the forced lease" in text or "taking over the expired lease" in text  # slow start: expired

    # Killed while refining: the finished cluster stage (UMAP + K-means) is recorded and not redone.
    kill_when(start(digits_folder, out, logs[3], "--force-unlock"), lambda: records(out, "cluster-*/result.json"),
              "a finished cluster stage")
    text = logs[3].read_text()
    assert "train: already done" in text and "encode: resuming" in text

    final = start(digits_folder, out, logs[4], "--force-unlock")
    assert final.wait(timeout=600) == 0, logs[4].read_text()[-3000:]
    text = logs[4].read_text()
    assert "encode: already done" in text and "cluster: already done" in text and "refine: already" not in text

    run = json.loads((out / "run.json").read_text())
    assert not (out / "_work" / "resume").exists() and not (out / "_lease.json").exists()
    a = pd.read_parquet(base / "assignments.parquet")
    b = pd.read_parquet(out / "assignments.parquet")
    assert a["path"].tolist() == b["path"].tolist()
    assert (a["cluster"].to_numpy() == b["cluster"].to_numpy()).all()
    assert json.loads((base / "run.json").read_text())["train_loss"] == run["train_loss"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ledger_records_finished_shards_per_key(where, tmp_path, request):
    from imgclust.state.resume import ShardLedger, fingerprint

    if where == "s3":
        import s3fs

        so = request.getfixturevalue("s3")
        s3fs.S3FileSystem(**so).mkdir("ledgers")
        out = "s3://ledgers/run"
    else:
        so, out = {}, str(tmp_path)
    from imgclust.runstore import RunStore

    store = RunStore(out, so)
    key = fingerprint("ingest", ["a.png", "b.png"], 16)
    assert key == fingerprint("ingest", ["a.png", "b.png"], 16) != fingerprint("ingest", ["a.png", "b.png"], 32)
    ledger = ShardLedger(store, "ingest", key)
    assert ledger.done() == {}
    ledger.mark(0, [[True, 1, 1, "PNG", ""]])
    ledger.mark(1024, [[False, 0, 0, "", "broken"]])
    ledger.mark("batch-ab", {"x": 1})
    assert ledger.done_rows() == {0: [[True, 1, 1, "PNG", ""]], 1024: [[False, 0, 0, "", "broken"]]}
    other = ShardLedger(store, "ingest", fingerprint("changed settings"))
    other.mark(0, [])
    ledger.clear_others()  # records under another key are stale
    assert other.done() == {} and len(ledger.done()) == 3
    ledger.clear()
    assert ledger.done() == {}
