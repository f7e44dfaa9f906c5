"""Named recipes: the write-ups' models reproduced faithfully, and the product's own default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Preset:
    """What a preset fixes: architecture, training and the clustering that follows.

    ``embedding`` is what the codes go through before K-means: ``none`` (standardised codes, as
    the write-ups did) or ``umap`` (a low-dimensional manifold of the codes, the N2D recipe).
    """

    name: str
    architecture: str
    image_size: tuple[int, int]
    epochs: int
    learning_rate: float
    loss: Literal["bce", "mse"]
    embedding: Literal["none", "umap"]
    augment: bool
    code_dim: int | None
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="default",
            architecture="conv-dense",
            image_size=(32, 32),
            epochs=30,
            learning_rate=1e-3,
            loss="mse",
            embedding="umap",
            augment=True,
            code_dim=32,
            description="Conv 32-64-128 (stride 2, BatchNorm) -> dense 32-d code, trained with small "
            "random shifts; codes -> UMAP (10-d) -> K-means.",
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
            code_dim=None,
            description="Same three blocks on 152x152 face crops (19x19x8 code); K-means (k=25).",
        ),
    ]
}
