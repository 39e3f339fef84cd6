"""``turbovae encode``: posterior means (and standard deviations) of new inputs under a trained run.

Text runs read a UTF-8 file and encode every line (one row per line, in order; a blank line is the
empty sentence) with the run's saved tokeniser. Table runs read a CSV (or Parquet) file with the
run's columns, encoded with the run's fitted transforms. Image and vector runs read a ``.npy`` file
(one array), a ``.npz`` file (its ``x`` array, or its only array) or a folder of PNG/JPEG images
(rows in the order of the sorted file paths). Integer arrays are divided by the run's ``max_value``
(as in training), float arrays are taken as already in [0, 1], image files are bytes divided by 255.
Each kind of data reads its inputs itself (``DataKind.read_input``, ``kinds/``).

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
from ..data.arrays import _read
from ..engine.rundir import load
from ..errors import ConfigError, DataError
from ..kinds import kind_of
from ..vae import VAE
from .options import checkpoint_option


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
        ids = conditioning.integer_ids(_read(path)[""], str(path))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: not UTF-8 text (a bad byte at offset {e.start}); expected one class a line, or "
                "a .npy of class ids"
            ) from None
        words = [line.strip() for line in text.splitlines() if line.strip()]
        ids = torch.tensor([conditioning.resolve(vae.condition, w) for w in words], dtype=torch.long)
    return conditioning.check_labels(ids, n, len(vae.condition["names"]), str(path))


@torch.no_grad()
def encode(
    vae: VAE, x: torch.Tensor, batch_size: int = 256, y: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(posterior means, posterior standard deviations), each (N, latent) float32, for inputs ``x``
    (with the class ids ``y`` (N,) of a conditional run)."""
    device = next(vae.parameters()).device
    prepare = kind_of(vae).preparer(1.0, False, None)  # already scaled (text: cut to the longest line)
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
    checkpoint_option(c)
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
    vae = load(args.run_dir, device, args.checkpoint)
    x, names = kind_of(vae).read_input(vae, Path(args.input))  # the rows, named (the module docstring)
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
