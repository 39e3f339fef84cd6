"""``turbovae sample``: draw from a trained run: an image grid or array, table rows, or text lines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import conditioning, runtime
from ..engine.checkpoint import replace_file
from ..engine.rundir import load
from ..errors import ConfigError
from ..kinds import SampleRequest, kind_of
from .options import checkpoint_option


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    checkpoint_option(s)
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
    vae = load(args.run_dir, device, args.checkpoint)
    kind = kind_of(vae)  # what the samples are and where they go: an image grid, table rows, text lines
    ask = SampleRequest(args.n, runtime.generator(device, args.seed), replace_file, mean=not args.draw,
                        temperature=args.temperature, classes=_classes(args, vae))  # fmt: skip
    out = Path(args.out) if args.out else kind.samples_path(Path(args.run_dir), args.n)
    print(kind.write_samples(vae, out, ask))
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
