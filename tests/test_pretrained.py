"""Encoders the run does not train: raw pixels (seed-cifar), ResNets, TorchScript and ONNX files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclust.io.arrays import open_array
from imgclust.models.pretrained import EncoderChoice, EncoderError, build_encoder, prepare_encoder, read_source
from imgclust.models.resnet import resnet
from imgclust.runmodel import ModelFormatError, RunModel
from imgclust.runstore import Location, RunStore
from tests.test_cli import imgclust

FAST = ("--n-clusters", "3", "--seed", "0", "--n-workers", "1", "--batch-size", "16", "--no-progress",
        "--thumbnail-size", "0")


def colour_corpus(root: Path, per_group: int = 12) -> dict[str, str]:
    """Three groups told apart by colour (red, green, blue), 40x40 PNGs; path -> group."""
    rng = np.random.default_rng(0)
    labels = {}
    for g, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_group):
            img = rng.integers(0, 90, (40, 40, 3)).astype(np.uint8)
            img[..., g] = rng.integers(150, 255, (40, 40))
            path = root / name / f"{i:02d}.png"
            Image.fromarray(img).save(path)
            labels[str(path)] = name
    return labels


class TinyNet(torch.nn.Module):
    """A small convolutional backbone: (B, 3, H, W) -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    colour_corpus(root)
    return root


def test_resnet_has_torchvision_layout():
    """Key names and shapes of torchvision.models.resnet18 / resnet50, so their .pth files load."""
    s18 = {k: tuple(v.shape) for k, v in resnet("resnet18").state_dict().items()}
    assert s18["conv1.weight"] == (64, 3, 7, 7)
    assert s18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert s18["layer4.1.bn2.running_var"] == (512,)
    assert s18["fc.weight"] == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in s18 and len(s18) == 122
    s50 = {k: tuple(v.shape) for k, v in resnet("resnet50").state_dict().items()}
    assert s50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert s50["layer3.5.conv3.weight"] == (1024, 256, 1, 1)
    assert s50["fc.weight"] == (1000, 2048) and len(s50) == 320
    assert resnet("resnet18")(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


def test_encoder_choices_are_validated(tmp_path):
    assert EncoderChoice.parse("pixels") == EncoderChoice("pixels")
    with pytest.raises(EncoderError, match="needs --encoder-weights.*download.pytorch.org/models/resnet50"):
        EncoderChoice.parse("resnet50")
    with pytest.raises(EncoderError, match="unknown encoder 'vit'"):
        EncoderChoice.parse("vit")
    with pytest.raises(EncoderError, match="holds its own weights"):
        EncoderChoice.parse("torchscript:/m.pt", "/w.pth")
    assert EncoderChoice.parse(str(tmp_path / "m.onnx")).kind == "onnx"
    with pytest.raises(EncoderError, match="not found"):
        read_source(str(tmp_path / "absent.pt"))


def test_resnet_weights_are_checked(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(EncoderError, match="not a resnet18 state dict.*missing bn1"):
        prepare_encoder(EncoderChoice("resnet", "resnet18", str(bad)), 3, (32, 32))
    code = tmp_path / "code.pth"
    torch.save({"model": TinyNet()}, code)  # a pickled module: code, refused by weights_only
    with pytest.raises(EncoderError, match="holds code is refused"):
        prepare_encoder(EncoderChoice("resnet", "resnet18", str(code)), 3, (32, 32))
    wrapped = tmp_path / "wrapped.pth"
    net = resnet("resnet18")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, wrapped)
    enc, spec = prepare_encoder(EncoderChoice("resnet", "resnet18", str(wrapped)), 1, (32, 32))
    x = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        z = enc.encode(x)
    assert z.shape == (3, 512) and spec["input_size"] == [224, 224] and spec["code_dim"] == 512
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    rebuilt = build_encoder(spec)
    rebuilt.load_state_dict(enc.state_dict())
    with torch.inference_mode():
        assert torch.allclose(rebuilt.encode(x), z, atol=1e-6)


def _codes_and_model(out: Path) -> tuple[np.ndarray, np.ndarray, RunModel]:
    store = RunStore(str(out))
    images = open_array(store.images)[:]
    codes = open_array(store.codes)[:]
    return images, codes, RunModel.load(Location(store.model))


@pytest.mark.slow
def test_seed_cifar_is_kmeans_on_raw_pixels(colours, tmp_path):
    out = tmp_path / "out"
    r = imgclust("run", str(colours), str(out), "--preset", "seed-cifar", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    images, codes, model = _codes_and_model(out)
    assert images.shape[1:] == (3, 32, 32)
    np.testing.assert_allclose(codes, images.reshape(len(images), -1) / 255, atol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["train_steps"] == 0 and run["quality"]["reconstruction_mse"] is None
    assert run["refine"] == {}
    ev = imgclust("evaluate", str(out), "--labels", "parent-folder")
    assert ev.returncode == 0 and "purity         1.0000" in ev.stdout, ev.stdout
    html = (out / "report" / "index.html").read_text()
    assert "mean of the members' pixels" in html and "reconstructions.png" not in html
    assert not (out / "report" / "reconstructions.png").exists()
    proto = np.asarray(Image.open(out / "report" / "cluster-0-prototype.png").convert("RGB"))
    assert proto.std() > 5  # a mean image and its members, not a blank strip


@pytest.mark.slow
def test_resnet_encoder_runs_the_pipeline_frozen(colours, tmp_path):
    weights = tmp_path / "resnet18-random.pth"
    torch.manual_seed(0)
    torch.save(resnet("resnet18").state_dict(), weights)
    out = tmp_path / "out"
    r = imgclust("run", str(colours), str(out), "--encoder", "resnet18", "--encoder-weights", str(weights),
                 "--image-size", "48", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    images, codes, model = _codes_and_model(out)
    assert images.shape[1:] == (3, 48, 48) and codes.shape == (36, 512)
    with torch.inference_mode():
        again = model.autoencoder.encode(torch.from_numpy(images[:5]).float() / 255).numpy()
    np.testing.assert_allclose(codes[:5], again, atol=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["encoder"]["name"] == "resnet18" and run["resolved"]["train_steps"] == 0
    assert model.spec["source_sha256"] == read_source(str(weights))[1]
    # the weights are the run's own copy, a plain state dict: the run works without the file
    weights.unlink()
    nb = imgclust("neighbors", str(out), str(next((colours / "red").glob("*.png"))), "-k", "3")
    assert nb.returncode == 0, nb.stderr[-2000:]
    assert (out / "report" / "cluster-0-prototype.png").exists()


@pytest.mark.slow
def test_torchscript_encoder_is_read_from_the_users_file_and_checked(colours, tmp_path):
    path = tmp_path / "tiny.pt"
    traced = torch.jit.trace(TinyNet().eval(), torch.zeros(1, 3, 40, 40))
    torch.jit.save(traced, str(path), _extra_files={"preprocess.json": json.dumps(
        {"input_size": [40, 40], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})})
    out = tmp_path / "out"
    r = imgclust("run", str(colours), str(out), "--encoder", f"torchscript:{path}", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    images, codes, model = _codes_and_model(out)
    assert images.shape[1:] == (3, 40, 40)  # stored at the model's own input size
    assert codes.shape == (36, 8)
    assert model.spec["source"] == str(path) and model.spec["mean"] == [0.5, 0.5, 0.5]
    assert not any(p.stat().st_size > 5_000 for p in (out / "model").iterdir())  # the file is not copied in
    ev = imgclust("evaluate", str(out), "--labels", "parent-folder")
    assert ev.returncode == 0
    # a changed file is refused, with a message that says so
    torch.jit.save(torch.jit.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.AdaptiveAvgPool2d(1),
                                                       torch.nn.Flatten()), torch.zeros(1, 3, 40, 40)), str(path))
    with pytest.raises(ModelFormatError, match="has changed since the run recorded it"):
        RunModel.load(Location(str(out / "model")))
    nb = imgclust("neighbors", str(out), str(next((colours / "red").glob("*.png"))))
    assert nb.returncode != 0 and "has changed since the run recorded it" in nb.stderr
    assert "Traceback" not in nb.stderr


@pytest.mark.slow
def test_onnx_encoder_runs_the_pipeline(colours, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyNet().eval(), (torch.zeros(1, 3, 36, 36),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    out = tmp_path / "out"
    r = imgclust("run", str(colours), str(out), "--encoder", str(path), *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    images, codes, model = _codes_and_model(out)
    assert images.shape[1:] == (3, 36, 36) and codes.shape == (36, 8)  # the input shape the file declares
    ref = TinyNet().eval()
    with torch.inference_mode():
        x = (torch.from_numpy(images[:4]).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = torch.nn.functional.normalize(ref(x), dim=1).numpy()
    np.testing.assert_allclose(codes[:4], expected, atol=1e-4)


def test_missing_weights_fail_before_any_work(colours, tmp_path):
    out = tmp_path / "out"
    r = imgclust("run", str(colours), str(out), "--encoder", "resnet50", "--encoder-weights",
                 str(tmp_path / "resnet50-11ad3fa6.pth"))
    assert r.returncode == 2, r.stderr
    assert "is not a file" in r.stderr and "download.pytorch.org/models/resnet50-11ad3fa6.pth" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_a_resnet_is_fine_tuned_contrastively_and_keeps_its_layout(tmp_path):
    from imgclust.io.arrays import create_array
    from imgclust.models.training import TrainPlan, train_autoencoder

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    net = resnet("resnet18")
    torch.save(net.state_dict(), weights)
    images = create_array(str(tmp_path / "images.zarr"), (24, 3, 32, 32), 12, "uint8")
    images[:] = np.random.default_rng(0).integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    choice = EncoderChoice("resnet", "resnet18", str(weights))
    plan = TrainPlan("default", 3, 8, 1e-4, 0, "cpu", encoder=choice, encoder_steps=3)
    assert plan.untrained is None  # fine-tuned, not used as it is
    result = train_autoencoder(images, plan)
    assert result.spec["architecture"] == "pretrained" and result.spec["finetune_steps"] == 3
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    tuned = result.model.state_dict()
    assert not torch.equal(tuned["backbone.layer1.0.conv1.weight"], net.state_dict()["layer1.0.conv1.weight"])
    rebuilt = build_encoder(result.spec)
    rebuilt.load_state_dict(tuned)  # what RunModel.load does with the run's weights.pt
    x = torch.from_numpy(images[:4]).float() / 255
    with torch.inference_mode():
        assert torch.allclose(rebuilt.encode(x), result.model.encode(x), atol=1e-5)
    again = train_autoencoder(images, plan)  # same seed, same weights
    assert torch.allclose(again.model.state_dict()["backbone.layer4.1.conv2.weight"],
                          tuned["backbone.layer4.1.conv2.weight"])


def test_only_a_resnet_can_be_fine_tuned(colours, tmp_path):
    from pydantic import ValidationError

    from imgclust.config import RunConfig

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(ValidationError, match="only a ResNet encoder can be fine-tuned, not onnx"):
        RunConfig(source=str(colours), output=str(tmp_path / "o"), encoder=str(model), encoder_steps=5)
    with pytest.raises(ValidationError, match="give --encoder too"):
        RunConfig(source=str(colours), output=str(tmp_path / "o"), encoder_steps=5)
    weights = tmp_path / "r.pth"
    weights.write_bytes(b"x")
    cfg = RunConfig(source=str(colours), output=str(tmp_path / "o"), encoder="resnet18", encoder_weights=str(weights),
                    encoder_steps=5)
    assert cfg.resolved_learning_rate == 1e-4 and not cfg.resolved_refine
