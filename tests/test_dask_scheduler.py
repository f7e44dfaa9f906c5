"""A real Dask cluster started with the `dask scheduler` / `dask worker` tools, storage in S3 only."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client

from tests.test_cli import imgclust

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__STATUS__TASK_STREAM_LENGTH": "100000"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=open(logs / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)]
    for i in range(2):
        # Each worker runs in its own empty folder: nothing may depend on the client's paths.
        wdir = tmp_path_factory.mktemp(f"worker{i}")
        # Worker w1 declares a (fake) GPU: training must be pinned to it, encoding spread over both.
        gpu = ["--resources", "GPU=1"] if i == 1 else []
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--name", f"w{i}", "--no-dashboard", "--local-directory", str(wdir), *gpu],
                                      stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT,
                                      env=env, cwd=wdir, start_new_session=True))
    try:
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
            c.get_task_stream(start=0)  # starts the scheduler's task-stream recorder before the run
        yield address
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_run_on_external_scheduler_spreads_work_and_pins_training_to_gpu_worker(scheduler, s3, corpus):
    import s3fs

    root, counts = corpus
    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("cluster-src")
    fs.put(str(root) + "/", "cluster-src/archive/", recursive=True)
    r = imgclust("run", "s3://cluster-src/archive", "s3://cluster-src-out/r1", "--dask-address", scheduler,
                 "--storage-options", json.dumps(s3), "--image-size", "16", "--epochs", "1", "-k", "3",
                 "--shard-size", "8", "--no-progress")
    if "source not found" in r.stderr or "NoSuchBucket" in r.stderr:
        pytest.fail(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    with Client(scheduler) as c:
        stream = c.get_task_stream(start=0)  # the scheduler's record: which worker ran which task
        names = {a: w["name"] for a, w in c.scheduler_info(n_workers=-1)["workers"].items()}
    by_worker: dict[str, set[str]] = {}
    for rec in stream:
        by_worker.setdefault(rec["worker"], set()).add(str(rec["key"]).split("-")[0])
    assert len(by_worker) == 2, by_worker
    for worker, kinds in by_worker.items():
        assert {"ingest_shard", "encode_chunk"} <= kinds, (worker, kinds)
    trained_on = [names[w] for w, kinds in by_worker.items() if "train" in kinds]
    assert trained_on == ["w1"]
    assert fs.exists("cluster-src-out/r1/assignments.parquet")
