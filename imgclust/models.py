"""Convolutional autoencoders for every preset, rebuilt from a small JSON-able spec."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Autoencoder(nn.Module):
    """Encoder/decoder pair whose ``encode`` gives the flat code used for clustering.

    Input ``x``: float tensor (B, C, H, W) in [0, 1]. ``encode(x)``: (B, D). ``forward(x)``: the
    reconstruction (B, C, H, W) in [0, 1]; losses use ``decode_logits`` for numerical stability.
    The decoder's output is resized to (H, W) when the pooling did not divide the size exactly.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, code_shape: tuple[int, ...], image_shape: tuple[int, int, int]):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.code_shape = code_shape
        self.image_shape = image_shape

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def decode_logits(self, code: torch.Tensor) -> torch.Tensor:
        out = self.decoder(code.view(code.shape[0], *self.code_shape))
        if out.shape[-2:] != self.image_shape[-2:]:
            out = F.interpolate(out, size=self.image_shape[-2:], mode="bilinear", align_corners=False)
        return out

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(code))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (B, K, h, w), for attention maps."""
        return self.encoder.features(x) if hasattr(self.encoder, "features") else self.encoder(x)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


def _seed_mnist(channels: int, size: tuple[int, int]) -> Autoencoder:
    enc = nn.Sequential(_conv(channels, 16), nn.MaxPool2d(2), _conv(16, 2), nn.MaxPool2d(2))
    dec = nn.Sequential(
        _conv(2, 2), nn.Upsample(scale_factor=2), _conv(2, 16), nn.Upsample(scale_factor=2),
        nn.Conv2d(16, channels, 3, padding=1),
    )
    return Autoencoder(enc, dec, (2, size[0] // 4, size[1] // 4), (channels, *size))


def _three_block(channels: int, size: tuple[int, int]) -> Autoencoder:
    enc = nn.Sequential(
        _conv(channels, 32), nn.MaxPool2d(2), _conv(32, 16), nn.MaxPool2d(2), _conv(16, 8), nn.MaxPool2d(2)
    )
    dec = nn.Sequential(
        _conv(8, 8), nn.Upsample(scale_factor=2), _conv(8, 16), nn.Upsample(scale_factor=2),
        _conv(16, 32), nn.Upsample(scale_factor=2), nn.Conv2d(32, channels, 3, padding=1),
    )
    return Autoencoder(enc, dec, (8, size[0] // 8, size[1] // 8), (channels, *size))


class _DenseEncoder(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], widths: tuple[int, ...], code_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        h, w = size
        for _ in widths:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.map_shape = (cin, h, w)
        self.fc = nn.Linear(cin * h * w, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _conv_dense(channels: int, size: tuple[int, int], code_dim: int = 32) -> Autoencoder:
    widths = (32, 64, 128)
    enc = _DenseEncoder(channels, size, widths, code_dim)
    c, h, w = enc.map_shape
    layers: list[nn.Module] = [nn.Linear(code_dim, c * h * w), nn.ReLU(inplace=True), nn.Unflatten(1, (c, h, w))]
    rev = list(widths[::-1]) + [channels]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        layers.append(nn.ConvTranspose2d(a, b if i < len(rev) - 2 else a // 2, 4, stride=2, padding=1))
        if i < len(rev) - 2:
            layers += [nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        else:
            layers += [nn.ReLU(inplace=True), nn.Conv2d(a // 2, channels, 3, padding=1)]
    dec = nn.Sequential(*layers)
    return Autoencoder(enc, dec, (code_dim,), (channels, *size))


ARCHITECTURES = {"seed-mnist": _seed_mnist, "three-block": _three_block, "conv-dense": _conv_dense}


def build_model(spec: dict[str, Any]) -> Autoencoder:
    """Rebuild a model from its spec: ``{"architecture", "channels", "image_size", "code_dim"}``."""
    arch = ARCHITECTURES[spec["architecture"]]
    size = tuple(spec["image_size"])
    if spec["architecture"] == "conv-dense":
        return arch(spec["channels"], size, spec.get("code_dim") or 32)
    return arch(spec["channels"], size)
