"""The contrastive pretext: views, loss, and the default's two-phase training."""


import numpy as np
import torch

from imgclust.models.contrastive import augment_views, distort_colour, nt_xent, warmup_cosine


def test_views_are_random_valid_images_and_reproducible():
    x = torch.rand(16, 3, 32, 32)
    a = augment_views(x, torch.Generator().manual_seed(0))
    b = augment_views(x, torch.Generator().manual_seed(0))
    c = augment_views(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x, atol=0.05)


def test_colour_distortions_turn_views_grey_or_rotate_hues_and_leave_grey_images_alone():
    g = torch.Generator().manual_seed(0)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    red = torch.zeros(400, 3, 4, 4)
    red[:, 0] = 0.8
    grey = distort_colour(red, u, "grey")
    turned = (grey.std(1) < 1e-6).flatten(1).all(1)
    assert 0.1 < turned.float().mean() < 0.3  # one view in five
    assert torch.allclose(grey[turned][:, 0], torch.full_like(grey[turned][:, 0], 0.8 * 0.299))
    assert torch.equal(grey[~turned], red[~turned])  # the others keep their colour exactly
    hue = distort_colour(red, u, "hue")
    assert (hue[:, 1] - hue[:, 0]).max() > 0  # some views are no longer red
    assert torch.equal(distort_colour(red, u, "none"), red)
    one = torch.rand(8, 1, 8, 8)  # a grey archive's views get no colour distortion
    assert torch.equal(augment_views(one, torch.Generator().manual_seed(3), colour="grey"),
                       augment_views(one, torch.Generator().manual_seed(3)))


def test_nt_xent_rewards_matching_views():
    a = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    matched = nt_xent(torch.cat([a, a + 0.01 * torch.randn_like(a)]))
    unrelated = nt_xent(torch.randn(64, 16))
    assert matched < unrelated - 1.0
    assert torch.isfinite(nt_xent(torch.cat([a, a]).half()))


def test_schedule_warms_up_then_anneals_to_zero():
    f = [warmup_cosine(s, 100) for s in range(100)]
    assert f[0] < f[4] == 1.0 and f[50] < 0.6 and f[-1] < 0.01


def test_default_trains_the_encoder_contrastively_then_the_decoder(tmp_path):
    from imgclust.runmodel import RunModel
    from imgclust.runstore import Location
    from tests.test_train_encode import train_at

    store, a = train_at(tmp_path / "a", "default", 5, 16, 1e-3, 3, n=64)
    _, b = train_at(tmp_path / "b", "default", 5, 16, 1e-3, 3, n=64)
    assert a.weights_sha256 == b.weights_sha256 and a.code_dim == 128
    saved = RunModel.load(Location(store.model))
    assert saved.spec["pretext_steps"] == 4 * 4  # 80 % of 5 passes of 4 steps; the last pass fits the decoder
    assert saved.spec["loss_kinds"] == ["contrastive"] * 4 + ["reconstruction"]
    assert a.losses[0] > 1.0 > a.losses[-1]  # NT-Xent (about log(2B)) first, then a pixel MSE
    model = saved.autoencoder
    x = torch.from_numpy(np.asarray(__import__("zarr").open_array(store.images)[:8])).float() / 255
    with torch.no_grad():
        codes = model.encode(x)
        assert torch.allclose(codes.norm(dim=1), torch.ones(8), atol=1e-5)
        assert model(x).shape == x.shape
