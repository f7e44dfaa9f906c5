"""Named recipes: the write-ups' models reproduced faithfully, and the product's own default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Preset:
    """What a preset fixes: architecture, training and the clustering that follows.

    ``embedding`` is what the codes go through before clustering: ``none`` (standardised codes, as
    the write-ups did), ``umap`` (a low-dimensional manifold of the codes, the N2D recipe) or
    ``tsne``. ``method`` is ``kmeans`` or ``dbscan`` (on a 2-D map of a sample; it picks k itself).
    """

    name: str
    architecture: str
    image_size: tuple[int, int]
    epochs: int | None  # None: a step budget that scales with the corpus, see ``train_steps``
    learning_rate: float
    loss: Literal["bce", "mse"]
    embedding: Literal["none", "umap", "tsne"]
    augment: bool
    one_cycle: bool  # one-cycle learning rate (warm up, then anneal) instead of a constant one
    code_dim: int | None
    description: str
    method: Literal["kmeans", "dbscan"] = "kmeans"
    embedding_dim: int = 10  # components of the UMAP/t-SNE map
    refine: bool = False  # refine K-means with a neighbour-consistent conv net (imgclust/stages/refine.py)
    merge: bool = False  # K-means cuts 5k pieces joined along the manifold (imgclust/cluster/merge.py; opt-in)
    # VAEs: share of the training steps over which the KL weight ramps from 0 to 1. Without it the
    # write-up's conv VAE collapses on small corpora (its means carry almost nothing; bench/research).
    kl_warmup: float = 0.0
    min_steps: int = 0  # a fixed ``epochs`` is raised to reach this many optimiser steps
    # ``reconstruction``: the autoencoder learns to rebuild its input. ``contrastive``: the encoder
    # learns SimCLR's augmentation invariance first, then the decoder is fitted to its frozen codes.
    pretext: Literal["reconstruction", "contrastive"] = "reconstruction"
    # ``epochs=None``: a budget of ``budget_epochs`` epochs' worth of steps within ``step_range`` (train_steps)
    step_range: tuple[int, int] = (500, 1_500)
    budget_epochs: int = 15
    # contrastive presets: the colour distortion of colour views (imgclust.models.contrastive.COLOUR_DISTORTIONS)
    colour_distortion: str = "none"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="default",
            architecture="conv-contrastive",
            image_size=(32, 32),
            epochs=None,
            learning_rate=1e-3,
            loss="mse",
            embedding="umap",
            augment=False,
            one_cycle=True,
            code_dim=128,
            pretext="contrastive",
            step_range=(1_875, 7_500),
            budget_epochs=94,
            refine=True,
            colour_distortion="grey",
            description="Conv 32-64-128 (stride 2, BatchNorm) -> 128-d features trained contrastively "
            "(SimCLR: crops, flips, contrast, erasing; on colour images one view in five turned grey), then a "
            "decoder fitted to the frozen codes; 1,875-7,500 "
            "steps (94 epochs' worth), four fifths of them contrastive; L2-normalised codes -> UMAP (10-d) -> "
            "K-means -> refined by a neighbour-consistent conv net (SCAN-style: five heads, the lowest-loss "
            "one kept, then self-labelling).",
        ),
        Preset(
            name="cae-refine",
            architecture="conv-dense",
            image_size=(32, 32),
            epochs=None,
            learning_rate=1e-3,
            loss="mse",
            embedding="umap",
            augment=False,
            one_cycle=True,
            code_dim=32,
            refine=True,
            description="The reconstruction-trained predecessor of the default, kept for comparison: "
            "Conv 32-64-128 (stride 2, BatchNorm) -> dense 32-d code, "
            "one-cycle learning rate over 500-1,500 steps; standardised codes -> UMAP (10-d) -> K-means -> "
            "refined by a neighbour-consistent conv net (SCAN-style: five heads, the lowest-loss one kept, "
            "then self-labelling).",
        ),
        Preset(
            name="seed-mnist",
            architecture="seed-mnist",
            image_size=(28, 28),
            epochs=10,
            learning_rate=1e-3,
            loss="bce",
            embedding="none",
            augment=False,
            one_cycle=False,
            code_dim=None,
            description="Conv16-Pool-Conv2-Pool (7x7x2 = 98-d code at 28x28), upsampling decoder, "
            "sigmoid + binary cross-entropy; K-means on the codes.",
        ),
        Preset(
            name="seed-house",
            architecture="three-block",
            image_size=(240, 320),
            epochs=10,
            learning_rate=1e-3,
            loss="bce",
            embedding="none",
            augment=False,
            one_cycle=False,
            code_dim=None,
            description="Conv32-Pool-Conv16-Pool-Conv8-Pool on 240x320 RGB house photos "
            "(30x40x8 code); K-means (k=20 in the write-up).",
        ),
        Preset(
            name="seed-faces",
            architecture="three-block",
            image_size=(152, 152),
            epochs=10,
            learning_rate=1e-3,
            loss="bce",
            embedding="none",
            augment=False,
            one_cycle=False,
            code_dim=None,
            description="Same three blocks on 152x152 face crops (19x19x8 code); K-means (k=25).",
        ),
        Preset(
            name="seed-cifar",
            architecture="pixels",
            image_size=(32, 32),
            epochs=0,
            learning_rate=1e-3,
            loss="mse",
            embedding="none",
            augment=False,
            one_cycle=False,
            code_dim=None,
            description="The CIFAR-10 write-up: K-means on the raw RGB pixels at 32x32 (3,072 values an image), "
            "no training; evaluate prints purity as it did. Prototypes are the clusters' mean images.",
        ),
        Preset(
            name="seed-vae",
            architecture="conv-vae",
            image_size=(28, 28),
            epochs=30,
            learning_rate=1e-3,
            loss="bce",
            embedding="tsne",
            augment=False,
            one_cycle=False,
            code_dim=10,
            kl_warmup=1 / 3,
            min_steps=1500,
            method="dbscan",
            embedding_dim=2,
            description="The write-up's conv VAE (Conv32-Conv64 stride 2, dense 16, latent 10; Keras example): "
            "means of the codes -> t-SNE 2-D -> DBSCAN, which picks k itself (n_clusters is ignored).",
        ),
        Preset(
            name="seed-vae-dense",
            architecture="dense-vae",
            image_size=(28, 28),
            epochs=50,
            learning_rate=1e-3,
            loss="bce",
            embedding="tsne",
            augment=False,
            one_cycle=False,
            code_dim=10,
            method="dbscan",
            embedding_dim=2,
            description="The write-up's dense VAE (pixels-512-latent 10) -> t-SNE 2-D -> DBSCAN.",
        ),
        Preset(
            name="seed-vae-umap",
            architecture="conv-vae",
            image_size=(28, 28),
            epochs=30,
            learning_rate=1e-3,
            loss="bce",
            embedding="umap",
            augment=False,
            one_cycle=False,
            code_dim=10,
            kl_warmup=1 / 3,
            min_steps=1500,
            method="dbscan",
            embedding_dim=2,
            description="The conv VAE with UMAP 2-D instead of t-SNE before DBSCAN.",
        ),
    ]
}




WHOLE_PASSES = 10  # a budget of at least this many passes is rounded up to whole passes


def train_steps(preset: str, n_images: int, batch_size: int, epochs: int | None = None,
                steps: int | None = None) -> int:
    """Optimiser steps of a training on ``n_images``: ``steps`` (``--train-steps``) as given;
    ``epochs`` (``--epochs``) as ``epochs`` x ceil(n / batch); else the preset's own budget.

    A preset with no trainable encoder (``seed-cifar``'s raw pixels) trains 0 steps. A preset
    with a fixed number of epochs trains that many passes (raised to its ``min_steps``).
    The others train for ``budget_epochs`` passes' worth of steps within the preset's
    ``step_range``: never fewer than its lower bound (small corpora need repetitions to converge)
    nor more than its upper (large corpora are redundant enough that more steps buy little
    clustering quality and cost linear time). While that is ``WHOLE_PASSES`` passes or more, it is
    rounded up to whole passes; above, it is exactly the budget, a fraction of one pass. The
    default: 1,880 steps for the 1,797 digits, 3,760 for 10k images, about 7,500 from 20k up,
    and 7,500 for 10 million.
    """
    per_epoch = max(1, -(-n_images // batch_size))
    if PRESETS[preset].architecture == "pixels":
        return 0  # nothing to train
    if steps is not None:
        return steps
    if epochs is not None:
        return epochs * per_epoch
    p = PRESETS[preset]
    if p.epochs is not None:
        return max(p.epochs, -(-p.min_steps // per_epoch)) * per_epoch
    lo, hi = p.step_range
    budget = min(max(p.budget_epochs * per_epoch, lo), hi)
    if budget >= WHOLE_PASSES * per_epoch:
        return -(-budget // per_epoch) * per_epoch
    return budget
