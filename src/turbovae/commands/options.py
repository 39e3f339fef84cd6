"""What several commands share: the options that build a config (train, bench, tune) and eval's JSON path."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import Config, resolve
from ..errors import ConfigError
from ..kinds import kind_for_source
from ..likelihoods import LIKELIHOODS
from ..models import MODELS
from ..objectives import OBJECTIVES

# flag name -> config key; the flags are shortcuts for `section.key=value` overrides
TRAIN_FLAGS: dict[str, str] = {
    "data": "data.name",
    "columns": "data.columns",
    "condition": "data.condition",
    "binarize": "data.binarize",
    "resize": "data.resize",
    "crop": "data.crop",
    "init": "model.init",
    "model": "model.name",
    "hidden": "model.hidden",
    "channels": "model.channels",
    "latent": "model.latent",
    "likelihood": "model.likelihood",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "objective": "train.objective",
    "beta": "train.beta",
    "seed": "train.seed",
    "device": "train.device",
    "precision": "train.precision",
    "compile": "train.compile",
    "checkpoint_every": "train.checkpoint_every",
}


def summary_of(entry: Any) -> str:
    """The one-line description of a registry entry: its ``summary`` (a model's spec, a likelihood's
    class), else the first line of its docstring (an objective), without a closing full stop."""
    return (getattr(entry, "summary", "") or (entry.__doc__ or "").strip().split("\n")[0]).rstrip(".")


def registry_help(what: str, registry: dict[str, Any], default: str) -> str:
    """The help of an option that names a registry entry, made from the registry so that it cannot drift:
    ``what. name (default): summary. name: summary ...``."""
    marks = {name: " (default)" if name == default else "" for name in registry}
    return f"{what}. " + " ".join(f"{name}{marks[name]}: {summary_of(e)}." for name, e in registry.items())


def config_options(p: argparse.ArgumentParser) -> None:
    """The options that build a config: a preset, flag shortcuts, section.key=value overrides."""
    p.add_argument(
        "--config",
        help="preset name (e.g. fmnist-mlp) or a YAML file; "
        "default digits-mlp when --data is not given either",
    )
    p.add_argument(
        "--data",
        help="digits | fashion-mnist | mnist | FILE.npz | FILE.npy | IMAGE_FOLDER/ | csv:TABLE.csv"
        " | text:FILE.txt (one example per line) | words (English words, characters)",
    )
    p.add_argument("--columns", help="tables: declared column types, e.g. age:integer,smoker:boolean")
    p.add_argument(
        "--condition",
        help="a conditional VAE: label (the data's labels) or, for a table, a categorical COLUMN "
        "(sample --label / --where then choose the class)",
    )
    p.add_argument("--binarize", help="auto | none | static | dynamic")
    p.add_argument("--resize", help="HxW, for image folders of mixed sizes")
    p.add_argument("--crop", type=int, help="photos of any size as N×N crops (autoencoders, e.g. 256)")
    p.add_argument("--init", help="autoencoders: start from a diffusers AutoencoderKL/VQModel directory")
    defaults = Config()
    p.add_argument("--model", help=registry_help("the network", MODELS, defaults.model.name))
    p.add_argument("--hidden", help="MLP widths, e.g. 400 or 512,256")
    p.add_argument("--channels", help="conv widths per level, e.g. 32,64")
    p.add_argument("--latent", type=int, help="latent dimensions")
    p.add_argument("--likelihood", help=registry_help("p(x | z)", LIKELIHOODS, defaults.model.likelihood))
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--objective", help=registry_help("the loss", OBJECTIVES, defaults.train.objective))
    p.add_argument("--beta", type=float, help="KL weight of the β-ELBO")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (default auto)")
    p.add_argument("--compile", help="auto | on | off: torch.compile the training step (default auto)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: every epoch)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def config_from(args: argparse.Namespace) -> Config:
    """The config the options describe: a preset (default: by the kind of --data), flags, overrides."""
    flags = {key: getattr(args, name) for name, key in TRAIN_FLAGS.items()}
    # with neither --config nor --data, the built-in demo preset; else the preset of the data's kind
    # (a table: tabular, text: text or words-char; none for images)
    default = kind_for_source(args.data).preset(args.data) if args.data else "digits-mlp"
    return resolve(args.config or default, flags, args.overrides)


def json_out(args: argparse.Namespace, default_name: str) -> Path | None:
    """Where ``eval`` writes its JSON: ``--out FILE.json``, RUN_DIR/default_name, or nowhere for '-'."""
    out = None if args.out == "-" else Path(args.out or Path(args.run_dir) / default_name)
    if out is not None and out.suffix != ".json":
        raise ConfigError(f"--out must end in .json (or be '-'), got {out}")
    return out


def checkpoint_option(p: argparse.ArgumentParser) -> None:
    """``--checkpoint newest|best|step-N``: which of the run's checkpoints a command loads."""
    from ..engine.checkpoint import CHOICES_HELP

    p.add_argument("--checkpoint", metavar="WHICH", help=f"the run's checkpoint to use: {CHOICES_HELP}")
