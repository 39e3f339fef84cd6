"""Pictures a run leaves: image grids of samples and reconstructions, written with Pillow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def as_images(x: torch.Tensor, event_shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *event_shape) values → (N, C, H, W) in [0, 1] for display.

    Vectors whose length is a square are shown as square images (flattened pictures); other vectors
    as one-pixel-high strips, min-max scaled over the batch.
    """
    x = x.detach().float().cpu()
    if len(event_shape) == 3:
        return x.clamp(0, 1)
    dims = math.prod(event_shape)
    x = x.reshape(len(x), dims)
    side = math.isqrt(dims)
    if side * side == dims and float(x.min()) >= 0 and float(x.max()) <= 1:
        return x.reshape(len(x), 1, side, side)
    low, high = x.min(), x.max()
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return x.reshape(len(x), 1, 1, dims)


def grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → one uint8 array (rows of ``nrow`` images), with a 1-pixel border."""
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 64, dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = pixels[i]
    return out[..., 0] if c == 1 else out


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, min_side: int = 256) -> None:
    """Write a PNG grid, upscaled with nearest-neighbour so that small images stay readable."""
    array = grid(images, nrow)
    picture = Image.fromarray(array)
    scale = max(1, math.ceil(min_side / max(array.shape[0], array.shape[1])))
    if scale > 1:
        picture = picture.resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    picture.save(path, format="PNG")
