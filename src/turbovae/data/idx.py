"""IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes; only unsigned bytes occur in the datasets we ship loaders for.
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes.

    Args:
        path: An IDX file, gzip-compressed (detected by its magic bytes, not its name) or raw.

    Returns:
        A writable ``uint8`` array with the shape stored in the header.

    Raises:
        DataError: The file is unreadable, not gzip/IDX, has an unsupported type, or its size does
            not match its header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e

    if len(data) < 4:
        raise DataError(f"{path}: file is {len(data)} bytes, expected at least a 4-byte IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: bad IDX magic {data[:4].hex()}, expected 0000 followed by type and rank")
    type_code, ndim = data[2], data[3]
    if type_code != 0x08:
        found = _TYPE_NAMES.get(type_code, "unknown")
        raise DataError(
            f"{path}: IDX type byte 0x{type_code:02x} ({found}) is not supported, expected 0x08 (uint8)"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions, expected at least 1")

    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: IDX header is truncated: {len(data)} bytes, expected {header_size}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # Python ints, so the product cannot overflow, and the check runs before any allocation.
    expected = header_size + math.prod(shape)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX data {problem}: {len(data)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file and its label file.

    Args:
        images_path: IDX file of shape (N, H, W).
        labels_path: IDX file of shape (N,).

    Returns:
        Images as ``uint8`` (N, 1, H, W) and labels as ``int64`` (N,).

    Raises:
        DataError: Either file is invalid or their shapes do not fit together.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: images have shape {images.shape}, expected (N, H, W)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: labels have shape {labels.shape}, expected ({images.shape[0]},) "
            f"to match {Path(images_path).name}"
        )
    return images[:, None], labels.astype(np.int64)
