"""Barcodes: the pictures of data that are not images. Every example is one row of coloured cells:

- table rows (the transformed vectors a table run trains on, ``data/table_transform.py``): one cell per
  dimension on a fixed diverging scale, blue −1, white 0, red +1 (normalised values lie mostly in
  [−1, 1]; a one-hot block is a red cell among white ones, a decoded mean a pink spread), so that
  samples, inputs and reconstructions are drawn on the same scale;
- token ids (text runs): one cell per position, a colour per token (the same token, the same colour
  in every picture), padding near-white, the end marker black, unknown tokens grey.

Rows come in groups (an input and its reconstruction) separated by a wider gap, labelled on the left.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .grids import _font

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # as in data/text.py
CELL_HEIGHT = 14  # pixels per row
MAX_WIDTH = 960  # pixels of cells (a row of many dimensions gets narrow cells)


def value_colours(x: np.ndarray) -> np.ndarray:
    """(N, D) values → (N, D, 3) uint8 on the diverging scale: −1 blue, 0 white, +1 red (clipped)."""
    v = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), -1.0, 1.0)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    red, blue = np.array([200.0, 30.0, 40.0]), np.array([40.0, 80.0, 190.0])
    out = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return (out + 0.5).astype(np.uint8)


def token_colours(ids: np.ndarray) -> np.ndarray:
    """(N, T) token ids → (N, T, 3) uint8: a fixed colour per token, golden-ratio hues."""
    ids = np.asarray(ids, dtype=np.int64)
    hues = (ids * 0.6180339887) % 1.0
    palette = np.array([colorsys.hsv_to_rgb(h, 0.55, 0.9) for h in hues.ravel()]).reshape(*ids.shape, 3)
    out = palette * 255.0
    out[ids == PAD] = (245, 245, 245)
    out[ids == EOS] = (30, 30, 30)
    out[ids == UNK] = (150, 150, 150)
    out[ids == BOS] = (90, 90, 90)
    return (out + 0.5).astype(np.uint8)


def used_length(ids: np.ndarray) -> int:
    """Positions up to the last non-padding token of any row (at least 1)."""
    nonpad = np.flatnonzero((np.asarray(ids) != PAD).any(0))
    return int(nonpad[-1]) + 1 if len(nonpad) else 1


@dataclass(frozen=True)
class Palette:
    """How a barcode colours its rows: ``colours`` (N, D) → (N, D, 3) uint8; ``cut``: the rows are token
    ids padded with PAD on the right, and the picture ends after the last position any row uses."""

    colours: Callable[[np.ndarray], np.ndarray]
    cut: bool = False


# the palettes a data kind draws its barcodes with (``DataKind.barcode``)
PALETTES: dict[str, Palette] = {
    "values": Palette(value_colours),
    "tokens": Palette(lambda a: token_colours(a.astype(np.int64)), cut=True),
}


def colours_of(x: torch.Tensor | np.ndarray, palette: str) -> np.ndarray:
    """The colours of rows ``x`` (N, D) in the palette ``palette`` (cut after the last position used)."""
    array = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    array = array.reshape(len(array), -1)
    colours = PALETTES[palette].colours(array)
    return colours[:, : used_length(array)] if PALETTES[palette].cut else colours


def barcode(
    colours: np.ndarray,
    *,
    group: int = 1,
    labels: Sequence[str] | None = None,
    label_width: int | None = None,
    cell_width: int | None = None,
) -> Image.Image:
    """(R, D, 3) uint8 row colours as a picture: rows of ``CELL_HEIGHT`` pixels, a wider gap after every
    ``group`` rows, and ``labels`` (one per row, or one per group) on a white margin on the left."""
    rows, dims = colours.shape[:2]
    width = cell_width or max(2, min(24, MAX_WIDTH // max(dims, 1)))
    gap, group_gap = 1, 6
    n_groups = -(-rows // group)
    height = rows * CELL_HEIGHT + (rows - n_groups) * gap + (n_groups + 1) * group_gap
    label_list = list(labels or [])
    font = _font(11)
    margin = 0
    if label_list:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = label_width or 12 + max(int(measure.textlength(text, font=font)) for text in label_list)
    picture = Image.new("RGB", (margin + dims * width + 2 * group_gap, height), "white")
    cells = np.repeat(np.repeat(colours, CELL_HEIGHT, axis=0), width, axis=1)  # (R·h, D·w, 3)
    draw = ImageDraw.Draw(picture)
    y = group_gap
    per_row = len(label_list) == rows
    for r in range(rows):
        block = cells[r * CELL_HEIGHT : (r + 1) * CELL_HEIGHT]
        picture.paste(Image.fromarray(block), (margin + group_gap, y))
        text = label_list[r] if per_row else (label_list[r // group] if r % group == 0 and label_list else "")
        if text:
            draw.text((margin - 6, y + CELL_HEIGHT / 2), text, fill=(40, 40, 40), font=font, anchor="rm")
        y += CELL_HEIGHT + (group_gap if (r + 1) % group == 0 else gap)
    return picture


def same_width(*rows: torch.Tensor) -> list[torch.Tensor]:
    """Rows (N, D) flattened and padded with 0 (text: ``PAD``) on the right to the widest one's D."""
    flat = [r.detach().reshape(len(r), -1) for r in rows]
    width = max(r.shape[1] for r in flat)
    return [torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in flat]


def sample_barcode(samples: torch.Tensor | np.ndarray, palette: str) -> Image.Image:
    """Prior samples, one row each (token ids: cut after the longest line)."""
    return barcode(colours_of(samples, palette))


def reconstruction_barcode(
    x: torch.Tensor, recon: torch.Tensor, palette: str, grey: torch.Tensor | None = None
) -> Image.Image:
    """Every input above its reconstruction (with ``grey``, the values before binarisation first)."""
    parts = same_width(*([grey] if grey is not None else []), x, recon)
    names = ["input", "binarised"] if grey is not None else ["input"]
    names.append("reconstruction")
    # (N, parts, D, 3): the parts coloured together, so that they are cut at the same position
    colours = colours_of(torch.cat(parts), palette).reshape(len(parts), len(x), -1, 3).transpose(1, 0, 2, 3)
    n, k = colours.shape[:2]
    labels = [f"{name} {i + 1}" if j == 0 else name for i in range(n) for j, name in enumerate(names)]
    return barcode(colours.reshape(n * k, *colours.shape[2:]), group=k, labels=labels)


def save(picture: Image.Image, path: Path) -> Path:
    picture.save(path, format="PNG")
    return path
