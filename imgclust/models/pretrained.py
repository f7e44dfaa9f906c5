"""Encoders that are not trained by the run: raw pixels, and pretrained backbones used frozen.

``--encoder`` names one of

- ``pixels``: the image itself, flattened (the CIFAR write-up's K-means on raw RGB pixels);
- ``resnet18`` ... ``resnet152``: torchvision's ResNet layout (``imgclust.models.resnet``) with the
  weights of ``--encoder-weights`` (torchvision's own ``.pth`` files, or any state dict of that
  layout); the weights are copied into the run's ``model/weights.pt`` as a plain state dict;
- ``torchscript:PATH``: a TorchScript module, (B, 3, H, W) normalised pixels -> (B, D) or a map;
- ``onnx:PATH`` (or a path ending in ``.onnx``): an ONNX model run by onnxruntime, the same contract.

A TorchScript or ONNX file is code and stays where the user put it: the run records its URL and
sha256, and every later load (encode on the workers, ``assign``, the app) reads it from there and
refuses it when its checksum differs. Nothing is downloaded: a missing file is an
``EncoderError`` that says where to get one.

Preprocessing comes from the model: a ResNet takes 224x224 inputs normalised with ImageNet's mean
and std; a TorchScript file may carry ``preprocess.json`` as an extra file
(``{"input_size": [h, w], "mean": [...], "std": [...]}``), an ONNX file the same keys as metadata
(``imgclust.input_size`` = ``"224x224"``, ``imgclust.mean``, ``imgclust.std``, comma-separated) and a
static input shape; otherwise 224x224 and ImageNet's statistics. Grey images are repeated to three
channels and resized to the input size on the fly, so ``images.zarr`` may hold them smaller.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclust.io.storage import normalise_url, open_fs, with_retries
from imgclust.models.resnet import RESNETS, ResNet, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT = (224, 224)
SUB_BATCH = 64  # images per forward pass of a backbone: bounds activation memory at 224x224
WEIGHT_HINT = {  # where torchvision publishes each ResNet's ImageNet weights
    "resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth", "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth", "resnet152": "resnet152-f82ba261.pth"}


class EncoderError(ValueError):
    """An encoder cannot be used: unknown name, missing or changed file, unreadable weights."""


@dataclass(frozen=True)
class EncoderChoice:
    """What ``--encoder`` / ``--encoder-weights`` asked for, validated.

    ``kind`` is ``pixels``, ``resnet``, ``torchscript`` or ``onnx``; ``name`` the ResNet's name;
    ``source`` the URL of the weights or model file (absolute for local paths).
    """

    kind: str
    name: str = ""
    source: str | None = None

    @classmethod
    def parse(cls, text: str, weights: str | None = None) -> EncoderChoice:
        t = text.strip()
        if t == "pixels":
            if weights:
                raise EncoderError("--encoder-weights is for a ResNet; the pixels encoder has none")
            return cls("pixels")
        if t in RESNETS:
            if not weights:
                raise EncoderError(f"{t} needs --encoder-weights: a local path or URL of its state dict, for "
                                   f"example torchvision's {WEIGHT_HINT[t]} ({weight_hint(t)})")
            return cls("resnet", t, normalise_url(weights))
        for kind in ("torchscript", "onnx"):
            if t.startswith(kind + ":"):
                return cls(kind, source=normalise_url(_only_source(t[len(kind) + 1:], weights)))
        if t.lower().endswith(".onnx"):
            return cls("onnx", source=normalise_url(_only_source(t, weights)))
        raise EncoderError(f"unknown encoder {text!r}: use pixels, one of {', '.join(RESNETS)} (with "
                           "--encoder-weights), torchscript:PATH or onnx:PATH")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "source": self.source}


def _only_source(path: str, weights: str | None) -> str:
    if weights:
        raise EncoderError("--encoder-weights is for a ResNet; a TorchScript or ONNX file holds its own weights")
    if not path.strip():
        raise EncoderError("give the model file's path after the colon, e.g. torchscript:/models/dinov2.pt")
    return path.strip()


def weight_hint(name: str) -> str:
    return (f"on a machine with internet access: https://download.pytorch.org/models/{WEIGHT_HINT[name]}, or "
            f"python -c \"import torchvision; torchvision.models.{name}(weights='DEFAULT')\" which leaves it in "
            "~/.cache/torch/hub/checkpoints/")


def read_source(url: str, expected_sha256: str | None = None) -> tuple[bytes, str]:
    """The bytes of a weights or model file and their sha256; ``expected_sha256`` must match."""
    fs, path = open_fs(url, None)
    try:
        data = with_retries(fs.cat_file, path)
    except FileNotFoundError:
        raise EncoderError(f"encoder file not found: {url}") from None
    except IsADirectoryError:
        raise EncoderError(f"encoder file {url} is a folder, not a file") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise EncoderError(f"{url} has changed since the run recorded it (sha256 {sha[:12]}..., the run has "
                           f"{expected_sha256[:12]}...): restore that file, or run again with --overwrite")
    return data, sha


class FeatureEncoder(nn.Module):
    """A frozen backbone behind the run's encoder interface.

    ``encode(x)``: uint8-scaled images (B, C, H, W) in [0, 1] -> L2-normalised features (B, D),
    after repeating grey to three channels, resizing to the model's input size and normalising.
    It has no decoder (``has_decoder`` is False): prototypes are mean images, and there is no
    reconstruction error. Only a ResNet's parameters are in ``state_dict``; a TorchScript or ONNX
    backbone is held outside it and read again from its own file.
    """

    has_decoder = False
    contrastive = False

    @property
    def trainable(self) -> bool:
        """Whether ``--encoder-steps`` can fine-tune it: a ResNet, whose weights the run keeps."""
        return "backbone" in self._modules

    def __init__(self, backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor], spec: dict[str, Any]):
        super().__init__()
        if spec["kind"] == "resnet":
            self.backbone = backbone
        else:
            self.__dict__["_external"] = backbone  # not a submodule: never in the run's state dict
        self.spec = spec
        self.code_shape = (int(spec["code_dim"]),)
        self.image_shape = (int(spec["channels"]), *spec["image_size"])
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def net(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.backbone if "backbone" in self._modules else self.__dict__["_external"]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 3, h, w) as the model expects its inputs."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = tuple(self.spec["input_size"])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> the backbone's features (B, D) before normalisation (what a
        contrastive fine-tuning's projection head sees)."""
        out = [self.net(self.prepare(x[s:s + SUB_BATCH])).float() for s in range(0, len(x), SUB_BATCH)]
        z = torch.cat(out) if out else torch.zeros((0, *self.code_shape))
        if z.dim() == 4:  # a feature map: average it, as the ResNet's own pooling does
            z = z.mean(dim=(2, 3))
        return z.flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor | None:
        """A ResNet's last map (B, K, h, w), for attention maps; None for a file's backbone."""
        if isinstance(self._modules.get("backbone"), ResNet):
            return self.backbone.feature_map(self.prepare(x))
        return None


class PixelEncoder(nn.Module):
    """The image itself as its code: (B, C, H, W) in [0, 1] -> (B, C * H * W). No parameters."""

    has_decoder = False
    contrastive = False

    def __init__(self, channels: int, size: tuple[int, int]):
        super().__init__()
        self.code_shape = (channels * size[0] * size[1],)
        self.image_shape = (channels, *size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor | None:
        return None


class OnnxBackbone:
    """An ONNX model as a function of torch tensors (CPU, or CUDA where onnxruntime has it)."""

    def __init__(self, data: bytes):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EncoderError("an ONNX encoder needs onnxruntime: pip install onnxruntime") from None
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(data, providers=providers)
        except Exception as exc:  # onnxruntime raises its own error types for files it cannot parse
            raise EncoderError(f"not a readable ONNX model: {str(exc).splitlines()[0]}") from None
        first = self.session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, list(first.shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(out, np.float32))

    def preprocessing(self) -> dict[str, Any]:
        m, pre = self.metadata, {}
        if "imgclust.input_size" in m:
            pre["input_size"] = [int(s) for s in m["imgclust.input_size"].lower().split("x")]
        elif len(self.input_shape) == 4 and all(isinstance(s, int) and s > 0 for s in self.input_shape[2:]):
            pre["input_size"] = [int(s) for s in self.input_shape[2:]]
        for key in ("mean", "std"):
            if f"imgclust.{key}" in m:
                pre[key] = [float(v) for v in m[f"imgclust.{key}"].split(",")]
        return pre


def _torchscript(data: bytes) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    extra = {"preprocess.json": ""}
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError and others for a file that is not TorchScript
        raise EncoderError(f"not a TorchScript file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    pre: dict[str, Any] = {}
    if extra["preprocess.json"]:
        try:
            pre = json.loads(extra["preprocess.json"])
        except ValueError as exc:
            raise EncoderError(f"the TorchScript file's preprocess.json is not valid JSON: {exc}") from None
    return module.eval(), pre


def _resnet_weights(name: str, data: bytes, url: str) -> ResNet:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain values
        raise EncoderError(f"{url} is not a plain state dict of tensors ({type(exc).__name__}); a file that "
                           "holds code is refused") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{url} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = resnet(name)
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("fc."))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        what = f"missing {', '.join(missing[:3])}" if missing else f"wrong shape for {', '.join(wrong[:3])}"
        raise EncoderError(f"{url} is not a {name} state dict in torchvision's layout ({what}"
                           f"{' ...' if len(missing or wrong) > 3 else ''})")
    net.load_state_dict({k: state.get(k, own[k]) for k in own})
    return net.eval()


def prepare_encoder(choice: EncoderChoice, channels: int, image_size: tuple[int, int]) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``choice`` for images of ``channels`` x ``image_size``; returns the frozen module and the
    spec that rebuilds it (``build_encoder``)."""
    if choice.kind == "pixels":
        return PixelEncoder(channels, image_size), pixel_spec(channels, image_size)
    assert choice.source is not None
    data, sha = read_source(choice.source)
    spec: dict[str, Any] = {"architecture": "pretrained", **choice.as_dict(), "source_sha256": sha,
                            "channels": channels, "image_size": list(image_size)}
    backbone, pre = _backbone(choice.kind, choice.name, data, choice.source)
    spec["input_size"] = list(pre.get("input_size") or DEFAULT_INPUT)
    spec["mean"] = list(pre.get("mean") or IMAGENET_MEAN)
    spec["std"] = list(pre.get("std") or IMAGENET_STD)
    if not (len(spec["input_size"]) == 2 and len(spec["mean"]) == 3 and len(spec["std"]) == 3):
        raise EncoderError(f"{choice.source}: preprocessing needs input_size [h, w] and three means and stds, got {pre}")
    probe = FeatureEncoder(backbone, {**spec, "code_dim": 1})
    try:
        with torch.inference_mode():
            out = probe.encode(torch.zeros((2, channels, *image_size)))
    except EncoderError:
        raise
    except Exception as exc:  # whatever the model raises on an input it does not take
        raise EncoderError(f"{choice.source} does not take (B, 3, {spec['input_size'][0]}, {spec['input_size'][1]}) "
                           f"images: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    spec["code_dim"] = int(out.shape[1])
    return FeatureEncoder(backbone, spec).eval(), spec


def pixel_spec(channels: int, image_size: tuple[int, int]) -> dict[str, Any]:
    return {"architecture": "pixels", "channels": channels, "image_size": list(image_size),
            "code_dim": channels * image_size[0] * image_size[1]}


def _backbone(kind: str, name: str, data: bytes, url: str) -> tuple[Any, dict[str, Any]]:
    if kind == "resnet":
        return _resnet_weights(name, data, url), {}
    if kind == "torchscript":
        return _torchscript(data)
    backbone = OnnxBackbone(data)
    return backbone, backbone.preprocessing()


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained encoder from its spec. A ResNet is built empty (its weights are the
    run's ``weights.pt``); a TorchScript or ONNX backbone is read again from its recorded URL and
    refused when its sha256 differs from the run's."""
    if spec["architecture"] == "pixels":
        return PixelEncoder(int(spec["channels"]), tuple(spec["image_size"]))
    if spec["kind"] == "resnet":
        return FeatureEncoder(resnet(spec["name"]), spec).eval()
    data, _ = read_source(spec["source"], spec["source_sha256"])
    backbone, _ = _backbone(spec["kind"], spec["name"], data, spec["source"])
    return FeatureEncoder(backbone, spec).eval()


def encoder_input_size(choice: EncoderChoice) -> tuple[int, int] | None:
    """The image size an encoder wants (what ``images.zarr`` holds by default); None for pixels."""
    if choice.kind == "pixels":
        return None
    if choice.kind == "resnet":
        return DEFAULT_INPUT
    assert choice.source is not None
    data, _ = read_source(choice.source)
    _, pre = _backbone(choice.kind, choice.name, data, choice.source)
    size = pre.get("input_size") or DEFAULT_INPUT
    return int(size[0]), int(size[1])


