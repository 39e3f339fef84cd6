"""``turbovae encode``: posterior means (and standard deviations) of new inputs under a trained run.

Text runs read a UTF-8 file and encode every line (one row per line, in order; a blank line is the
empty sentence) with the run's saved tokeniser. Table runs read a CSV (or Parquet) file with the
run's columns, encoded with the run's fitted transforms. Image and vector runs read a ``.npy`` file
(one array), a ``.npz`` file (its ``x`` array, or its only array) or a folder of PNG/JPEG images
(rows in the order of the sorted file paths). Integer arrays are divided by the run's ``max_value``
(as in training), float arrays are taken as already in [0, 1], image files are bytes divided by 255.

Every row has a name, written beside the codes by a ``.npz`` out (``names``) or a ``.csv`` out (the
first column): the image's path in the folder, the text line, a table's first column that the run
does not model (an identifier) or else its line in the file, or the row's index in an array.

A conditional run (``--condition``) encodes q(z | x, y): the class of every input comes from
``--label`` (one class for all) or ``--labels FILE`` (a .npy of class ids, or a text file of class
names or ids, one per line).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import conditioning, evaluation, runtime
from ..config import parse_resize
from ..data.arrays import _read, split_indices, to_channels_first
from ..data.images import _image_files, load_image_folder
from ..data.table_transform import encode as encode_table
from ..data.table_transform import is_table_meta
from ..data.tables import TABLE_SUFFIXES, Table, read_table, sniff_delimiter
from ..data.text import Tokenizer, read_lines, trim, warn
from ..engine.rundir import load
from ..errors import ConfigError, DataError
from ..vae import VAE


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


def _table_input(vae: VAE, path: Path) -> tuple[torch.Tensor, list[str]]:
    """A table file's rows, read with the run's column types and encoded with its fitted transforms."""
    if path.is_dir() or path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"{path}: this run is a table model; expected a {'/'.join(TABLE_SUFFIXES)} file")
    transform = vae.data_meta["table"]
    table = read_table(path, schema=transform["columns"])
    return torch.from_numpy(encode_table(table, transform)), _row_names(path, transform, table)


def _row_names(path: Path, transform: dict[str, Any], table: Table) -> list[str]:
    """The values of the file's first column the run does not model (an identifier), else the rows'
    lines in the file (CSV) or their numbers (Parquet)."""
    if path.suffix.lower() == ".parquet":
        return [str(i + 1) for i in range(len(table))]
    modelled = {c["name"] for c in transform["columns"]}
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f, delimiter=sniff_delimiter(path)) if any(v.strip() for v in r)]
    extra = [j for j, name in enumerate(rows[0]) if name.strip() not in modelled]
    if extra:
        return [row[extra[0]].strip() for row in rows[1:]]
    return [f"line {n}" for n in table.lines]


def _folder_names(path: Path) -> list[str]:
    """The image files of a folder in the order ``_folder_input`` reads them, relative to it."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        files = _image_files(path / "train") + _image_files(path / "test")
    else:
        files = _image_files(path)
    return [str(f.relative_to(path)) for f in files]


def read_named_input(vae: VAE, path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """``read_input``'s rows and a name for each (see the module docstring)."""
    path = Path(path)
    if is_table_meta(vae.data_meta):
        return _table_input(vae, path)
    x = read_input(vae, path)
    if vae.data_meta.get("text"):
        return x, read_lines(path)
    return x, _folder_names(path) if path.is_dir() else [str(i) for i in range(len(x))]


def read_input(vae: VAE, path: str | Path) -> torch.Tensor:
    """The inputs in ``path`` as the run's model takes them: token ids (N, T) or floats (N, *event)."""
    path = Path(path)
    if vae.data_meta.get("text"):
        return _text_input(vae, path)
    if is_table_meta(vae.data_meta):
        return _table_input(vae, path)[0]
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


def input_labels(vae: VAE, args: argparse.Namespace, n: int) -> torch.Tensor | None:
    """The class ids (n,) of the inputs of a conditional run, from --label or --labels."""
    if args.label is None and args.labels is None:
        if vae.condition is not None:
            names = ", ".join(str(c) for c in vae.condition["names"])
            raise ConfigError(f"this run is conditional: give --label or --labels FILE (classes: {names})")
        return None
    if vae.condition is None:
        raise ConfigError("--label/--labels need a conditional run (trained with --condition)")
    if args.label is not None and args.labels is not None:
        raise ConfigError("give --label or --labels, not both")
    if args.label is not None:
        return torch.full((n,), conditioning.resolve(vae.condition, args.label), dtype=torch.long)
    path = Path(args.labels)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        ids = torch.from_numpy(np.asarray(_read(path)[""]).astype(np.int64).reshape(-1))
    else:
        words = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        ids = torch.tensor([conditioning.resolve(vae.condition, w) for w in words], dtype=torch.long)
    return conditioning.check_labels(ids, n, len(vae.condition["names"]), str(path))


@torch.no_grad()
def encode(
    vae: VAE, x: torch.Tensor, batch_size: int = 256, y: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means, posterior standard deviations), each (N, latent) float32, for inputs ``x``
    (with the class ids ``y`` (N,) of a conditional run)."""
    device = next(vae.parameters()).device
    prepare = trim if x.dtype == torch.int64 else (lambda raw: raw)
    labels = None if y is None else y.to(device)
    q = evaluation.encode_all(vae, x.to(device), prepare, batch_size=batch_size, y=labels)
    return q.mean.cpu().numpy(), q.stddev.cpu().numpy()


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "encode",
        help="posterior means of new inputs: the lines of a text file, table rows, or images",
        description="Encode every line of a UTF-8 text file (text runs, with the run's tokeniser), every "
        "row of a CSV/Parquet file (table runs, with the run's fitted transforms) or every image of a "
        ".npy/.npz file or an image folder: posterior means (N, latent) to a .npy file; a .npz out also "
        "holds the posterior standard deviations and the rows' names (mean, stddev, names); a .csv out "
        "has a name column and the means z0, z1, ... (names: the image's file, the text line, a table's "
        "identifier column or line, an array's row index).",
    )
    c.add_argument("run_dir")
    c.add_argument(
        "--input",
        required=True,
        help="FILE.txt (text runs), FILE.csv (table runs), FILE.npy, FILE.npz or IMAGE_FOLDER/",
    )
    c.add_argument("--out", help="FILE.npy, FILE.npz or FILE.csv (default RUN_DIR/encoded-INPUT.npy)")
    c.add_argument("--label", help="a conditional run: the class of every input (a name or an index)")
    c.add_argument(
        "--labels",
        metavar="FILE",
        help="a conditional run: the class of each input, a .npy of class ids or a text file of names "
        "or ids, one per line",
    )
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out or Path(args.run_dir) / f"encoded-{Path(args.input).stem}.npy")
    if out.suffix not in (".npy", ".npz", ".csv"):
        raise ConfigError(f"--out must end in .npy, .npz or .csv, got {out}")
    device = runtime.select_device(args.device)
    vae = load(args.run_dir, device)
    x, names = read_named_input(vae, args.input)
    mean, stddev = encode(vae, x, args.batch_size, input_labels(vae, args, len(x)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, mean=mean, stddev=stddev, names=np.array(names, dtype=str))
    elif out.suffix == ".csv":
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["name", *(f"z{j}" for j in range(mean.shape[1]))])
            writer.writerows(
                [name, *(f"{v:.6g}" for v in row)] for name, row in zip(names, mean, strict=True)
            )
    else:
        np.save(out, mean)
    print(out)
    return 0
