"""The in-memory dataset every source returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
