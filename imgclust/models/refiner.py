"""Cluster refinement: a small conv net learns to put each image in the cluster of its neighbours.

K-means on the autoencoder's UMAP manifold gives good neighbours but blunt boundaries. Following
SCAN (Van Gansbeke et al., 2020) on a CPU budget, a classifier is

1. warmed up on the most confident half of each K-means cluster (cross-entropy),
2. trained so an image and one of its nearest neighbours in the manifold get the same cluster
   (the neighbour-consistency loss), while a size term keeps every cluster in use at about the
   share K-means gave it (sizes compared sorted, so any numbering of a head's clusters fits); five heads
   train side by side on shared features and the one of lowest loss is kept (Fashion-MNIST 70k:
   0.655 -> 0.708 ACC on the same K-means; at 10k within seed noise, bench/RESULTS.md),
3. and retrained from scratch on its own most confident predictions (self-labelling).

Every step sees augmented images (small shifts and zooms), which is what makes the clusters
invariant to framing. All of it runs on a sample; the net then assigns every image.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclust.metrics import hungarian_accuracy

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class RefineSettings:
    """How refinement trains. The defaults were chosen on digits and Fashion-MNIST (bench/RESULTS.md)."""

    sample: int = 20_000  # images the net trains on
    neighbours: int = 20  # nearest neighbours in the manifold, per image
    keep: float = 0.5  # share of each cluster, most confident first, used as labels
    warm_steps: int = 300
    scan_steps: int = 600
    selflabel_steps: int = 300
    batch_size: int = 128
    scan_learning_rate: float = 1e-3
    label_learning_rate: float = 2e-3
    entropy_weight: float = 2.0
    # ``kmeans``: the size term pulls the sorted cluster shares towards K-means' sorted shares, so an
    # uneven archive keeps its big and small clusters; ``uniform``: towards equal sizes (SCAN's entropy).
    size_prior: str = "kmeans"
    heads: int = 5  # neighbour-consistency heads trained side by side; the one of lowest loss is kept
    zoom: float = 0.1  # random zoom in [1 - zoom, 1 + zoom]
    shift_fraction: float = 1 / 14  # random shift up to this share of the image side (2 px at 28)
    width: int = 32

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bounded(self, epochs: int | None, n_images: int) -> RefineSettings:
        """At most ``epochs`` passes over the sample per phase, when the user bounds training."""
        if epochs is None:
            return self
        cap = max(1, -(-epochs * min(n_images, self.sample) // self.batch_size))
        return replace(self, warm_steps=min(self.warm_steps, cap), scan_steps=min(self.scan_steps, cap),
                       selflabel_steps=min(self.selflabel_steps, cap))


class ClusterNet(nn.Module):
    """Conv w-2w-4w (stride 2, BatchNorm) -> 128 features -> ``k`` cluster logits.

    Input (B, C, H, W) in [0, 1]; ``forward`` gives logits (B, k).
    """

    def __init__(self, channels: int, k: int, width: int = 32, features: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(cin * 16, features),
                                      nn.BatchNorm1d(features), nn.ReLU(inplace=True))
        self.head = nn.Linear(features, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): cheap invariance to framing."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment(x: torch.Tensor, settings: RefineSettings, gen: torch.Generator) -> torch.Tensor:
    """Random zoom about the centre, then a random shift; (B, C, H, W) -> same shape."""
    if settings.zoom > 0:
        b = x.shape[0]
        s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * settings.zoom
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    return random_shift(x, max(1, round(min(x.shape[-2:]) * settings.shift_fraction)), gen)


def confident_subset(labels: np.ndarray, confidence: np.ndarray, k: int, keep: float) -> np.ndarray:
    """Indices of the ``keep`` most confident members of each cluster (at least one each)."""
    chosen = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members):
            n = max(1, round(keep * len(members)))
            chosen.append(members[np.argsort(-confidence[members], kind="stable")[:n]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _optimiser(net: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)


def fit_on_labels(net: ClusterNet, x: torch.Tensor, rows: np.ndarray, targets: np.ndarray, steps: int,
                  settings: RefineSettings, gen: torch.Generator) -> ClusterNet:
    """Class-balanced cross-entropy (label smoothing 0.1) on ``x[rows]`` labelled ``targets``."""
    k = net.head.out_features
    counts = np.bincount(targets, minlength=k).astype(np.float64)
    weights = torch.from_numpy(1.0 / np.maximum(counts[targets], 1))
    t = torch.from_numpy(targets).long()
    xs = x[torch.from_numpy(rows)]
    opt, sched = _optimiser(net, settings.label_learning_rate, steps)
    net.train()
    for _ in range(steps):
        b = torch.multinomial(weights, settings.batch_size, replacement=True, generator=gen)
        loss = F.cross_entropy(net(augment(xs[b], settings, gen)), t[b], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


def scan_loss(p: torch.Tensor, q: torch.Tensor, entropy_weight: float,
              prior: torch.Tensor | None = None) -> torch.Tensor:
    """SCAN's loss for probabilities (B, k) of images ``p`` and of their neighbours ``q``:
    -log <p, q>, plus ``entropy_weight`` times KL(mean prediction || ``prior``) with both sorted
    (``prior`` (k,) sums to 1; None: uniform, which is SCAN's minus-entropy of the mean prediction)."""
    consistency = -torch.log((p * q).sum(1).clamp_min(1e-7)).mean()
    mean = torch.cat([p, q]).mean(0)
    size = (mean * torch.log(mean.clamp_min(1e-7))).sum()
    if prior is not None:
        size = size - (torch.sort(mean).values * torch.log(torch.sort(prior).values.clamp_min(1e-7))).sum() \
            - float(np.log(len(prior)))
    return consistency + entropy_weight * size


def size_prior(labels: np.ndarray, k: int, settings: RefineSettings) -> torch.Tensor | None:
    """The shares (k,) the size term aims at: K-means' cluster shares, smoothed so no cluster aims at
    nothing, or None for equal sizes."""
    if settings.size_prior == "uniform":
        return None
    counts = np.bincount(labels, minlength=k).astype(np.float64) + 1.0
    return torch.from_numpy(counts / counts.sum()).float()


def fit_neighbour_consistency(net: ClusterNet, x: torch.Tensor, neighbours: np.ndarray, settings: RefineSettings,
                              gen: torch.Generator, prior: torch.Tensor | None = None) -> ClusterNet:
    """Train ``net`` so an image a and a random one of its neighbours n fall in the same cluster
    (``scan_loss``, which keeps all clusters alive at about their ``prior`` shares). With ``settings.heads`` > 1, that many heads
    share the features; the head of lowest loss over the whole sample becomes ``net.head``, as
    SCAN does: one head's outcome depends on its start, and the loss tells the better ones."""
    n_rows, n_nb = neighbours.shape
    nb = torch.from_numpy(neighbours)
    heads = nn.ModuleList([net.head] + [nn.Linear(net.head.in_features, net.head.out_features)
                                        for _ in range(settings.heads - 1)])
    opt, sched = _optimiser(nn.ModuleList([net.features, heads]), settings.scan_learning_rate, settings.scan_steps)
    bs = settings.batch_size
    net.train()
    for _ in range(settings.scan_steps):
        a = torch.randint(0, n_rows, (bs,), generator=gen)
        n = nb[a, torch.randint(0, n_nb, (bs,), generator=gen)]
        f = net.features(augment(torch.cat([x[a], x[n]]), settings, gen))
        loss = sum(scan_loss(F.softmax(h(f[:bs]), 1), F.softmax(h(f[bs:]), 1), settings.entropy_weight, prior)
                   for h in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if len(heads) > 1:
        losses = head_losses(net, heads, x, neighbours[:, 0], settings.entropy_weight, prior)
        net.head = heads[int(np.argmin(losses))]
        logger.info("refine: neighbour-consistency loss per head %s; kept head %d",
                    " ".join(f"{v:.3f}" for v in losses), int(np.argmin(losses)))
    return net


@torch.inference_mode()
def head_losses(net: ClusterNet, heads: nn.ModuleList, x: torch.Tensor, partner: np.ndarray,
                entropy_weight: float, prior: torch.Tensor | None = None, batch_size: int = 1024) -> list[float]:
    """Each head's ``scan_loss`` over all of ``x`` paired with ``x[partner]`` (no augmentation)."""
    net.eval()
    feats = torch.cat([net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    pt = torch.from_numpy(partner)
    return [float(scan_loss(F.softmax(h(feats), 1), F.softmax(h(feats[pt]), 1), entropy_weight, prior))
            for h in heads]


@torch.inference_mode()
def predict(net: ClusterNet, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Cluster probabilities (N, k) of images (N, C, H, W) in [0, 1]."""
    net.eval()
    return torch.cat([F.softmax(net(x[i:i + batch_size]), 1) for i in range(0, len(x), batch_size)]).numpy() \
        if len(x) else np.zeros((0, net.head.out_features), np.float32)


def nearest_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's nearest other rows (Euclidean)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(features) - 1)
    return NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features, return_distance=False)[:, 1:]


def refine(x: torch.Tensor, features: np.ndarray, labels: np.ndarray, confidence: np.ndarray, k: int,
           settings: RefineSettings, seed: int) -> tuple[ClusterNet, dict[str, float]]:
    """Train the cluster net on a sample: images ``x`` (S, C, H, W) in [0, 1], their manifold
    ``features`` (S, d), K-means ``labels`` (S,) and ``confidence`` (S,, higher = closer to centre).

    Returns the net and, per phase, the share of the sample whose cluster agrees with K-means.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    channels = x.shape[1]
    history: dict[str, float] = {}
    net = ClusterNet(channels, k, settings.width)
    rows = confident_subset(labels, confidence, k, settings.keep)
    net = fit_on_labels(net, x, rows, labels[rows], settings.warm_steps, settings, gen)
    # Agreement with K-means under the best matching of cluster ids: a head other than the
    # warm-started one numbers its clusters its own way.
    history["warm"] = hungarian_accuracy(labels, predict(net, x).argmax(1))
    net = fit_neighbour_consistency(net, x, nearest_neighbours(features, settings.neighbours), settings, gen,
                                    size_prior(labels, k, settings))
    p = predict(net, x)
    history["neighbours"] = hungarian_accuracy(labels, p.argmax(1))
    logger.info("refine: agreement with K-means after warm-up %.3f, after neighbour consistency %.3f",
                history["warm"], history["neighbours"])
    if settings.selflabel_steps:
        own, conf = p.argmax(1), p.max(1)
        rows = confident_subset(own, conf, k, settings.keep)
        torch.manual_seed(seed + 7)
        net = fit_on_labels(ClusterNet(channels, k, settings.width), x, rows, own[rows], settings.selflabel_steps,
                            settings, gen)
        history["selflabel"] = hungarian_accuracy(labels, predict(net, x).argmax(1))
        logger.info("refine: after self-labelling %.3f", history["selflabel"])
    return net.eval(), history


def overlap_counts(raw: np.ndarray, kmeans: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64: images per (net cluster of ``raw``, K-means cluster of ``kmeans``), both (N,).
    Counts of chunks add up to the counts of the whole."""
    overlap = np.zeros((k, k), np.int64)
    np.add.at(overlap, (np.asarray(raw, np.int64).ravel(), np.asarray(kmeans, np.int64).ravel()), 1)
    return overlap


def restore_dead_clusters(raw: np.ndarray, kmeans: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Where the net's choice ``raw`` (N,) left some of its k clusters empty: the (net cluster,
    K-means cluster) pairs that bring them back (``restore_from_overlap`` of their overlap)."""
    return restore_from_overlap(overlap_counts(raw, kmeans, k))


def restore_from_overlap(overlap: np.ndarray) -> list[tuple[int, int]]:
    """The (net cluster, K-means cluster) pairs that bring back the net's empty clusters, from
    ``overlap_counts`` (k, k). Net clusters are matched to K-means' by their overlap (Hungarian);
    each empty one takes back the K-means cluster it is matched to, so a refinement that merged
    away a small group keeps the rest of its gain. Apply with ``apply_restored``."""
    from scipy.optimize import linear_sum_assignment

    counts = overlap.sum(1)
    if (counts > 0).all():
        return []
    rows, cols = linear_sum_assignment(-overlap)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if counts[r] == 0]


def restored_counts(overlap: np.ndarray, restored: list[tuple[int, int]]) -> np.ndarray:
    """(k,) images per net cluster once ``restored`` is applied, from ``overlap_counts`` (k, k)."""
    after = np.array(overlap, copy=True)
    for net_id, km_id in restored:
        whole = after[:, km_id].sum()
        after[:, km_id] = 0
        after[net_id, km_id] = whole
    return after.sum(1)


def apply_restored(raw: np.ndarray, kmeans: np.ndarray, restored: list[tuple[int, int]] | list[list[int]]) -> np.ndarray:
    """``raw`` with the members of each restored K-means cluster given their net cluster."""
    out = np.array(raw, copy=True)
    for net_id, km_id in restored:
        out[kmeans == km_id] = net_id
    return out
