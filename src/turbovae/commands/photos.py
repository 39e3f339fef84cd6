"""Photos of any size for ``turbovae compress``/``decompress``: tiles of the run's image size.

An image (a file, or every file of a folder) is cut into tiles of the model's (h, w), row by row, the
edge tiles padded with copies of the last row and column (cheap to code, and cropped away when the
image is put back); its size, mode and name are stored, so decompressing gives back the same pixels
in the same kind of file. The tiles are read a file at a time as the coder asks for them
(``TileSource``), and written a file at a time as the decoder finishes them (``TileSink``, which
receives the last tiles first): a folder bigger than memory streams through.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import compression
from ..errors import DataError
from ..files import atomic_write

# the formats an image may have: each is written back in its own format under its own name, pixel for
# pixel (JPEG, GIF and WebP are refused: a JPEG cannot be written back with the same pixels)
LOSSLESS_FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_SUFFIXES = (*LOSSLESS_FORMATS, ".jpg", ".jpeg", ".gif", ".webp")
MODE_NAMES = {"L": "8-bit grey", "RGB": "8-bit RGB", "1": "1-bit", "RGBA": "RGBA (colour + alpha)",
              "LA": "grey + alpha", "P": "palette", "I;16": "16-bit grey", "I": "32-bit integer",
              "F": "32-bit float", "CMYK": "CMYK"}  # fmt: skip
MAX_PIXELS = 2**28  # one image's pixels at most (Pillow's decompression-bomb guard is 89 M)


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def tiles_of(size: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of tiles covering an image of (H, W)."""
    return -(-size[0] // tile[0]), -(-size[1] // tile[1])


def _open(path: Path) -> Any:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # past Pillow's 89 M pixels
        return Image.open(path)


def probe(path: Path, channels: int) -> tuple[tuple[int, int], str]:
    """((H, W), mode) of an image file from its header, refusing, before any pixel is decoded, an image
    the codec could not give back exactly."""
    from PIL import Image

    from ..data.images import _check_bit_depth

    if path.suffix.lower() not in LOSSLESS_FORMATS:
        raise DataError(
            f"{path}: a {path.suffix.lower()[1:].upper()} image cannot be given back exactly (decompress "
            f"writes {', '.join(sorted(set(LOSSLESS_FORMATS.values())))}); convert it to PNG"
        )
    _check_bit_depth(path)  # a 16-bit PNG: Pillow would read 16-bit colour as 8 bits
    want = "L" if channels == 1 else "RGB"
    try:
        with _open(path) as im:
            mode, size, frames = im.mode, im.size, getattr(im, "n_frames", 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # fmt: skip
        raise DataError(f"{path}: not a readable image ({e})") from None
    if mode != want and not (want == "L" and mode == "1"):
        raise DataError(
            f"{path}: a {MODE_NAMES.get(mode, mode)} image, but this run codes {MODE_NAMES[want]} images: "
            "the codec is lossless and would lose what the run does not model; convert it, or compress it "
            "with a run trained on such images"
        )
    if frames > 1:
        raise DataError(f"{path}: holds {frames} frames; the codec takes one image a file")
    return (size[1], size[0]), mode


def read_pixels(path: Path) -> np.ndarray:
    """(C, H, W) uint8 pixels of a file ``probe`` accepted (a 1-bit image as 0/255 grey)."""
    from PIL import Image

    try:
        with _open(path) as im:
            pixels = np.asarray(im.convert("L") if im.mode == "1" else im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_tiles(pixels: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """(C, H, W) → (rows · columns, C, h, w), row by row, the edge tiles padded with the edge's pixels."""
    c, height, width = pixels.shape
    rows, cols = tiles_of((height, width), tile)
    padded = np.pad(pixels, ((0, 0), (0, rows * tile[0] - height), (0, cols * tile[1] - width)), mode="edge")
    grid = padded.reshape(c, rows, tile[0], cols, tile[1]).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid.reshape(rows * cols, c, *tile))


def from_tiles(tiles: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Tiles (rows · columns, C, h, w) → the image (C, H, W), cropped to ``size``."""
    _, c, h, w = tiles.shape
    rows, cols = tiles_of(size, (h, w))
    image = tiles.reshape(rows, cols, c, h, w).transpose(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
    return image[:, : size[0], : size[1]]


class TileSource:
    """The tiles of image files of any size as one sequence: ``len`` tiles of the run's (C, h, w),
    ``source[a:b]`` a uint8 tensor (b − a, C, h, w) of symbols, read a file at a time."""

    def __init__(self, files: list[Path], event: tuple[int, ...], binary: bool) -> None:
        self.files, self.tile, self.binary = files, (event[1], event[2]), binary
        probed = [probe(path, event[0]) for path in files]
        self.sizes = [size for size, _ in probed]
        self.modes = [mode for _, mode in probed]
        counts = [math.prod(tiles_of(size, self.tile)) for size in self.sizes]
        self.starts = [0, *np.cumsum(counts).tolist()]
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def _tiles(self, f: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != f:
            pixels = read_pixels(self.files[f])
            if self.binary:
                if not np.isin(pixels, (0, 255)).all():
                    raise DataError(f"{self.files[f]}: this run codes binary images (black and white, 0/255)")
                pixels = pixels // 255
            self._cached = (f, to_tiles(pixels, self.tile))
        return self._cached[1]

    def __getitem__(self, part: slice) -> torch.Tensor:
        out, i = [], part.start
        while i < part.stop:
            f = bisect.bisect_right(self.starts, i) - 1
            end = min(part.stop, self.starts[f + 1])
            out.append(self._tiles(f)[i - self.starts[f] : end - self.starts[f]])
            i = end
        return torch.from_numpy(np.concatenate(out))

    def meta(self, root: Path | None) -> dict[str, Any]:
        names = [p.relative_to(root).as_posix() if root else p.name for p in self.files]
        meta: dict[str, Any] = {"source": "folder" if root else "image", "names": names,
                                "sizes": [list(s) for s in self.sizes]}  # fmt: skip
        if any(m == "1" for m in self.modes):
            meta["modes"] = self.modes
        if self.binary:
            meta["scale"] = 255  # written back as black and white
        return meta


def check_layout(info: dict[str, Any]) -> None:
    """The tiles the file's image sizes need add up to its count (sizes checked before allocating)."""
    sizes, names = info.get("sizes"), info.get("names")
    tile = info["event_shape"][-2:]
    if not (
        isinstance(sizes, list)
        and isinstance(names, list)
        and len(sizes) == len(names)
        and all(isinstance(s, list) and len(s) == 2 for s in sizes)
        and all(type(d) is int and d > 0 for s in sizes for d in s)
        and all(s[0] * s[1] <= MAX_PIXELS for s in sizes)
    ):
        raise compression.CompressionError("compressed file is corrupt: its image sizes are not one a name")
    if len(tile) != 2 or sum(math.prod(tiles_of(tuple(s), tuple(tile))) for s in sizes) != info["count"]:
        raise compression.CompressionError("compressed file is corrupt: its image sizes miss its tiles")


class TileSink:
    """Puts decoded tiles (the last first) back into images and writes each as soon as it is complete,
    into a folder staged beside ``out`` (or the one file ``out``), moved into place by ``finish``."""

    def __init__(self, info: dict[str, Any], out: Path, targets: list[Path]) -> None:
        self.info, self.out, self.targets = info, out, targets
        self.tile = tuple(info["event_shape"][-2:])
        self.sizes = [tuple(s) for s in info["sizes"]]
        counts = [math.prod(tiles_of(s, self.tile)) for s in self.sizes]
        self.starts = [0, *np.cumsum(counts).tolist()]
        self.modes = info.get("modes") or [None] * len(self.sizes)
        self.pending: dict[int, tuple[np.ndarray, int]] = {}
        self.stage = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.written: list[tuple[Path, Path]] = []

    def __call__(self, start: int, images: torch.Tensor) -> None:
        x = images.numpy()
        if self.info.get("values") == "binary":
            x = x * np.uint8(255)
        i, stop = start, start + len(x)
        while i < stop:
            f = bisect.bisect_right(self.starts, i) - 1
            end = min(stop, self.starts[f + 1])
            count = self.starts[f + 1] - self.starts[f]
            buf, filled = self.pending.get(f) or (np.empty((count, *x.shape[1:]), np.uint8), 0)
            buf[i - self.starts[f] : end - self.starts[f]] = x[i - start : end - start]
            filled += end - i
            if filled == count:
                self.pending.pop(f, None)
                self._write(f, from_tiles(buf, self.sizes[f]))
            else:
                self.pending[f] = (buf, filled)
            i = end

    def _write(self, f: int, image: np.ndarray) -> None:
        from PIL import Image

        target = self.targets[f]
        staged = self.stage / f"{f}{target.suffix}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.ascontiguousarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        picture = Image.fromarray(pixels > 127) if self.modes[f] == "1" else Image.fromarray(pixels)
        buf = io.BytesIO()
        picture.save(buf, format=LOSSLESS_FORMATS[target.suffix.lower()])
        atomic_write(staged, buf.getvalue())
        self.written.append((staged, target))

    def finish(self) -> None:
        """Move every written image to its name (all decoded and checked by then)."""
        if self.pending:
            raise compression.CompressionError("compressed file is corrupt: an image was not completed")
        for staged, target in self.written:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
