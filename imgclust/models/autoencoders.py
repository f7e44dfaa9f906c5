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

    has_decoder = True  # the untrained encoders (imgclust.models.pretrained) have none

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

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor | None:
        """Last convolutional feature map (B, K, h, w), for attention maps; None for a dense model."""
        out = self.encoder.features(x) if hasattr(self.encoder, "features") else self.encoder(x)
        return out if out.dim() == 4 else None


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
    def __init__(self, channels: int, size: tuple[int, int], widths: tuple[int, ...], code_dim: int,
                 normed_code: bool = False):
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
        self.fc: nn.Module = nn.Linear(cin * h * w, code_dim)
        if normed_code:  # the SimCLR backbone's last layer: its features are what the projection head sees
            self.fc = nn.Sequential(self.fc, nn.BatchNorm1d(code_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _conv_dense(channels: int, size: tuple[int, int], code_dim: int = 32) -> Autoencoder:
    widths = (32, 64, 128)
    enc = _DenseEncoder(channels, size, widths, code_dim)
    return Autoencoder(enc, _dense_decoder(channels, enc.map_shape, widths, code_dim), (code_dim,), (channels, *size))


def _dense_decoder(channels: int, map_shape: tuple[int, int, int], widths: tuple[int, ...], code_dim: int) -> nn.Module:
    """Mirror of ``_DenseEncoder``: dense to its last map, then stride-2 transposed convolutions."""
    c, h, w = map_shape
    layers: list[nn.Module] = [nn.Linear(code_dim, c * h * w), nn.ReLU(inplace=True), nn.Unflatten(1, (c, h, w))]
    rev = list(widths[::-1]) + [channels]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        layers.append(nn.ConvTranspose2d(a, b if i < len(rev) - 2 else a // 2, 4, stride=2, padding=1))
        if i < len(rev) - 2:
            layers += [nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        else:
            layers += [nn.ReLU(inplace=True), nn.Conv2d(a // 2, channels, 3, padding=1)]
    return nn.Sequential(*layers)


class ContrastiveAutoencoder(Autoencoder):
    """An encoder trained contrastively (SimCLR, ``imgclust.contrastive``), then a decoder fitted to
    its frozen codes, so that reconstructions, prototypes and the MSE signal still exist.

    ``encode(x)``: the backbone's features (B, D), L2-normalised: the geometry the contrastive loss
    shapes is the angle between features. ``features(x)``: the same before normalisation, which is
    what the projection head trains on.
    """

    contrastive = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1)


def _conv_contrastive(channels: int, size: tuple[int, int], code_dim: int = 128) -> Autoencoder:
    widths = (32, 64, 128)
    enc = _DenseEncoder(channels, size, widths, code_dim, normed_code=True)
    return ContrastiveAutoencoder(enc, _dense_decoder(channels, enc.map_shape, widths, code_dim), (code_dim,),
                                  (channels, *size))


class VariationalAutoencoder(Autoencoder):
    """The write-up's VAE: the encoder gives (B, 2 * latent) = mean and log-variance.

    ``encode`` returns the mean (B, latent): the deterministic code that is clustered.
    ``sample_code`` draws z = mean + exp(logvar / 2) * eps for training and also returns the KL
    divergence to N(0, I) per image (B,).
    """

    variational = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)[:, : self.code_shape[0]]

    def sample_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.encoder(x).flatten(1).float()
        mean, logvar = stats.chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)
        return z, kl


def keras_init(model: nn.Module) -> nn.Module:
    """Keras' default initialisation (Glorot-uniform weights, zero biases) for the write-ups' Keras
    models. With PyTorch's defaults the conv VAE's 16-unit ReLU layer dies (15 of 16 units never
    fire on digits, 5-NN vote 0.33); with Keras' it keeps 7 alive and reaches 0.95 (600 steps)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _conv_vae(channels: int, size: tuple[int, int], latent: int = 10) -> Autoencoder:
    """Keras' conv VAE example: Conv32 s2, Conv64 s2, dense 16 -> (mean, logvar) of ``latent``; mirrored decoder."""
    feats = nn.Sequential(nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True))
    h, w = (size[0] + 3) // 4, (size[1] + 3) // 4
    enc = _VaeEncoder(feats, nn.Sequential(nn.Flatten(), nn.Linear(64 * h * w, 16), nn.ReLU(inplace=True),
                                           nn.Linear(16, 2 * latent)))
    dec = nn.Sequential(nn.Linear(latent, 64 * h * w), nn.ReLU(inplace=True), nn.Unflatten(1, (64, h, w)),
                        nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(32, channels, 3, padding=1))
    return keras_init(VariationalAutoencoder(enc, dec, (latent,), (channels, *size)))


def _dense_vae(channels: int, size: tuple[int, int], latent: int = 10) -> Autoencoder:
    """Keras' MLP VAE example: pixels -> 512 -> (mean, logvar) of ``latent`` -> 512 -> pixels."""
    d = channels * size[0] * size[1]
    enc = nn.Sequential(nn.Flatten(), nn.Linear(d, 512), nn.ReLU(inplace=True), nn.Linear(512, 2 * latent))
    dec = nn.Sequential(nn.Linear(latent, 512), nn.ReLU(inplace=True), nn.Linear(512, d),
                        nn.Unflatten(1, (channels, *size)))
    return keras_init(VariationalAutoencoder(enc, dec, (latent,), (channels, *size)))


class _VaeEncoder(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES = {"seed-mnist": _seed_mnist, "three-block": _three_block, "conv-dense": _conv_dense,
                 "conv-vae": _conv_vae, "dense-vae": _dense_vae, "conv-contrastive": _conv_contrastive}
SIZED = {"conv-dense": 32, "conv-vae": 10, "dense-vae": 10, "conv-contrastive": 128}  # architectures with a code size (default)


UNTRAINED = ("pixels", "pretrained")  # encoders the run does not train (imgclust.models.pretrained)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its spec: ``{"architecture", "channels", "image_size", "code_dim"}``
    (an untrained encoder's spec has more: ``imgclust.models.pretrained.build_encoder``)."""
    if spec["architecture"] in UNTRAINED:
        from imgclust.models.pretrained import build_encoder

        return build_encoder(spec)
    arch = ARCHITECTURES[spec["architecture"]]
    size = tuple(spec["image_size"])
    if spec["architecture"] in SIZED:
        return arch(spec["channels"], size, spec.get("code_dim") or SIZED[spec["architecture"]])
    return arch(spec["channels"], size)
