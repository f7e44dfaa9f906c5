"""Test isolation: a throw-away Prefect home (never the user's profile) and one real Dask cluster."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="imgclust-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(_PREFECT_HOME, "profiles.toml")
for var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
    os.environ.pop(var, None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["IMGCLUST_PROGRESS"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from tests.corpus import make_corpus


@pytest.fixture(scope="session")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("corpus")
    counts = make_corpus(root)
    return root, counts


@pytest.fixture(scope="session")
def prefect_harness():
    """Flows run in-process against a temporary Prefect server that is stopped cleanly."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto) on 127.0.0.1; yields fsspec storage options for it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "s3cr3t-value"}
    server.stop()


SETTINGS = ["--image-size", "16", "--epochs", "2", "-k", "3", "--seed", "0", "--no-progress", "--shard-size", "16"]


@pytest.fixture(scope="session")
def finished_run(corpus, tmp_path_factory):
    """One real CLI run on the corpus, shared by the tests that inspect a finished run."""
    from tests.test_cli import imgclust

    root, counts = corpus
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = tmp_path_factory.mktemp("cfg") / "settings.yaml"
    cfg.write_text("batch_size: 16\ncolor: gray\n")
    r = imgclust("run", str(root), str(out), "--config", str(cfg), *SETTINGS)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, out, counts, r
