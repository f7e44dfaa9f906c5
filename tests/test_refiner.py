"""The cluster net of the refinement stage: shapes, sample selection, step bounds, and that it learns."""

import numpy as np
import pytest
import torch
from torch import nn

from imgclust.metrics import hungarian_accuracy
from imgclust.models.refiner import (
    ClusterNet,
    RefineSettings,
    apply_restored,
    augment,
    confident_subset,
    fit_on_labels,
    head_losses,
    nearest_neighbours,
    overlap_counts,
    predict,
    refine,
    restore_dead_clusters,
    restore_from_overlap,
    restored_counts,
    scan_loss,
    size_prior,
)


def bars(n_per: int = 40, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Four classes of images: a bright horizontal band in one of four rows, plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, (4 * n_per, 1, size, size)).astype(np.float32)
    y = np.repeat(np.arange(4), n_per)
    for i, c in enumerate(y):
        x[i, 0, c * 4:(c + 1) * 4, :] = 1.0
    return torch.from_numpy(x), y


def test_net_shapes_for_any_size_and_channels():
    for channels, size in ((1, (28, 28)), (3, (32, 32)), (3, (30, 45))):
        net = ClusterNet(channels, 7).eval()
        assert net(torch.rand(2, channels, *size)).shape == (2, 7)
        p = predict(net, torch.rand(5, channels, *size))
        assert p.shape == (5, 7) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_confident_subset_keeps_the_most_confident_share_of_each_cluster():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    conf = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.0])
    assert confident_subset(labels, conf, 3, 0.5).tolist() == [1, 3, 5, 6]  # at least one per cluster


def test_augment_keeps_shape_and_changes_pixels():
    x, _ = bars(4)
    y = augment(x, RefineSettings(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y)


def test_epochs_bound_every_refinement_phase():
    s = RefineSettings().bounded(2, 300)  # 2 passes over 300 images at batch 128 -> 5 steps
    assert (s.warm_steps, s.scan_steps, s.selflabel_steps) == (5, 5, 5)
    assert RefineSettings().bounded(None, 300) == RefineSettings()


def test_scan_loss_rewards_agreeing_neighbours_and_penalises_unused_clusters():
    eye = torch.eye(4)
    agree = scan_loss(eye, eye, entropy_weight=1.0)
    disagree = scan_loss(eye, eye.roll(1, 0), entropy_weight=1.0)
    collapsed = scan_loss(eye[[0, 0, 0, 0]], eye[[0, 0, 0, 0]], entropy_weight=1.0)
    assert agree < disagree
    assert agree < collapsed  # same agreement, but one cluster for everything


def test_size_term_aims_at_the_prior_shares_in_any_numbering():
    eye = torch.eye(4)
    uneven = eye[[0] * 8 + [1] * 4 + [2] * 2 + [3] * 2]  # shares 1/2, 1/4, 1/8, 1/8
    even = eye[[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4]
    prior = torch.tensor([0.125, 0.5, 0.125, 0.25])  # the same shares, numbered otherwise
    assert scan_loss(uneven, uneven, 1.0, prior) < scan_loss(even, even, 1.0, prior)
    assert scan_loss(uneven, uneven, 1.0) > scan_loss(even, even, 1.0)  # equal sizes without a prior
    renumbered = uneven.roll(1, 1)
    assert float(scan_loss(uneven, uneven, 1.0, prior)) == pytest.approx(float(scan_loss(renumbered, renumbered, 1.0, prior)))
    assert float(scan_loss(even, even, 1.0, torch.full((4,), 0.25))) == pytest.approx(float(scan_loss(even, even, 1.0)))


def test_size_prior_is_kmeans_shares_smoothed_or_none():
    labels = np.array([0] * 7 + [1] * 2 + [2])
    prior = size_prior(labels, 4, RefineSettings())
    assert prior.tolist() == pytest.approx([8 / 14, 3 / 14, 2 / 14, 1 / 14])
    assert size_prior(labels, 4, RefineSettings(size_prior="uniform")) is None


def test_head_losses_rank_a_trained_head_below_an_untrained_one():
    x, y = bars()
    settings = RefineSettings(batch_size=32)
    net = fit_on_labels(ClusterNet(1, 4), x, np.arange(len(y)), y, 60, settings, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    heads = nn.ModuleList([net.head, nn.Linear(net.head.in_features, 4)])
    partner = nearest_neighbours(x.flatten(1).numpy(), 1)[:, 0]
    trained, untrained = head_losses(net, heads, x, partner, entropy_weight=1.0)
    assert trained < untrained


@pytest.mark.parametrize("heads", [1, 3])
def test_refinement_repairs_noisy_initial_labels(heads):
    x, y = bars()
    rng = np.random.default_rng(1)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.25
    noisy[flip] = rng.integers(0, 4, flip.sum())
    confidence = np.where(flip, 0.0, 1.0)  # K-means would be less sure about its mistakes
    features = x.flatten(1).numpy()
    assert nearest_neighbours(features, 5).shape == (len(y), 5)
    settings = RefineSettings(warm_steps=60, scan_steps=60, selflabel_steps=60, batch_size=32, neighbours=5,
                              heads=heads)
    net, history = refine(x, features, noisy, confidence, 4, settings, seed=0)
    pred = predict(net, x).argmax(1)
    assert hungarian_accuracy(y, pred) > 0.95 > (noisy == y).mean()
    if heads == 1:  # one head keeps the warm start's numbering; another head numbers clusters its own way
        assert (pred == y).mean() > 0.95
    assert net.state_dict().keys() == ClusterNet(1, 4).state_dict().keys()  # what load_refiner rebuilds
    assert set(history) == {"warm", "neighbours", "selflabel"}
    again, _ = refine(x, features, noisy, confidence, 4, settings, seed=0)
    assert (predict(again, x).argmax(1) == pred).all()  # seeded: reproducible


def test_a_cluster_the_net_left_empty_is_restored_from_kmeans_and_the_rest_stays_refined():
    kmeans = np.array([0] * 50 + [1] * 40 + [2] * 5)
    raw = np.array([2] * 48 + [0] * 2 + [0] * 40 + [0] * 5)  # the small K-means cluster 2 merged away
    restored = restore_dead_clusters(raw, kmeans, 3)
    assert restored == [(1, 2)]  # net cluster 1 takes back K-means cluster 2
    fixed = apply_restored(raw, kmeans, restored)
    assert np.bincount(fixed, minlength=3).tolist() == [42, 5, 48]
    assert (fixed[kmeans == 2] == 1).all() and (fixed[48:50] == 0).all()  # refined moves elsewhere kept
    assert restore_dead_clusters(kmeans, kmeans, 3) == []


def test_restoration_from_chunks_counts_agrees_with_the_whole():
    """The refine stage sees only each chunk's (k, k) overlap: restoring from their sum gives the
    pairs and the sizes that the whole labels give."""
    rng = np.random.default_rng(3)
    k = 6
    kmeans = rng.integers(0, k, 5000)
    raw = np.where(np.isin(kmeans, [1, 4]), 0, kmeans)  # net clusters 1 and 4 died
    raw[rng.random(5000) < 0.1] = 2
    chunks = [overlap_counts(raw[a:a + 700], kmeans[a:a + 700], k) for a in range(0, 5000, 700)]
    restored = restore_from_overlap(sum(chunks))
    assert restored == restore_dead_clusters(raw, kmeans, k) and {r for r, _ in restored} == {1, 4}
    fixed = apply_restored(raw, kmeans, restored)
    assert restored_counts(sum(chunks), restored).tolist() == np.bincount(fixed, minlength=k).tolist()


def test_a_saved_model_places_new_images_into_a_restored_cluster_by_its_kmeans_centre():
    from imgclust.runmodel import RunModel

    torch.manual_seed(0)
    centres = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    spec = {"remap": [2, 0, 1], "restored": [[1, 2]], "kmeans_centres": centres}
    model = RunModel(None, {}, refiner=ClusterNet(1, 3).eval(), refiner_spec=spec)
    pixels = np.random.default_rng(0).integers(0, 255, (6, 1, 28, 28), dtype=np.uint8)
    features = np.array([[0.1, 9.5], [0.3, 10.2], [9.0, 0.1], [0.0, 0.2], [10.0, 1.0], [1.0, 11.0]])
    labels = model.refine_labels(pixels, features)
    raw = model.refiner_raw(pixels)
    near_restored = np.array([True, True, False, False, False, True])
    assert (labels[near_restored] == 0).all()  # net cluster 1, remapped to the run's id 0
    assert (labels[~near_restored] == np.array([2, 0, 1])[raw[~near_restored]]).all()
