"""The in-memory dataset every source returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError


@dataclass
class Dataset:
    """Train and test splits, in memory or memory-mapped from a ``.npy`` file (``mapped``).

    Bytes stay bytes: 8-bit sources keep ``uint8`` tensors and are converted to float per batch
    (``x / max_value`` maps them to [0, 1]). Float sources are ``float32`` with ``max_value = 1``.
    """

    name: str
    x_train: torch.Tensor  # (N, *event_shape) uint8 or float32, CPU
    x_test: torch.Tensor  # (M, *event_shape)
    y_train: torch.Tensor | None = None  # (N,) int64 labels, when the source has them
    y_test: torch.Tensor | None = None
    max_value: float = 1.0
    # JSON-serialisable facts a source hands to the model and to later commands (the kind of data, in
    # "kind", see kinds/; a table's schema and fitted transforms, a tokenizer's vocabulary): saved in every
    # checkpoint, given to build_vae.
    meta: dict[str, Any] = field(default_factory=dict)
    # x_train and x_test are views of a memory-mapped ``.npy`` file (see ``data/arrays.py``): not in
    # memory, gathered per batch; set-up keeps them on the host and never copies them whole
    mapped: bool = False

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        """Images are stored channels-first: (C, H, W)."""
        return self.x_train.dim() == 4

    @property
    def is_bytes(self) -> bool:
        return self.x_train.dtype == torch.uint8


# a text or CSV file is held in memory several times over while it is parsed (bytes, str, lines or
# fields, the arrays): refuse one whose parse cannot fit before reading it
TEXT_MEMORY_FACTOR = 12
_SNIFF = 65536


def available_memory() -> int | None:
    """MemAvailable in bytes, or less under a cgroup's limit (None: unknown)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError, IndexError):
        pass
    return free


def check_text_file(path: Path, what: str) -> None:
    """Refuse, before it is read, a file that is not text (a NUL byte in its first 64 KiB: 2 GB of NULs
    was a MemoryError) or too large to parse in the memory available."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SNIFF)
    except OSError:
        return  # the reader says why it cannot be read
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: not a {what} file (a NUL byte at offset {nul}: a binary file?)")
    free = available_memory()
    if free is not None and size * TEXT_MEMORY_FACTOR > free:
        raise DataError(
            f"{path}: {size / 2**30:,.1f} GiB of {what} need about "
            f"{size * TEXT_MEMORY_FACTOR / 2**30:,.0f} GiB of memory to parse, but "
            f"{free / 2**30:,.1f} GiB are available; use a smaller file"
        )
