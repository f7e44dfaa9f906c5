"""The command line as users call it: exit status 2 and a message naming the parameter."""

import json
import os
import subprocess
import sys

import pytest

from imgclust import __version__


def imgclust(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=os.environ.copy())


def test_version():
    r = imgclust("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_run_help_describes_every_option():
    r = imgclust("run", "--help")
    assert r.returncode == 0
    for opt in ("--image-size", "--color", "--preset", "--epochs", "--batch-size", "--n-clusters", "--seed",
                "--device", "--dask-address", "--storage-options", "--config", "--overwrite", "--fit"):
        assert opt in r.stdout


@pytest.mark.parametrize("args, param", [
    (["--preset", "nope"], "--preset"),
    (["--n-clusters", "1"], "n_clusters"),
    (["--n-clusters", "500"], "n_clusters"),
    (["--epochs", "0"], "epochs"),
    (["--image-size", "4"], "image_size"),
    (["--storage-options", "{not json"], "storage_options"),
    (["--device", "tpu"], "--device"),
])
def test_bad_parameters_exit_2_naming_the_parameter(corpus, tmp_path, args, param):
    root, _ = corpus
    r = imgclust("run", str(root), str(tmp_path / "out"), *args)
    assert r.returncode == 2, r.stderr
    assert param in r.stderr
    assert not (tmp_path / "out").exists()  # nothing heavy happened


def test_missing_source(tmp_path):
    r = imgclust("run", str(tmp_path / "absent"), str(tmp_path / "out"))
    assert r.returncode == 2 and "source" in r.stderr and "not found" in r.stderr


def test_source_without_images(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    r = imgclust("run", str(tmp_path / "src"), str(tmp_path / "out"))
    assert r.returncode == 2 and "no image files" in r.stderr


def test_output_inside_source_is_refused(corpus):
    root, _ = corpus
    r = imgclust("run", str(root), str(root / "results"))
    assert r.returncode == 2 and "output" in r.stderr and "inside" in r.stderr


def test_config_file_values_are_validated(corpus, tmp_path):
    root, _ = corpus
    cfg = tmp_path / "run.yaml"
    cfg.write_text("n_clusters: 1\nseed: 3\n")
    r = imgclust("run", str(root), str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 2 and "n_clusters" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'rgb'\n")
    r = imgclust("run", str(root), str(tmp_path / "out"), "--config", str(bad))
    assert r.returncode == 2 and "colour" in r.stderr


def test_finished_run_is_refused_without_overwrite(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"counts": {}}))
    r = imgclust("run", str(root), str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
