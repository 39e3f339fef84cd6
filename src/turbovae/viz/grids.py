"""Image grids (Pillow): samples, reconstructions, interpolations and latent traversals as pictures."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..files import replace_file

GRID_BACKGROUND = 64  # the grey between grid cells


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
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), GRID_BACKGROUND, dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = pixels[i]
    return out[..., 0] if c == 1 else out


MIN_CELL = 28  # pixels: the smallest side an image of a grid is scaled up to


def grid_image(images: torch.Tensor, nrow: int, min_side: int = 256, min_cell: int = MIN_CELL) -> Image.Image:
    """A grid as a Pillow image, upscaled with nearest-neighbour so that small images stay readable:
    the whole grid to at least ``min_side`` pixels, every image to at least ``min_cell``.

    Strips (images one pixel high, from vector data) are stretched to at least 8 pixels high."""
    array = grid(images, nrow)
    picture = Image.fromarray(array)
    cell = max(images.shape[2], images.shape[3])
    scale = max(1, math.ceil(min_side / max(array.shape[0], array.shape[1])), math.ceil(min_cell / cell))
    height_scale = max(scale, 8) if images.shape[2] == 1 else scale
    if scale > 1 or height_scale > 1:
        size = (array.shape[1] * scale, array.shape[0] * height_scale)
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return picture


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, min_side: int = 256) -> None:
    """Write a PNG grid, upscaled with nearest-neighbour so that small images stay readable."""
    save_png(grid_image(images, nrow, min_side), path)


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG atomically: a full disk leaves the previous file, never a truncated one."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    replace_file(Path(path), buffer.getbuffer())


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_rows(picture: Image.Image, labels: Sequence[str], width: int = 120) -> Image.Image:
    """Add a white margin on the left with one label centred on each of ``len(labels)`` equal rows."""
    rows = len(labels)
    out = Image.new("RGB", (picture.width + width, picture.height), "white")
    out.paste(picture.convert("RGB"), (width, 0))
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(16, picture.height // max(rows, 1) // 3)))
    for i, text in enumerate(labels):
        y = (i + 0.5) * picture.height / rows
        draw.text((width - 8, y), text, fill=(40, 40, 40), font=font, anchor="rm")
    return out


def class_label(vae: Any, class_id: int) -> str:
    """How a grid names class ``class_id`` of a conditional run: its name (``3: dress``), cut short."""
    names = (getattr(vae, "condition", None) or {}).get("names") or []
    name = str(names[class_id]) if 0 <= class_id < len(names) else str(class_id)
    text = name if name == str(class_id) else f"{class_id}: {name}"
    return text if len(text) <= 16 else text[:15] + "…"


def labelled_grid(images: torch.Tensor, nrow: int, labels: Sequence[str], min_side: int = 256) -> Image.Image:
    """A grid whose rows are named on the left (a conditional run's classes), one label per row."""
    return label_rows(grid_image(images, nrow, min_side), labels, width=110)


def save_class_grid(vae: Any, images: torch.Tensor, classes: Sequence[int], path: Path, nrow: int) -> None:
    """Write a grid of a conditional run's samples, ``classes`` the class of each image, every row named
    by the class of its first image."""
    rows = math.ceil(len(images) / nrow)
    labels = [class_label(vae, int(classes[r * nrow])) for r in range(rows)]
    save_png(labelled_grid(images, nrow, labels), path)


@torch.no_grad()
def sample_grid(vae: Any, n: int = 64, seed: int = 7) -> torch.Tensor:
    """n samples from the prior, shown as E[x | z]: (n, C, H, W) in [0, 1]."""
    device = next(vae.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    return as_images(vae.sample(n, generator=g), vae.event_shape)


@torch.no_grad()
def class_sample_grid(vae: Any, per_class: int = 8, seed: int = 7, classes: int = 16) -> torch.Tensor:
    """A conditional VAE's samples E[x | z, y], ``per_class`` of each of its first ``classes`` classes
    in class order (one grid row per class with nrow = per_class): (K · per_class, C, H, W)."""
    device = next(vae.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.arange(min(vae.n_classes, classes), device=device).repeat_interleave(per_class)
    return as_images(vae.sample(len(y), generator=g, condition=y), vae.event_shape)


@torch.no_grad()
def reconstruction_grid(vae: Any, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs (first row) above their reconstructions E[x | z = mean of q(z | x)] (second row);
    a conditional VAE's with the inputs' classes ``condition``."""
    return torch.cat(
        [as_images(x, vae.event_shape), as_images(vae.reconstruct(x, condition), vae.event_shape)]
    )


def reconstruction_picture(
    vae: Any, x: torch.Tensor, grey: torch.Tensor | None = None, condition: torch.Tensor | None = None
) -> Image.Image:
    """Inputs above their reconstructions as one labelled picture; with ``grey`` (the inputs before
    binarisation, scaled to [0, 1]) three rows: the user's input, the binarised draw the model saw,
    the reconstruction (a conditional VAE's with the inputs' classes ``condition``)."""
    rows = [as_images(x, vae.event_shape), as_images(vae.reconstruct(x, condition), vae.event_shape)]
    labels = ["binarised" if grey is not None else "input", "reconstruction"]
    if grey is not None:
        rows.insert(0, as_images(grey, vae.event_shape))
        labels.insert(0, "input")
    picture = grid_image(torch.cat(rows), nrow=len(x))
    return label_rows(picture, labels, width=110)


@torch.no_grad()
def interpolation_grid(
    vae: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8, condition: tuple[Any, Any] | None = None
) -> torch.Tensor:
    """One row per pair: x_a, the decoded points on the line between the posterior means of x_a and
    x_b (``steps`` of them, ends included), then x_b. Shape (pairs · (steps + 2), C, H, W).
    A conditional VAE: ``condition`` = the classes (P,) of x_a and of x_b; the path is decoded with
    x_a's."""
    ya, yb = condition if condition is not None else (None, None)
    za, zb = vae.encode(x_a, ya).mean, vae.encode(x_b, yb).mean  # (P, L)
    t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
    path = za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t  # (P, steps, L)
    path_y = None if ya is None else ya.repeat_interleave(steps)
    decoded = as_images(vae.decode(path.flatten(0, 1), path_y), vae.event_shape).unflatten(
        0, (len(za), steps)
    )
    ends_a = as_images(x_a, vae.event_shape).unsqueeze(1)
    ends_b = as_images(x_b, vae.event_shape).unsqueeze(1)
    # the decoded strips are min-max scaled on their own for vector data; inputs likewise
    return torch.cat([ends_a, decoded, ends_b], dim=1).flatten(0, 1)


@torch.no_grad()
def traversal_grid(
    vae: Any, base: torch.Tensor, dims: Sequence[int], values: Sequence[float], condition: Any = None
) -> torch.Tensor:
    """One row per latent dimension in ``dims``: ``base`` (L,) with that coordinate set to each of
    ``values``, decoded (a conditional VAE's with the class ``condition``). Shape
    (len(dims) · len(values), C, H, W)."""
    v = torch.tensor(list(values), device=base.device, dtype=base.dtype)
    z = base.repeat(len(dims), len(v), 1)  # (D, V, L)
    for row, d in enumerate(dims):
        z[row, :, d] = v
    return as_images(vae.decode(z.flatten(0, 1), condition), vae.event_shape)
