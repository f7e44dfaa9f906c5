"""What users see when something is wrong: one clear line and the right exit status, never a traceback."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.test_cli import imgclust


def small_corpus(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(folder / f"{i}.png")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", ["x", "32x", "x32", "3.5", "32x32x3", "abc"])
def test_a_malformed_image_size_is_one_clear_line(corpus, tmp_path, size):
    root, _ = corpus
    r = imgclust("run", str(root), str(tmp_path / "out"), "--image-size", size)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("imgclust: error: image_size: expected HxW"), r.stderr
    assert "union" not in r.stderr and "Traceback" not in r.stderr


def test_config_keys_match_the_long_options_including_no_progress(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("no-progress: true\nn-clusters: 3\n")
    r = imgclust("run", str(tmp_path / "missing"), str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 2 and "source" in r.stderr and "no_progress" not in r.stderr, r.stderr


def test_a_dask_address_with_nothing_listening_fails_at_once(corpus, tmp_path):
    root, _ = corpus
    t0 = time.monotonic()
    r = imgclust("run", str(root), str(tmp_path / "out"), "--dask-address", f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "dask_address: no Dask scheduler answers" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30


def test_cuda_asked_for_without_cuda_fails_before_any_work(corpus, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, _ = corpus
    r = imgclust("run", str(root), str(tmp_path / "out"), "--device", "cuda")
    assert r.returncode == 2 and "device: cuda was asked for" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "images.zarr").exists()


def test_too_few_images_says_how_many_were_duplicates(tmp_path):
    src = small_corpus(tmp_path / "src", 1)
    shutil.copy(src / "0.png", src / "copy-a.png")
    shutil.copy(src / "0.png", src / "copy-b.png")
    r = imgclust("run", str(src), str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "only 1 distinct image of 3 files" in r.stderr and "2 were exact duplicates" in r.stderr, r.stderr
    assert "could not be decoded" not in r.stderr


def test_as_many_clusters_as_images_runs_to_the_end(tmp_path):
    src = small_corpus(tmp_path / "src", 6)
    r = imgclust("run", str(src), str(tmp_path / "out"), "-k", "6", "--epochs", "1", "--image-size", "16",
                 "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    import pandas as pd

    assert sorted(pd.read_parquet(tmp_path / "out" / "assignments.parquet")["cluster"]) == list(range(6))


def test_ctrl_c_says_how_to_resume_and_leaves_no_server_behind(tmp_path):
    from tests.corpus import start_run_until_training

    proc, log = start_run_until_training(tmp_path)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "imgclust: interrupted; run the same command again to resume" in text
    assert "Traceback" not in text
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline()[:4] for p in alive]  # no orphan Prefect server or Dask worker


def test_the_local_dashboard_listens_on_loopback_only():
    from imgclust.dask_cluster import dask_client

    with dask_client(n_workers=1) as client:
        link = client.dashboard_link
    assert "127.0.0.1" in link, link


def test_a_slow_cluster_shutdown_does_not_fail_finished_work(caplog):
    from imgclust.dask_cluster import close_quietly

    class Stuck:
        def close(self, timeout=None):
            raise TimeoutError("closing took longer than 60 s")

    close_quietly(Stuck())
    assert "did not finish cleanly" in caplog.text


def test_reject_reasons_never_carry_absolute_paths(tmp_path):
    from imgclust.io.storage import unreadable_reason

    try:
        open(tmp_path / "gone.png", "rb")
    except OSError as exc:
        reason = unreadable_reason(exc)
    assert reason == "unreadable: FileNotFoundError: No such file or directory"
    assert str(tmp_path) not in reason


def test_a_deployment_with_credentials_in_its_parameters_is_refused():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "deployments/deploy.py", "--config", '{"storage_options": {"secret": "x"}}'],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "on-demand: storage_options: credentials (secret) must not be flow parameters" in r.stderr
