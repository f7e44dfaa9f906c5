"""The deployments, for real: a local Prefect server, process work pools, a worker, a flow run.

Everything runs in subprocesses against a throw-away server (SQLite in a temporary PREFECT_HOME),
exactly as a user would type it; the user's profile is never read or written.
Deselect with ``-m "not deployment"``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.corpus import make_corpus

pytestmark = [pytest.mark.deployment, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
YAML = "deployments/prefect.yaml"
# image_size as a pair: the deployment's parameter schema rejects the bare-number shorthand RunConfig accepts.
# seed-mnist clusters without UMAP, whose JIT compilation alone costs ~25 s in a fresh process here.
SETTINGS = {"image_size": [16, 16], "epochs": 1, "n_clusters": 3, "shard_size": 16, "batch_size": 16, "seed": 0,
            "preset": "seed-mnist", "n_workers": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """A process in its own process group (so that it and its children can be stopped together)."""
    with open(log, "wb") as fh:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGINT to the process group, then SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig is signal.SIGINT:  # the leader is gone; its children must not outlive it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def prefect(env: dict[str, str], *args: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``prefect server start`` on a free port; yields (env for subprocesses, API URL)."""
    home = tmp_path_factory.mktemp("prefect-home")
    # Nothing of the user's Prefect set-up (profile, API URL, API key) or imgclust settings reaches the processes.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "IMGCLUST_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", IMGCLUST_PROGRESS="0",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_CLI_WRAP_LINES="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")  # nightly never gets a run here
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    proc = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log, home)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"prefect server exited with {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy after 120 s:\n{_tail(log)}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": api}, api
    finally:
        _stop(proc)


FLOWS = {"on-demand": "cluster-archive", "nightly": "assign-new"}


def _deployment(api: str, name: str) -> dict:
    r = httpx.get(f"{api}/deployments/name/{FLOWS[name]}/{name}", timeout=10)
    assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
    return r.json()


KEYS = ("parameters", "description", "tags", "entrypoint", "job_variables", "pull_steps", "concurrency_limit",
        "work_pool_name")


def _snapshot(api: str) -> dict[str, dict]:
    """What a deployment is, per name: the fields both ways of deploying set, and its schedules."""
    out = {}
    for name in ("on-demand", "nightly"):
        d = _deployment(api, name)
        out[name] = {k: d[k] for k in KEYS} | {"id": d["id"], "schedules": [
            (s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in d["schedules"]]}
    return out


@pytest.fixture(scope="module")
def yaml_deployed(server) -> dict[str, dict]:
    """deployments/prefect.yaml deployed as documented, with on-demand moved onto the test pool."""
    env, api = server
    for pool in ("imgclust", "imgclust-test"):
        prefect(env, "work-pool", "create", pool, "--type", "process")
    prefect(env, "deploy", "--all", "--prefect-file", YAML)  # every deployment, to the pool the file names
    # `--pool` is ignored together with `--all`: move on-demand by deploying it alone.
    prefect(env, "deploy", "--prefect-file", YAML, "--name", "on-demand", "--pool", "imgclust-test")
    return _snapshot(api)


def test_yaml_deployments_run_on_a_process_worker(server, yaml_deployed, tmp_path):
    env, api = server
    nightly, on_demand = yaml_deployed["nightly"], yaml_deployed["on-demand"]
    assert nightly["schedules"] == [("0 2 * * *", "UTC", True)]
    assert nightly["entrypoint"] == "flows/assign_new.py:assign_new_flow"
    assert set(nightly["parameters"]["config"]) == {"run_dir", "source"}
    assert nightly["work_pool_name"] == "imgclust"  # no worker polls it here (and the scheduler is off)
    assert on_demand["schedules"] == [] and on_demand["work_pool_name"] == "imgclust-test"
    assert on_demand["entrypoint"] == "flows/cluster_archive.py:cluster_archive"
    assert on_demand["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert on_demand["job_variables"]["env"] == {"PREFECT_LOGGING_EXTRA_LOGGERS": "imgclust", "DO_NOT_TRACK": "1",
                                                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    source, output = tmp_path / "corpus", tmp_path / "out"
    counts = make_corpus(source)
    worker_dir = tmp_path / "worker"  # not the project: the pull step must find the code
    worker_dir.mkdir()
    worker_log = tmp_path / "worker.log"
    worker = _start([PREFECT, "worker", "start", "--pool", "imgclust-test", "--type", "process", "--limit", "1"],
                    env, worker_log, worker_dir)
    try:
        params = {"config": {"source": str(source), "output": str(output), **SETTINGS}}
        r = subprocess.run([PREFECT, "--no-prompt", "deployment", "run", "cluster-archive/on-demand",
                            "--params", json.dumps(params), "--watch", "--watch-timeout", "240"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=270)
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}\n--- worker ---\n{_tail(worker_log, 6000)}"
        # The nightly deployment itself, on the same worker, against the finished run with new files.
        prefect(env, "deploy", "--prefect-file", YAML, "--name", "nightly", "--pool", "imgclust-test")
        (source / "tonight").mkdir()
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 + 80 * i, np.uint8)).save(source / "tonight" / f"{i}.png")
        nightly_params = {"config": {"run_dir": str(output), "source": str(source)}}
        r = subprocess.run([PREFECT, "--no-prompt", "deployment", "run", "assign-new/nightly",
                            "--params", json.dumps(nightly_params), "--watch", "--watch-timeout", "240"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=270)
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}\n--- worker ---\n{_tail(worker_log, 6000)}"
    finally:
        _stop(worker)  # SIGINT: the worker deregisters cleanly, before the server goes
    assign_runs = json.loads((output / "run.json").read_text())["assign_runs"]
    assert len(assign_runs) == 1 and assign_runs[0]["accepted"] == 3 and assign_runs[0]["read"] == 3
    assert {f"tonight/{i}.png" for i in range(3)} <= set(pd.read_parquet(output / "assignments.parquet")["path"])

    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                      json={"deployments": {"id": {"any_": [on_demand["id"]]}}}).json()
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
    assert len(pd.read_parquet(output / "assignments.parquet")) > 0
    record = json.loads((output / "run.json").read_text())
    assert record["counts"]["accepted"] == counts["accepted"] and record["counts"]["clusters"] == 3
    assert record["config"]["preset"] == "seed-mnist"  # --params reached the flow
    logs = httpx.post(f"{api}/logs/filter", timeout=10, json={
        "logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "sort": "TIMESTAMP_DESC", "limit": 200}).json()
    assert any("cluster-archive:" in entry["message"] for entry in logs)  # imgclust's logger reached the run logs


def test_deploy_py_gives_the_same_deployments_as_the_yaml(server, yaml_deployed):
    env, api = server
    r = subprocess.run([sys.executable, "deployments/deploy.py", "--pool", "imgclust"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from_code = _snapshot(api)
    expected = {name: d | {"work_pool_name": "imgclust"} for name, d in yaml_deployed.items()}
    assert from_code == expected  # same ids too: deploy.py updated the YAML's deployments in place
