"""Object storage for real: a moto S3 server on 127.0.0.1, source and output in buckets."""

import json

import pandas as pd
import pytest

from tests.test_cli import imgclust


@pytest.fixture(scope="module")
def s3_run(s3, corpus):
    import s3fs

    root, counts = corpus
    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("src")
    fs.mkdir("out")
    fs.put(str(root) + "/", "src/archive/", recursive=True)
    r = imgclust("run", "s3://src/archive", "s3://out/runs/r1", "--storage-options", json.dumps(s3),
                 "--image-size", "16", "--epochs", "1", "-k", "3", "--shard-size", "16", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return s3fs.S3FileSystem(**s3), counts, r


def test_run_from_bucket_to_bucket(s3_run, s3):
    fs, counts, _ = s3_run  # a separate client from the one the run used
    base = "out/runs/r1"
    manifest = pd.read_parquet(f"s3://{base}/manifest.parquet", storage_options=s3)
    rejected = pd.read_parquet(f"s3://{base}/rejected.parquet", storage_options=s3)
    dups = pd.read_parquet(f"s3://{base}/duplicates.parquet", storage_options=s3)
    assert len(manifest) + len(rejected) + len(dups) == counts["found"]
    assignments = pd.read_parquet(f"s3://{base}/assignments.parquet", storage_options=s3)
    assert len(assignments) == counts["accepted"] and assignments["cluster"].nunique() == 3
    assert any("img 005é" in p for p in manifest["path"])  # keys are not URL-encoded
    assert fs.exists(f"{base}/images.zarr/zarr.json") and fs.exists(f"{base}/codes.zarr/zarr.json")
    assert fs.exists(f"{base}/model/weights.pt")
    clusters = json.loads(fs.cat(f"{base}/clusters.json"))
    assert sum(c["size"] for c in clusters) == counts["accepted"]


def test_credentials_never_written(s3_run, s3):
    """Credentials given with --storage-options reach storage but never run.json, the output, nor
    Prefect's database (flow-run parameters are stored in clear)."""
    import glob
    import os

    fs, _, r = s3_run
    run = fs.cat("out/runs/r1/run.json").decode()
    assert s3["secret"] not in run and "secret" not in json.loads(run)["config"]["storage_options"]
    assert json.loads(run)["config"]["storage_options"]["endpoint_url"] == "***"
    assert s3["secret"] not in r.stdout + r.stderr
    databases = glob.glob(os.path.join(os.environ["PREFECT_HOME"], "**", "*.db*"), recursive=True)
    assert databases, "Prefect's database was not found"
    for db in databases:
        with open(db, "rb") as fh:
            assert s3["secret"].encode() not in fh.read(), db


def test_missing_bucket_is_a_clear_error(s3, tmp_path):
    r = imgclust("run", "s3://no-such-bucket/images", str(tmp_path / "out"), "--storage-options", json.dumps(s3))
    assert r.returncode == 2 and "source not found: s3://no-such-bucket/images" in r.stderr


def _env_without_aws() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    return env


def test_wrong_endpoint_and_missing_credentials_are_clear_errors(s3, tmp_path):
    import os
    import subprocess
    import sys

    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("errs")
    fs.pipe("errs/a/x.png", b"123")
    cases = [({**s3, "endpoint_url": "http://127.0.0.1:9"}, "EndpointConnectionError"),
             ({"endpoint_url": s3["endpoint_url"]}, "NoCredentialsError: Unable to locate credentials")]
    for options, message in cases:
        r = subprocess.run([sys.executable, "-m", "imgclust.cli", "run", "s3://errs/a", str(tmp_path / "out"),
                            "--storage-options", json.dumps(options)], capture_output=True, text=True,
                           env=_env_without_aws(), timeout=300, cwd=os.getcwd())
        assert r.returncode == 2, r.stderr[-2000:]
        assert "source: cannot list source s3://errs/a" in r.stderr and message in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_standard_aws_environment_variables_are_honoured(s3, corpus, tmp_path):
    """No --storage-options at all: endpoint and credentials from AWS_* variables, as users set them."""
    import s3fs

    root, _ = corpus
    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("envsrc")
    fs.put(str(root / "set0") + "/", "envsrc/set0/", recursive=True)
    env = _env_without_aws() | {"AWS_ENDPOINT_URL": s3["endpoint_url"], "AWS_ACCESS_KEY_ID": s3["key"],
                                "AWS_SECRET_ACCESS_KEY": s3["secret"]}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "run", "s3://envsrc/set0", "s3://envsrc-out/r",
                        "--preset", "seed-mnist", "--epochs", "1", "-k", "2", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert fs.exists("envsrc-out/r/assignments.parquet") and s3["secret"] not in fs.cat("envsrc-out/r/run.json").decode()


def test_no_permission_is_a_clear_error(tmp_path):
    """A separate moto server with IAM enforced: a user without policies may not list the bucket."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The first 4 requests (bucket, object, user, key) are allowed; everything after is authorised.
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        kw = dict(endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
        boto3.client("s3", **kw).create_bucket(Bucket="locked")
        boto3.client("s3", **kw).put_object(Bucket="locked", Key="a/x.png", Body=b"1")
        boto3.client("iam", **kw).create_user(UserName="nobody")
        key = boto3.client("iam", **kw).create_access_key(UserName="nobody")["AccessKey"]
        so = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        r = subprocess.run([sys.executable, "-m", "imgclust.cli", "run", "s3://locked/a", str(tmp_path / "out"),
                            "--storage-options", json.dumps(so)], capture_output=True, text=True, timeout=300,
                           env=_env_without_aws())
        assert r.returncode == 2 and "no permission to list source s3://locked/a" in r.stderr, r.stderr[-2000:]
        assert key["SecretAccessKey"] not in r.stderr + r.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_move_tree_on_a_bucket_moves_every_key(s3):
    """s3fs's own recursive mv fails on the "directories" of a Zarr array; ours copies the keys."""
    import s3fs

    from imgclust.io.arrays import create_array, open_array
    from imgclust.io.storage import move_tree

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("movetree")
    create_array("s3://movetree/out/_work/a.zarr", (100, 2), 32, "uint8", s3)[:] = 7
    create_array("s3://movetree/out/b.zarr", (5, 2), 32, "uint8", s3)  # replaced
    move_tree("s3://movetree/out/_work/a.zarr", "s3://movetree/out/b.zarr", s3)
    fs.invalidate_cache()
    assert not fs.exists("movetree/out/_work/a.zarr")
    moved = open_array("s3://movetree/out/b.zarr", s3)[:]
    assert moved.shape == (100, 2) and (moved == 7).all()
