import pytest
import torch

from imgclust.models.autoencoders import build_model
from imgclust.presets import PRESETS


@pytest.mark.parametrize("arch, size, channels, code", [
    ("seed-mnist", (28, 28), 1, 98),
    ("three-block", (240, 320), 3, 30 * 40 * 8),
    ("three-block", (152, 152), 3, 19 * 19 * 8),
    ("conv-dense", (32, 32), 3, 32),
    ("conv-dense", (30, 50), 1, 32),
    ("conv-vae", (28, 28), 1, 32),
    ("conv-vae", (30, 41), 3, 32),
    ("dense-vae", (28, 28), 1, 32),
])
def test_code_and_reconstruction_shapes(arch, size, channels, code):
    model = build_model({"architecture": arch, "image_size": list(size), "channels": channels, "code_dim": 32})
    x = torch.rand(2, channels, *size)
    with torch.no_grad():
        assert model.encode(x).shape == (2, code)
        y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_presets_reproduce_the_write_ups():
    assert PRESETS["seed-mnist"].image_size == (28, 28) and PRESETS["seed-mnist"].loss == "bce"
    assert PRESETS["seed-house"].image_size == (240, 320)
    assert PRESETS["seed-faces"].image_size == (152, 152)
    assert PRESETS["default"].embedding == "umap"


def test_vae_codes_are_means_and_training_samples_around_them():
    torch.manual_seed(0)
    model = build_model({"architecture": "conv-vae", "image_size": [28, 28], "channels": 1, "code_dim": 10})
    x = torch.rand(4, 1, 28, 28)
    mean = model.encode(x)
    z, kl = model.sample_code(x)
    assert mean.shape == z.shape == (4, 10) and kl.shape == (4,) and bool((kl >= 0).all())
    assert torch.equal(model.encode(x), mean) and not torch.allclose(z, mean)  # encode is deterministic


def test_vae_presets_cluster_with_dbscan_on_a_2d_map():
    for name in ("seed-vae", "seed-vae-dense", "seed-vae-umap"):
        p = PRESETS[name]
        assert p.code_dim == 10 and p.method == "dbscan" and p.embedding_dim == 2
    assert PRESETS["seed-vae"].embedding == "tsne" and PRESETS["seed-vae-umap"].embedding == "umap"


def test_vaes_start_from_keras_initialisation():
    """The write-ups' VAEs are Keras models; with PyTorch's default init the conv VAE's bottleneck dies."""
    for arch in ("conv-vae", "dense-vae"):
        model = build_model({"architecture": arch, "image_size": [28, 28], "channels": 1, "code_dim": 10})
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert layers and all(float(m.bias.detach().abs().max()) == 0.0 for m in layers)
        first = layers[0]
        fan_in = first.weight[0].numel()
        fan_out = first.weight.shape[0] * first.weight[0, 0].numel() if first.weight.dim() == 4 else first.weight.shape[0]
        assert float(first.weight.detach().abs().max()) <= (6 / (fan_in + fan_out)) ** 0.5 + 1e-6
