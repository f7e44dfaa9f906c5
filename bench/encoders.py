"""Images per second of the encoders `--encoder` can use, as the workers run them (frozen, batched).

    python bench/encoders.py                       # resnet18, resnet50 at 224 and 112; the default's encoder
    python bench/encoders.py --threads 1 --images 128

Random weights (the speed does not depend on them) and random pixels; one process, ``--threads``
torch threads. Prints a table to paste into bench/RESULTS.md with the command and commit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from imgclust.models.autoencoders import build_model
from imgclust.models.encoding import encode_array
from imgclust.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, FeatureEncoder
from imgclust.models.resnet import resnet


def rate(model: torch.nn.Module, pixels: np.ndarray, batch: int) -> float:
    encode_array(model, pixels[:batch], batch, every=10**9)  # warm-up; one image decoded, as a large encode
    t0 = time.perf_counter()
    encode_array(model, pixels, batch, every=10**9)
    return len(pixels) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=192)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name in ("resnet18", "resnet50"):
        for side in (224, 112):
            spec = {"kind": "resnet", "name": name, "channels": 3, "image_size": [side, side],
                    "input_size": [side, side], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "code_dim": 1}
            model = FeatureEncoder(resnet(name), spec).eval()
            pixels = rng.integers(0, 256, (a.images, 3, side, side), dtype=np.uint8)
            rows.append((f"{name} (frozen)", side, rate(model, pixels, 64)))
    default = build_model({"architecture": "conv-contrastive", "channels": 3, "image_size": [32, 32],
                           "code_dim": 128}).eval()
    pixels = rng.integers(0, 256, (a.images * 20, 3, 32, 32), dtype=np.uint8)
    rows.append(("default preset's encoder (trained)", 32, rate(default, pixels, 256)))
    print(f"Command: `python bench/encoders.py --threads {a.threads} --images {a.images}`\n")
    print("| encoder | input side | images / s |")
    print("|---|---|---|")
    for name, side, r in rows:
        print(f"| {name} | {side} | {r:,.1f} |")


if __name__ == "__main__":
    main()
