import pytest
import torch

from imgclust.models import build_model
from imgclust.presets import PRESETS


@pytest.mark.parametrize("arch, size, channels, code", [
    ("seed-mnist", (28, 28), 1, 98),
    ("three-block", (240, 320), 3, 30 * 40 * 8),
    ("three-block", (152, 152), 3, 19 * 19 * 8),
    ("conv-dense", (32, 32), 3, 32),
    ("conv-dense", (30, 50), 1, 32),
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
