"""The run's fitted model: one folder of JSON, arrays and weights, never a pickle."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from imgclust.cluster.code_space import CodeSpace
from imgclust.cluster.placement import ClusterPlacement
from imgclust.models.autoencoders import build_model
from imgclust.models.refiner import ClusterNet
from imgclust.runmodel import ModelFormatError, RunModel
from imgclust.runstore import Location

SPEC = {"architecture": "conv-contrastive", "channels": 1, "image_size": [16, 16], "code_dim": 8}


def small_model(refined: bool = True) -> RunModel:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ae = build_model(SPEC).eval()
    reference = rng.normal(size=(40, 8)).astype(np.float32)
    space = CodeSpace(rng.normal(size=8), np.abs(rng.normal(size=8)) + 0.5, reference,
                      rng.normal(size=(40, 2)).astype(np.float32))
    placement = ClusterPlacement(rng.normal(size=(3, 2)))
    net = ClusterNet(1, 3).eval() if refined else None
    spec = {"channels": 1, "k": 3, "width": 32, "remap": [2, 0, 1]} if refined else None
    return RunModel(ae, dict(SPEC), space, placement, net, spec)


def test_save_and_load_give_the_same_predictions(tmp_path):
    model = small_model()
    model.save(Location(str(tmp_path / "model")))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "clustering.npz", "model.json", "refiner.pt", "weights.pt"]
    back = RunModel.load(Location(str(tmp_path / "model")))
    pixels = np.random.default_rng(1).integers(0, 255, (6, 1, 16, 16), dtype=np.uint8)
    np.testing.assert_allclose(back.encode(pixels), model.encode(pixels), rtol=1e-6)
    for a, b in zip(back.predict(pixels), model.predict(pixels)):
        np.testing.assert_allclose(a, b)
    assert back.token == model.token and back.weights_sha256 == model.weights_sha256
    assert set(back.predict(pixels)[0].tolist()) <= {0, 1, 2}


def test_an_unrefined_model_predicts_from_its_features(tmp_path):
    model = small_model(refined=False)
    model.save(Location(str(tmp_path)))
    back = RunModel.load(Location(str(tmp_path)))
    assert back.refiner is None
    codes = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
    labels, dist = back.placement.assign(back.features(codes))
    pixels = np.zeros((5, 1, 16, 16), np.uint8)
    np.testing.assert_array_equal(back.predict(pixels, codes)[0], labels)
    assert (dist >= 0).all()


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["weights.pt", "refiner.pt", "clustering.npz"])
def test_a_tampered_file_is_refused_and_runs_no_code(tmp_path, target):
    folder = tmp_path / "model"
    small_model().save(Location(str(folder)))
    marker = tmp_path / "code-ran"
    if target == "clustering.npz":
        buf = io.BytesIO()
        np.savez(buf, mean=np.array([Payload(str(marker))], dtype=object), std=np.ones(8), centres=np.ones((3, 2)))
        evil = buf.getvalue()
    else:
        evil = pickle.dumps({"weight": Payload(str(marker))})
        buf = io.BytesIO()
        torch.save({"x": torch.zeros(1)}, buf)
    (folder / target).write_bytes(evil)
    with pytest.raises(ModelFormatError, match="checksum"):
        RunModel.load(Location(str(folder)))
    # Even with a matching checksum (an attacker who rewrote model.json too), nothing executes.
    record = json.loads((folder / "model.json").read_text())
    import hashlib

    record["files"][target] = hashlib.sha256(evil).hexdigest()
    (folder / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelFormatError):
        RunModel.load(Location(str(folder)))
    assert not marker.exists()


def test_a_model_of_an_older_or_newer_version_is_refused_with_a_message(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "spec.json").write_text(json.dumps(SPEC))
    (old / "clusterer.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ModelFormatError, match="older version of imgclust.*--overwrite"):
        RunModel.load(Location(str(old)))
    new = tmp_path / "new"
    small_model().save(Location(str(new)))
    record = json.loads((new / "model.json").read_text())
    (new / "model.json").write_text(json.dumps({**record, "format": 99}))
    with pytest.raises(ModelFormatError, match="format 99.*upgrade"):
        RunModel.load(Location(str(new)))
    (new / "model.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        RunModel.load(Location(str(new)))
    with pytest.raises(ModelFormatError, match="no model"):
        RunModel.load(Location(str(tmp_path / "absent")))


def test_the_cli_refuses_a_run_whose_model_was_tampered_with(finished_run, tmp_path):
    from tests.test_cli import imgclust

    _, out, _, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model" / "weights.pt").write_bytes(pickle.dumps(Payload(str(tmp_path / "code-ran"))))
    r = imgclust("neighbors", str(copy), "set0/digit_0/img000.png")
    assert r.returncode == 2 and "checksum" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "code-ran").exists()
