"""``turbovae train``: train a VAE and write a run directory (the loop itself is turbovae.engine.loop)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import load_preset, parse_override, resolve
from ..engine.loop import Interrupted, fit
from ..engine.rundir import RESUMABLE_LIMITS, check_out_dir
from ..errors import ConfigError, TurboVAEError
from .options import TRAIN_FLAGS, config_from, config_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE. Flags are shortcuts for config keys; any key can be set "
        "as section.key=value (e.g. train.lr=3e-4 model.hidden=[512,256]).",
    )
    config_options(p)
    p.add_argument("--out", help="run directory (default runs/DATA-MODEL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, with its saved config "
        "(only --epochs, train.time_limit=S and train.max_steps=N may change)",
    )
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="data-parallel on this machine: run the same command under torchrun with N processes "
        "(one per GPU; on CPUs set train.threads); train.batch_size is per process",
    )


def _same_as_saved(saved: Path) -> Callable[[dict[str, Any], list[str]], bool]:
    """Whether flags and overrides leave the run's saved config as it is (False where it cannot be read)."""
    try:
        base = load_preset(str(saved)) if saved.is_file() else None
        before = None if base is None else resolve(base=base).to_dict()
    except TurboVAEError:
        before = None

    def same(flags: dict[str, Any], overrides: list[str]) -> bool:
        try:  # the whole resolved config compared: what the flag sets and anything it implies
            after = resolve(flags=flags, overrides=overrides, base=base).to_dict()
            return before is not None and after == before
        except TurboVAEError:
            return False

    return same


def run(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, name) for name, key in TRAIN_FLAGS.items()}
    if args.resume:
        out = Path(args.resume)
        same = _same_as_saved(out / "config.yaml")  # a flag repeating the saved value changes nothing
        changed = [
            f"--{n.replace('_', '-')}"
            for n, k in TRAIN_FLAGS.items()
            if flags[k] is not None and n != "epochs" and not same({k: flags[k]}, [])
        ]
        # a time- or step-limited run is continued by raising (or clearing) its limit
        limit = [o for o in args.overrides if parse_override(o)[0] in RESUMABLE_LIMITS]
        others = [o for o in args.overrides if o not in limit and not same({}, [o])]
        if changed or args.config or others:
            raise ConfigError(
                "--resume continues the saved config; only --epochs, train.time_limit and train.max_steps "
                "may change "
                f"(got {', '.join(changed + (['--config'] if args.config else []) + others)})"
            )
        saved = out / "config.yaml"
        if not saved.is_file():
            check_out_dir(out, overwrite=False, resume=True)  # raises, saying why
        cfg = resolve(base=load_preset(str(saved)), flags={"train.epochs": args.epochs}, overrides=limit)
    else:
        cfg = config_from(args)
        out = Path(args.out or f"runs/{Path(cfg.data.name).stem}-{cfg.model.name}")
    progress = None if args.progress == "auto" else args.progress == "on"
    try:
        summary = fit(cfg, out, overwrite=args.overwrite, resume=bool(args.resume), progress=progress)
    except Interrupted as stop:
        print(
            f"turbovae: stopped at step {stop.step} (signal {stop.signum}); checkpoint written; "
            f"resume with: turbovae train --resume {stop.out}",
            file=sys.stderr,
        )
        return 130
    bpd = f", {summary['test_bpd']:.4f} bits/dim" if summary["test_bpd"] is not None else ""
    iwae = f", IWAE-{summary['iwae_k']} NLL {summary['test_nll_iwae']:.2f} nats" if summary["iwae_k"] else ""
    if summary.get("test_perplexity") is not None:  # text
        iwae += f" (perplexity {summary['test_perplexity']:.2f}, {summary['test_active_units']} active units)"
    print(
        f"{out}: test NELBO {summary['test_nelbo']:.2f} nats{bpd}{iwae}, "
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s "
        f"({summary['samples_per_second']:,.0f} samples/s)"
    )
    return 0
