"""Everything hardware-aware: device choice, threads, seeds, precision. Model code never mentions
devices or dtypes; the loop asks this module."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator

import numpy as np
import torch

from .errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU. Asking for an absent GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is '{name}' but no CUDA GPU is available; use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is '{name}' but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def configure(device: torch.device, threads: int = 0) -> None:
    """Per-process settings: CPU threads, TF32 matmuls and cuDNN autotuning on GPUs."""
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # shapes are fixed: batches are equal-sized slices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: the loop owns its randomness explicitly."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Reduced-precision matmuls inside the network; likelihood sums and the KL stay fp32 (they cast)."""
    if precision == "fp32":
        yield
        return
    if precision != "bf16":
        raise ConfigError(f"train.precision must be fp32 or bf16, got {precision!r}")
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} logical cores)"


_IMPORT_TIME = time.time()


def process_seconds() -> float:
    """Wall seconds since this process started (read from /proc on Linux; since import elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORT_TIME
