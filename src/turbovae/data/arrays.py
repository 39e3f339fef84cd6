"""Datasets stored as NumPy arrays: ``.npz`` archives or a single ``.npy`` file."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from . import mapwatch
from .dataset import Dataset

_CHANNELS = (1, 3, 4)
# Names that belong to a multi-array layout: alone, one of them means the others are missing.
_LAYOUT_KEYS = {"x_train", "x_test", "y_train", "y_test", "train", "test", "y"}
_LAYOUTS = "x_train + x_test (y_train, y_test optional), train + test, x (y optional), or a single array"
# What a damaged or hostile file can make np.load raise; all of them mean "this file is not usable".
_LOAD_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    MemoryError,
)


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of ``range(n)``.

    Args:
        n: Number of examples (at least 2).
        test_fraction: Fraction held out for test, rounded, and at least one example on each side.
        seed: Seed of the permutation; the same (n, fraction, seed) always gives the same split.

    Returns:
        Sorted train indices and sorted test indices, disjoint and covering ``range(n)``.
    """
    n_test = _test_size(n, test_fraction)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _test_size(n: int, test_fraction: float) -> int:
    if n < 2:
        raise DataError(f"cannot split {n} example(s) into train and test, expected at least 2")
    return min(max(round(n * test_fraction), 1), n - 1)


def to_channels_first(x: np.ndarray, where: str) -> np.ndarray:
    """Bring an array to (N, D) or (N, C, H, W), the layouts a ``Dataset`` holds.

    (N, H, W) gains a channel axis; (N, H, W, C) and (N, C, H, W) with C in {1, 3, 4} become
    channels-first. When both ends could be channels (e.g. (N, 3, 4, 4)) the smaller is taken.
    """
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        first, last = x.shape[1], x.shape[3]
        if last in _CHANNELS and (first not in _CHANNELS or last < first):
            return x.transpose(0, 3, 1, 2)
        if first in _CHANNELS:
            return x
    raise DataError(
        f"{where} has shape {x.shape}, expected (N, D), (N, H, W), (N, H, W, C) or (N, C, H, W) "
        "with C in 1, 3, 4"
    )


def to_stored_dtype(x: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """Convert to the dtype a ``Dataset`` stores, returning the array and its ``max_value``.

    Bytes stay bytes (uint8, max 255); bool becomes uint8 with max 1; integers that fit in 0..255
    become uint8; floats become float32 with max 1 and must be finite.
    """
    if x.dtype == np.uint8:
        return x, 255.0
    if x.dtype == np.bool_:
        return x.astype(np.uint8), 1.0
    if np.issubdtype(x.dtype, np.integer):
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise DataError(
                f"{where} has integer values in [{low}, {high}], expected 0..255 (or floats in [0, 1])"
            )
        return x.astype(np.uint8), 255.0
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        bad = ~np.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{where} has {n_bad} NaN/Inf value(s), first at index {first}; expected finite")
        return x, 1.0
    raise DataError(f"{where} has dtype {x.dtype}, expected bool, integer or floating-point values")


# A lone .npy is memory-mapped when it holds what a Dataset stores (bytes, or float32) as it is;
# other dtypes need a converted copy, and are read into memory.
MAPPED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


def labels_path(path: Path) -> Path:
    """The labels file that goes with the array file ``X.npy``: ``X.labels.npy`` ((N,) integers)."""
    return path.with_name(f"{path.stem}.labels.npy")


def split_path(path: Path) -> Path:
    """Where ``X.npy``'s train/test boundary is recorded (``turbovae data pack`` of a folder with
    ``train/`` and ``test/``): ``X.split.json``, ``{"train": N_TRAIN, "test": N_TEST}``."""
    return path.with_name(f"{path.stem}.split.json")


def _recorded_split(path: Path, n: int) -> int | None:
    """The number of training rows ``X.split.json`` records (the first rows), or None without one."""
    where = split_path(path)
    if not where.is_file():
        return None
    try:
        split = json.loads(where.read_text(encoding="utf-8")[:4096])
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{where}: not the JSON of a train/test split ({str(e)[:80]})") from None
    train, test = (split.get(k) if isinstance(split, dict) else None for k in ("train", "test"))
    if not (
        isinstance(train, int) and isinstance(test, int) and train > 0 and test > 0 and train + test == n
    ):
        raise DataError(f'{where}: expected {{"train": N, "test": M}} with N + M = {n} rows, N, M > 0')
    return train


def classes_path(path: Path) -> Path:
    """The class names of ``X.npy``'s labels, a JSON list (label i: the i-th name): ``X.classes.json``."""
    return path.with_name(f"{path.stem}.classes.json")


def _sidecar(path: Path, n: int) -> tuple[np.ndarray | None, list[str] | None]:
    """The labels (and class names) written next to a ``.npy`` (``turbovae data pack``), if any."""
    ys, names_file = labels_path(path), classes_path(path)
    if not ys.is_file():
        return None, None
    y = _read(ys)[""]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{ys}: has shape {y.shape} and dtype {y.dtype}, expected ({n},) integer labels")
    if not names_file.is_file():
        return y, None
    try:
        text = names_file.read_text(encoding="utf-8")
        if text.count("[") > 1000:  # a list of names has one bracket; 100,000 nested ones: RecursionError
            raise ValueError("nested lists")
        names = json.loads(text)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{names_file}: not a JSON list of class names ({str(e)[:80]})") from None
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise DataError(f"{names_file}: expected a JSON list of class names (strings)")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(names):
        span = f"{int(y.min())}..{int(y.max())}"
        raise DataError(f"{ys}: labels span {span}, but {names_file} names {len(names)} classes")
    return y, names


def _check_finite(x: np.ndarray, where: str) -> None:
    """The NaN/Inf check of ``to_stored_dtype``, a chunk of rows at a time (a memory-mapped file)."""
    rows = max(1, (64 * 2**20) // max(1, x[0].nbytes))
    n_bad, first = 0, None
    for start in range(0, len(x), rows):
        bad = ~np.isfinite(x[start : start + rows])
        count = int(bad.sum())
        if count and first is None:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            first = (first[0] + start, *first[1:])
        n_bad += count
    if n_bad:
        raise DataError(f"{where} has {n_bad} NaN/Inf value(s), first at index {first}; expected finite")


def _mapped(path: Path, x: np.ndarray, test_fraction: float) -> Dataset:
    """A lone uint8/float32 ``.npy``, memory-mapped: the test split is its last rows, as many as
    ``X.split.json`` records (a packed folder's test/), else its last ``test_fraction`` (views of the
    file, so nothing is read until used; shuffle an ordered file first, as ``turbovae data pack`` does);
    labels from ``X.labels.npy`` and ``X.classes.json`` when they exist."""
    _check_not_empty(x, path, "")
    x = to_channels_first(x, str(path))
    if x.dtype == np.float32:
        _check_finite(x, str(path))
    n = len(x)
    recorded = _recorded_split(path, n)  # a packed folder's own train/ and test/
    n_train = recorded if recorded is not None else n - _test_size(n, test_fraction)
    y, names = _sidecar(path, n)
    t = torch.from_numpy(x)  # copy-on-write mapping: writable, so torch does not warn
    mapwatch.watch(path, x, t)  # rewritten or truncated while mapped: a DataError, not other data or SIGBUS
    y_t = None if y is None else torch.from_numpy(y.astype(np.int64))
    dataset = Dataset(
        name=path.stem,
        x_train=t[:n_train],
        x_test=t[n_train:],
        y_train=None if y_t is None else y_t[:n_train],
        y_test=None if y_t is None else y_t[n_train:],
        max_value=255.0 if x.dtype == np.uint8 else 1.0,
        mapped=True,
    )
    if names is not None:
        dataset.meta["class_names"] = names
    return dataset


def _labels(y: np.ndarray | None, n: int, where: str) -> torch.Tensor | None:
    if y is None:
        return None
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{where} has shape {y.shape} and dtype {y.dtype}, expected ({n},) integer labels")
    return torch.from_numpy(y.astype(np.int64))


def _read(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """All arrays in the file by name; a lone ``.npy`` array is returned under the key ``""``, with
    ``mmap`` memory-mapped copy-on-write (``np.memmap``: writable, and a write never reaches the file)."""
    try:
        loaded = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"": loaded}
        else:
            with loaded:
                arrays = {key: loaded[key] for key in loaded.files}
    except ValueError as e:
        if mmap and "memory-mapped" in str(e):  # an object array: read, to be refused as such below
            return _read(path)
        # np.load treats anything that is neither .npy nor zip as a pickle, and refuses it.
        if "Object arrays" in str(e):
            raise DataError(
                f"{path}: contains an object array, which needs pickle to load; pickle is not loaded "
                "(it can run code), expected numeric arrays"
            ) from e
        if "pickle" in str(e):
            raise DataError(
                f"{path}: is neither .npy nor .npz (pickled data is not loaded, as pickle can run code)"
            ) from e
        raise DataError(f"{path}: not a valid .npy/.npz file ({e})") from e
    except _LOAD_ERRORS as e:
        raise DataError(f"{path}: not a valid .npy/.npz file ({type(e).__name__}: {e})") from e
    for key, value in arrays.items():
        # NpzFile hands back non-.npy members as raw bytes.
        if not isinstance(value, np.ndarray):
            raise DataError(f"{path}: member '{key}' is not a .npy array, expected only arrays")
    return arrays


def load_arrays(path: str | Path, *, test_fraction: float = 0.1, split_seed: int = 0) -> Dataset:
    """Load a dataset from a ``.npz`` or ``.npy`` file.

    Accepted ``.npz`` layouts: ``x_train``/``x_test`` with optional ``y_train``/``y_test`` (Keras
    style), ``train``/``test``, ``x`` with optional ``y``, or a single array. The last two are split
    deterministically with ``test_fraction`` and ``split_seed``. A ``.npy`` file is a single array:
    memory-mapped when it is uint8 or float32 (``Dataset.mapped``; its test split is then its last
    ``test_fraction`` of rows, and ``split_seed`` is unused), read into memory and split like an ``.npz``
    otherwise; labels come from ``X.labels.npy`` (and ``X.classes.json``) beside it, when they exist.

    Args:
        path: The file to read. Pickle is never loaded, so object arrays are refused.
        test_fraction: Fraction of examples held out when the file has no test split.
        split_seed: Seed of that split.

    Returns:
        A ``Dataset`` named after the file stem.

    Raises:
        DataError: The file is corrupt, has none of the accepted layouts, or holds unusable arrays.
    """
    path = Path(path)
    arrays = _read(path, mmap=path.suffix.lower() == ".npy")
    if "" in arrays and arrays[""].dtype in MAPPED_DTYPES:
        return _mapped(path, arrays[""], test_fraction)
    class_names = None
    if "" in arrays:  # a .npy to convert (bool, integers, float64): read into memory, as an .npz is
        x = np.array(arrays[""])
        y, class_names = _sidecar(path, len(x)) if x.ndim else (None, None)
        arrays = {"": x} if y is None else {"": x, "y": y}
    keys = set(arrays)
    y_train = y_test = None
    if {"x_train", "x_test"} <= keys:
        x_train, x_test = arrays["x_train"], arrays["x_test"]
        if ("y_train" in keys) != ("y_test" in keys):
            raise DataError(f"{path}: has only one of y_train / y_test (found {sorted(keys)}), expected both")
        y_train, y_test = arrays.get("y_train"), arrays.get("y_test")
        names = ("x_train", "x_test", "y_train", "y_test")
    elif {"train", "test"} <= keys:
        x_train, x_test = arrays["train"], arrays["test"]
        names = ("train", "test", "", "")
    elif "x" in keys or "" in keys or (len(keys) == 1 and not keys & _LAYOUT_KEYS):
        key = "x" if "x" in keys else "" if "" in keys else next(iter(keys))
        x = arrays[key]
        y = arrays.get("y") if key in ("x", "") else None  # "": a .npy's labels file
        _check_not_empty(x, path, key)
        if y is not None and y.shape != (len(x),):
            raise DataError(f"{path}: y has shape {y.shape}, expected ({len(x)},) labels to match x")
        train_idx, test_idx = split_indices(len(x), test_fraction, split_seed)
        x_train, x_test = x[train_idx], x[test_idx]
        if y is not None:
            y_train, y_test = y[train_idx], y[test_idx]
        names = (f"{key or 'array'} (train split)", f"{key or 'array'} (test split)", "y", "y")
    else:
        raise DataError(f"{path}: found arrays {sorted(keys)}, expected {_LAYOUTS}")

    for array, name in zip((x_train, x_test), names[:2], strict=True):
        _check_not_empty(array, path, name)
    x_train, max_train = to_stored_dtype(
        to_channels_first(x_train, f"{path}: {names[0]}"), f"{path}: {names[0]}"
    )
    x_test, max_test = to_stored_dtype(
        to_channels_first(x_test, f"{path}: {names[1]}"), f"{path}: {names[1]}"
    )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: {names[0]} examples have shape {x_train.shape[1:]} but {names[1]} have "
            f"{x_test.shape[1:]}, expected the same"
        )
    if x_train.dtype != x_test.dtype or max_train != max_test:
        raise DataError(
            f"{path}: {names[0]} ({x_train.dtype}, max {max_train:g}) and {names[1]} "
            f"({x_test.dtype}, max {max_test:g}) have different value types, expected the same"
        )
    dataset = Dataset(
        name=path.stem,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_train=_labels(y_train, len(x_train), f"{path}: {names[2]}"),
        y_test=_labels(y_test, len(x_test), f"{path}: {names[3]}"),
        max_value=max_train,
    )
    if class_names is not None:
        dataset.meta["class_names"] = class_names
    return dataset


def _check_not_empty(x: np.ndarray, path: Path, name: str) -> None:
    if x.ndim == 0 or x.size == 0:
        raise DataError(f"{path}: array '{name or 'array'}' is empty (shape {x.shape}), expected examples")
