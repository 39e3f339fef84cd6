"""Where datasets come from: built-in names, array files and image folders, behind one function."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, unknown_name
from . import download
from .arrays import load_arrays, split_indices
from .dataset import Dataset
from .idx import read_idx_pair
from .images import load_image_folder, load_photo_folder, load_photos, resize_images
from .tables import Table, table_path
from .text import is_text_spec, load_text


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 8, 8) uint8, labels (N,) int64) from the CSV that scikit-learn ships.

    Read directly: importing sklearn.datasets costs 1-2 s, more than the whole dataset is worth.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float64)  # (N, 65): 64 pixels and the label
            return table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits  # a layout we do not know: ask sklearn

    digits = sklearn_digits()
    return digits.images.astype(np.uint8)[:, None], digits.target.astype(np.int64)


def load_digits(*, test_fraction: float = 0.1, split_seed: int = 0, data_dir: str | None = None) -> Dataset:
    """scikit-learn's 1,797 handwritten digits: ``uint8`` (N, 1, 8, 8), values 0..16, with labels.

    The split is a fixed permutation seeded by ``split_seed``; ``data_dir`` is unused (the data ships
    with scikit-learn).
    """
    x, y = _digits_arrays()
    train_idx, test_idx = split_indices(len(x), test_fraction, split_seed)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x[train_idx]),
        x_test=torch.from_numpy(x[test_idx]),
        y_train=torch.from_numpy(y[train_idx]),
        y_test=torch.from_numpy(y[test_idx]),
        max_value=16.0,
    )


def load_idx_dataset(
    name: str, *, test_fraction: float = 0.1, split_seed: int = 0, data_dir: str | None = None
) -> Dataset:
    """MNIST-style IDX data with its official 60,000/10,000 split (``test_fraction`` is unused).

    Files are looked up locally and downloaded when missing; see ``turbovae.data.download``.
    """
    files = download.locate(name, data_dir)
    x_train, y_train = read_idx_pair(files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"])
    x_test, y_test = read_idx_pair(files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{name}: train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}, "
            "expected the same"
        )
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_train),
        x_test=torch.from_numpy(x_test),
        y_train=torch.from_numpy(y_train),
        y_test=torch.from_numpy(y_test),
        max_value=255.0,
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion-mnist": functools.partial(load_idx_dataset, "fashion-mnist"),
    "mnist": functools.partial(load_idx_dataset, "mnist"),
    "words": functools.partial(load_text, "words"),  # text, see data/text.py
}


def _image_meta(dataset: Dataset) -> Dataset:
    """Images and vectors record their kind (``meta["kind"]``, see kinds/), and byte data how many values
    they can take (``meta["levels"]``: 256 for 8-bit images, 17 for digits' 0..16, 2 for booleans), which
    the 8-bit likelihoods check."""
    dataset.meta["kind"] = "image"
    if dataset.is_bytes:
        dataset.meta["levels"] = round(dataset.max_value) + 1
    return dataset


def _check_options(resize: tuple[int, int] | None, test_fraction: float) -> None:
    if resize is not None and (
        not isinstance(resize, tuple | list)
        or len(resize) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in resize)
    ):
        raise ConfigError(f"resize must be (height, width) with positive integers, got {resize!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _resized(dataset: Dataset, resize: tuple[int, int] | None) -> Dataset:
    if resize is None:
        return dataset
    if not dataset.is_image:
        raise ConfigError(
            f"resize={resize} applies to images only, but dataset '{dataset.name}' holds vectors of "
            f"shape {dataset.event_shape}"
        )
    dataset.x_train = torch.from_numpy(resize_images(dataset.x_train.numpy(), resize))
    dataset.x_test = torch.from_numpy(resize_images(dataset.x_test.numpy(), resize))
    dataset.mapped = False  # resized: in memory
    return dataset


def _photos(
    spec: str, crop: int, resize: tuple[int, int] | None, test_fraction: float, split_seed: int
) -> Dataset:
    """Photos as crops: scikit-image's (``photos``) or a folder's (``data/images.py``)."""
    if resize is not None:
        raise ConfigError("data.resize and data.crop exclude each other: crops keep the photos' scale")
    if spec == "photos":
        return _image_meta(load_photos(crop or 64))
    if not Path(spec).expanduser().is_dir():
        raise ConfigError(f"data.crop applies to photos (--data photos or an image folder), not to '{spec}'")
    return _image_meta(load_photo_folder(Path(spec).expanduser(), crop, test_fraction, split_seed))


def load_dataset(
    spec: str,
    *,
    resize: tuple[int, int] | None = None,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    data_dir: str | None = None,
    columns: dict[str, str] | None = None,
    continuous_transform: str = "mode",
    meta: dict[str, Any] | None = None,
    tokenizer: str = "auto",
    max_length: int = 64,
    min_freq: int = 1,
    condition: str = "",
    rows: Table | None = None,
    constraints: list[str] | None = None,
    private: bool = False,
    crop: int = 0,
) -> Dataset:
    """Load a dataset by built-in name or path.

    Args:
        spec: A name in ``DATASETS`` (``digits``, ``fashion-mnist``, ``mnist``), a ``.npz``/``.npy``
            file, a folder of PNG/JPEG images, or a table: ``csv:PATH``, ``parquet:PATH`` or a
            ``.csv``/``.tsv``/``.parquet`` file (see ``data/tables.py``).
        resize: (height, width) to resize images to.
        test_fraction: Fraction held out for test when the source has no split of its own.
        split_seed: Seed of that split.
        data_dir: Directory searched first for the files of downloadable built-ins.
        columns: Tables: declared column types by name (the others are inferred).
        continuous_transform: Tables: ``mode`` or ``quantile`` normalisation of numeric columns.
        meta: The ``Dataset.meta`` a trained run saved: a table's fitted transforms are reused
            rather than fitted again, so that the run sees the data it was trained on.
        tokenizer: Text (``text:PATH``, ``words``): ``auto``, ``char`` or ``word`` (see ``data/text.py``).
        max_length: Text: tokens kept per line; longer lines are cut (and counted).
        min_freq: Text: occurrences in the training split a token needs to enter the vocabulary.
        condition: ``data.condition``: ``label`` reads an image folder's class sub-folders as labels;
            for a table, the categorical column the model is conditioned on (taken out of the vector,
            its class ids in ``y_train``/``y_test``). Other sources' labels are read anyway.
        rows: Tables: the rows, typed already (a DataFrame's), used instead of reading the file.
        constraints, private: Tables: rules between columns (``data/constraints.py``); a DP run's transform.
        crop: Photos (``photos``, an image folder): N×N crops of images of any size (``data/images.py``).

    Returns:
        The dataset, in memory.

    Raises:
        ConfigError: Unknown name or invalid option.
        DataError: Missing, corrupt or unsuitable data.
    """
    _check_options(resize, test_fraction)
    if rows is not None and (is_text_spec(spec) or table_path(spec) is None):
        raise ConfigError(f"rows in memory are a table's, but data.name '{spec}' is not a table (csv:PATH)")
    if is_text_spec(spec):
        if resize is not None:
            raise ConfigError(f"resize={resize} applies to images only, but '{spec}' is text")
        return load_text(spec, tokenizer=tokenizer, max_length=max_length, min_freq=min_freq,
                         test_fraction=test_fraction, split_seed=split_seed, data_dir=data_dir,
                         fitted=(meta or {}).get("text"))  # fmt: skip
    if table_path(spec) is not None:
        if resize is not None:
            raise ConfigError(f"resize={resize} applies to images only, but '{spec}' is a table")
        from .table_transform import load_table  # SciPy's import costs 0.5 s: only for tables

        return load_table(spec, columns=columns, method=continuous_transform, test_fraction=test_fraction,
                          split_seed=split_seed, fitted=(meta or {}).get("table"),
                          condition=condition if condition != "label" else "", rows=rows,
                          constraints=constraints, private=private)  # fmt: skip
    if constraints:  # (below: not a table)
        raise ConfigError(f"data.constraints apply to tables (csv:PATH), but '{spec}' is not one")
    if spec == "photos" or crop:
        return _photos(spec, crop, resize, test_fraction, split_seed)
    if spec in DATASETS:
        dataset = DATASETS[spec](test_fraction=test_fraction, split_seed=split_seed, data_dir=data_dir)
        return _image_meta(_resized(dataset, resize))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _image_meta(
            load_image_folder(
                path,
                resize=resize,
                test_fraction=test_fraction,
                split_seed=split_seed,
                labels=condition == "label",
            )
        )
    if path.is_file():
        if path.suffix.lower() in (".npz", ".npy"):
            arrays = load_arrays(path, test_fraction=test_fraction, split_seed=split_seed)
            return _image_meta(_resized(arrays, resize))
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}', expected .npz, .npy or an image folder"
        )
    if "/" in spec or "\\" in spec or path.suffix:
        raise DataError(f"{spec}: path does not exist (expected a .npz/.npy file or an image folder)")
    raise unknown_name("dataset", spec, DATASETS)
