"""``turbovae sample``: draw from a trained run: an image grid or array, table rows, or text lines."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import conditioning, runtime
from ..data.tables import write_table
from ..engine.checkpoint import replace_file
from ..engine.rundir import load
from ..errors import ConfigError
from ..evaluation.fidelity import synthesize
from ..viz.barcodes import data_kind, sample_barcode
from ..viz.grids import as_images, save_grid
from ..viz.text import sample_lines


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument(
        "--out",
        help="FILE.png (a grid) or FILE.npy (the values); for tables FILE.csv (rows drawn from the model, "
        "with the training file's columns and types), FILE.parquet, FILE.npy (the transformed vectors) or "
        "FILE.png (the vectors as a barcode); for text FILE.txt (default: stdout) or FILE.png (token ids as "
        "a barcode); default RUN_DIR/samples-N.png|.csv",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing E[x|z]")
    s.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="scale of the prior's standard deviations (hierarchical: of every group's); below 1 draws "
        "nearer the prior's mode, 0 gives the mode (default 1)",
    )
    s.add_argument(
        "--label",
        help="a conditional run (--condition label): the class to draw, by name or index; several "
        "(3,7) give one row each, --n per class",
    )
    s.add_argument(
        "--where",
        metavar="COLUMN=VALUE",
        help="a table run conditioned on COLUMN (--condition COLUMN): rows with that value",
    )
    s.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    device = runtime.select_device(args.device)
    vae = load(args.run_dir, device)
    if vae.data_meta.get("text"):  # text: generated lines, on stdout or in --out FILE.txt
        return _sample_text(args, vae, device)
    classes = _classes(args, vae)
    table = bool(vae.data_meta.get("table"))
    out = Path(args.out or Path(args.run_dir) / f"samples-{args.n}.{'csv' if table else 'png'}")
    if out.suffix.lower() in (".csv", ".tsv", ".parquet"):
        rows = synthesize(
            vae,
            args.n,
            generator=runtime.generator(device, args.seed),
            temperature=args.temperature,
            condition=None if classes is None else classes[0],
        )
        print(write_table(rows, out))
        return 0
    if out.suffix not in (".png", ".npy"):
        what = ".csv, .tsv or .parquet (rows), .png (a barcode) or .npy" if table else ".png or .npy"
        raise ConfigError(f"--out must end in {what}, got {out}")
    # several classes: --n draws of each, one grid row (of up to 8... --n) per class
    y = None if classes is None else torch.tensor(classes, device=device).repeat_interleave(args.n)
    x = vae.sample(
        args.n if y is None else len(y),
        generator=runtime.generator(device, args.seed),
        mean=not args.draw,
        temperature=args.temperature,
        condition=y,
    ).cpu()
    if out.suffix == ".npy":  # atomically, as every file turbovae writes
        buffer = io.BytesIO()
        np.save(buffer, x.numpy())
        replace_file(out, buffer.getbuffer())
    elif table:  # one row of coloured cells per sample, not a grid of fake images
        sample_barcode(x, "table").save(out, format="PNG")
    else:
        nrow = min(8, args.n) if classes is None or len(classes) == 1 else min(args.n, 16)
        save_grid(as_images(x, vae.event_shape), out, nrow=nrow)
    print(out)
    return 0


def _classes(args: argparse.Namespace, vae: Any) -> list[int] | None:
    """The class ids --label or --where ask for (None: neither); an unknown one is a ConfigError."""
    if args.label is not None and args.where is not None:
        raise ConfigError("give --label (image labels) or --where COLUMN=VALUE (tables), not both")
    if args.label is None and args.where is None:
        return None
    condition = vae.condition
    if condition is None:
        flag = "--label" if args.label is not None else "--where"
        raise ConfigError(
            f"{flag} needs a conditional run (train it with --condition); {args.run_dir} is not"
        )
    if args.where is not None:
        return [conditioning.parse_where(condition, args.where)]
    if condition.get("kind") == "column":
        raise ConfigError(f"this table run is conditioned on a column: --where {condition['column']}=VALUE")
    return conditioning.resolve_many(condition, args.label)


def _sample_text(args: argparse.Namespace, vae: Any, device: Any) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".txt", ".png"):
        raise ConfigError(
            f"--out must end in .txt (sentences) or .png (token ids as a barcode) for a text run, got {out}"
        )
    gen = runtime.generator(device, args.seed)
    if out is not None and out.suffix == ".png":
        ids = vae.sample(args.n, generator=gen, mean=not args.draw, temperature=args.temperature)
        out.parent.mkdir(parents=True, exist_ok=True)
        sample_barcode(ids, data_kind(vae)).save(out, format="PNG")
        print(out)
        return 0
    lines = sample_lines(vae, args.n, gen, greedy=not args.draw, temperature=args.temperature)
    if out is None:
        print("\n".join(lines))
    else:
        replace_file(out, "".join(f"{line}\n" for line in lines).encode())
        print(out)
    return 0
