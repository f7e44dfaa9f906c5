"""Batched inference of an autoencoder over uint8 images."""

from __future__ import annotations

import numpy as np
import torch


def encode_array(model: torch.nn.Module, pixels: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                 every: int = 1, first: int = 0) -> tuple[np.ndarray, float, int]:
    """Codes of uint8 images, with a sampled reconstruction error.

    Parameters
    ----------
    model:
        An ``Autoencoder`` (``encode``: (B, C, H, W) in [0, 1] -> (B, D); ``decode``: back).
    pixels:
        uint8 (N, C, H, W).
    every, first:
        The reconstruction MSE is summed over the rows whose index ``first + i`` is a multiple of
        ``every`` (decoding doubles the cost, so large encodes measure it on a sample); a model
        without a decoder (``has_decoder`` False) counts none.

    Returns
    -------
    codes (N, D) float32, the summed per-image MSE of the sampled rows, and their count.
    """
    codes, sq, counted = [], 0.0, 0
    decodes = getattr(model, "has_decoder", True)
    with torch.inference_mode():
        for s in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.array(pixels[s:s + batch_size])).to(device).float().div_(255.0)
            z = model.encode(x)
            rows = np.flatnonzero((first + s + np.arange(len(x))) % every == 0)
            if len(rows) and decodes:
                xs, zs = (x, z) if len(rows) == len(x) else (x[rows], z[rows])
                sq += float(((model.decode(zs) - xs) ** 2).mean(dim=(1, 2, 3)).sum())
                counted += len(rows)
            codes.append(z.float().cpu().numpy())
    return (np.concatenate(codes) if codes else np.zeros((0, 0), np.float32)), sq, counted
