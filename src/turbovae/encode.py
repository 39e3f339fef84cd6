"""``turbovae encode``: posterior means (and standard deviations) of new inputs under a trained run.

Text runs read a UTF-8 file and encode every line (one row per line, in order; a blank line is the
empty sentence) with the run's saved tokeniser. Image and vector runs read a ``.npy`` file (one
array), a ``.npz`` file (its ``x`` array, or its only array) or a folder of PNG/JPEG images (rows in
the order of the sorted file paths). Integer arrays are divided by the run's ``max_value`` (as in
training), float arrays are taken as already in [0, 1], image files are bytes divided by 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import evaluate
from .config import parse_resize
from .data.arrays import _read, split_indices, to_channels_first
from .data.images import load_image_folder
from .data.text import Tokenizer, read_lines, trim, warn
from .errors import DataError
from .vae import VAE


def _text_input(vae: VAE, path: Path) -> torch.Tensor:
    tok = Tokenizer.from_meta(vae.data_meta)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; this run is a text model, expected a UTF-8 text file")
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: no lines to encode (the file is empty)")
    ids, cut = tok.encode_lines(lines)
    if cut:
        warn(f"{path}: {cut} line(s) longer than the run's max_length = {tok.max_length} tokens were cut")
    return torch.from_numpy(ids)


def _array_input(vae: VAE, path: Path) -> torch.Tensor:
    arrays = _read(path)
    if len(arrays) == 1:
        (x,) = arrays.values()
    elif "x" in arrays:
        x = arrays["x"]
    else:
        raise DataError(
            f"{path}: holds arrays {', '.join(sorted(arrays))}; expected one array, or one named x"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.ndim < 2:
        raise DataError(f"{path}: has shape {x.shape} and dtype {x.dtype}, expected numeric (N, ...) data")
    if x.ndim > 2:
        x = to_channels_first(x, str(path))
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: contains NaN or Inf values")
        return torch.from_numpy(x.astype(np.float32))
    return torch.from_numpy(x.astype(np.float32) / vae.max_value)


def _folder_input(vae: VAE, path: Path) -> torch.Tensor:
    resize = parse_resize(vae.config.data.resize) if vae.config is not None else None
    ds = load_image_folder(path, resize=resize, test_fraction=0.5, split_seed=0)
    x = torch.cat([ds.x_train, ds.x_test])
    if not ((path / "train").is_dir() and (path / "test").is_dir()):  # undo the split: sorted file order
        train_idx, test_idx = split_indices(len(x), 0.5, 0)
        x = torch.empty_like(x)
        x[torch.from_numpy(train_idx)], x[torch.from_numpy(test_idx)] = ds.x_train, ds.x_test
    return x.float() / 255.0


def read_input(vae: VAE, path: str | Path) -> torch.Tensor:
    """The inputs in ``path`` as the run's model takes them: token ids (N, T) or floats (N, *event)."""
    path = Path(path)
    if vae.data_meta.get("text"):
        return _text_input(vae, path)
    if path.is_dir():
        x = _folder_input(vae, path)
    elif path.suffix.lower() in (".npy", ".npz"):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        x = _array_input(vae, path)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file or a folder of PNG/JPEG images")
    if tuple(x.shape[1:]) != tuple(vae.event_shape):
        if x[0].numel() == int(np.prod(vae.event_shape)):
            return x.reshape(len(x), *vae.event_shape)
        raise DataError(
            f"{path}: inputs of shape {tuple(x.shape[1:])}, "
            f"but the run's model takes {tuple(vae.event_shape)}"
        )
    return x


@torch.no_grad()
def encode(vae: VAE, x: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means, posterior standard deviations), each (N, latent) float32, for inputs ``x``."""
    device = next(vae.parameters()).device
    prepare = trim if x.dtype == torch.int64 else (lambda raw: raw)
    q = evaluate.encode_all(vae, x.to(device), prepare, batch_size=batch_size)
    return q.mean.cpu().numpy(), q.stddev.cpu().numpy()
