"""Object storage for real: a moto S3 server on 127.0.0.1, source and output in buckets."""

import io
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


def test_run_from_bucket_to_bucket(s3_run):
    fs, counts, _ = s3_run  # a separate client from the one the run used
    base = "out/runs/r1"
    manifest = pd.read_parquet(io.BytesIO(fs.cat(f"{base}/manifest.parquet")))
    rejected = pd.read_parquet(io.BytesIO(fs.cat(f"{base}/rejected.parquet")))
    dups = pd.read_parquet(io.BytesIO(fs.cat(f"{base}/duplicates.parquet")))
    assert len(manifest) + len(rejected) + len(dups) == counts["found"]
    assignments = pd.read_parquet(io.BytesIO(fs.cat(f"{base}/assignments.parquet")))
    assert len(assignments) == counts["accepted"] and assignments["cluster"].nunique() == 3
    assert any("img 005é" in p for p in manifest["path"])  # keys are not URL-encoded
    assert fs.exists(f"{base}/images.zarr/zarr.json") and fs.exists(f"{base}/codes.zarr/zarr.json")
    assert fs.exists(f"{base}/model/weights.pt")
    clusters = json.loads(fs.cat(f"{base}/clusters.json"))
    assert sum(c["size"] for c in clusters) == counts["accepted"]


def test_credentials_never_written(s3_run, s3):
    fs, _, r = s3_run
    run = fs.cat("out/runs/r1/run.json").decode()
    assert s3["secret"] not in run and json.loads(run)["config"]["storage_options"]["secret"] == "***"
    assert s3["secret"] not in r.stdout + r.stderr


def test_missing_bucket_is_a_clear_error(s3, tmp_path):
    r = imgclust("run", "s3://no-such-bucket/images", str(tmp_path / "out"), "--storage-options", json.dumps(s3))
    assert r.returncode == 2 and "source not found: s3://no-such-bucket/images" in r.stderr
