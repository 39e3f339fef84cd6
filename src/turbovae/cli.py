"""The ``turbovae`` command: train, eval, sample.

User errors (TurboVAEError) end with one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

OVERRIDE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_]+=")

# flag name -> config key; the flags are shortcuts for `section.key=value` overrides
TRAIN_FLAGS: dict[str, str] = {
    "data": "data.name",
    "binarize": "data.binarize",
    "resize": "data.resize",
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


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE. Flags are shortcuts for config keys; any key can be set "
        "as section.key=value (e.g. train.lr=3e-4 model.hidden=[512,256]).",
    )
    p.add_argument(
        "--config",
        help="preset name (e.g. fmnist-mlp) or a YAML file; "
        "default digits-mlp when --data is not given either",
    )
    p.add_argument("--data", help="digits | fashion-mnist | mnist | FILE.npz | FILE.npy | IMAGE_FOLDER/")
    p.add_argument("--binarize", help="auto | none | static | dynamic")
    p.add_argument("--resize", help="HxW, for image folders of mixed sizes")
    p.add_argument("--model", help="mlp | conv")
    p.add_argument("--hidden", help="MLP widths, e.g. 400 or 512,256")
    p.add_argument("--channels", help="conv widths per level, e.g. 32,64")
    p.add_argument("--latent", type=int, help="latent dimensions")
    p.add_argument(
        "--likelihood",
        help="bernoulli | bernoulli-grey | continuous-bernoulli | gaussian | "
        "gaussian-learned | gaussian-pixel",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--objective", help="elbo | iwae")
    p.add_argument("--beta", type=float, help="KL weight of the β-ELBO")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (default auto)")
    p.add_argument("--compile", help="auto | on | off: torch.compile the training step (default auto)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: every epoch)")
    p.add_argument("--out", help="run directory (default runs/DATA-MODEL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint"
    )
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbovae", description="Train variational autoencoders fast and correctly."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir")
    e.add_argument("--iwae-k", type=int, default=1000, help="importance samples per example (default 1000)")
    e.add_argument("--split", choices=("test", "train"), default="test")
    e.add_argument("--batch-size", type=int, default=100, help="examples per IWAE chunk")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", help="FILE.png (a grid) or FILE.npy (the values); default RUN_DIR/samples-N.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing E[x|z]")
    s.add_argument("--device", default="auto")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from .config import resolve
    from .train import Interrupted, fit

    flags = {key: getattr(args, name) for name, key in TRAIN_FLAGS.items()}
    if args.resume:
        from .errors import ConfigError

        out = Path(args.resume)
        changed = [
            f"--{n.replace('_', '-')}"
            for n, k in TRAIN_FLAGS.items()
            if flags[k] is not None and n != "epochs"
        ]
        if changed or args.config or args.overrides:
            raise ConfigError(
                "--resume continues the saved config; only --epochs may change "
                f"(got {', '.join(changed) or 'a config'})"
            )
        saved = out / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume {out}: no config.yaml there (is it a turbovae run directory?)")
        cfg = resolve(base=yaml.safe_load(saved.read_text()) or {}, flags={"train.epochs": args.epochs})
    else:
        # with neither --config nor --data, the built-in demo preset
        preset = args.config or (None if args.data else "digits-mlp")
        cfg = resolve(preset, flags, args.overrides)
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
    print(
        f"{out}: test NELBO {summary['test_nelbo']:.2f} nats{bpd}{iwae}, "
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s "
        f"({summary['samples_per_second']:,.0f} samples/s)"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from . import evaluate, runtime
    from .errors import ConfigError
    from .train import load, setup

    if args.iwae_k < 1:
        raise ConfigError(f"--iwae-k must be >= 1, got {args.iwae_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = runtime.select_device(args.device)
    vae = load(args.run_dir, device)
    s = setup(vae.config, device)
    s.vae = vae
    x, prepare = s.split(args.split)
    gen = runtime.generator(device, args.seed)
    ev = evaluate.nelbo(vae, x, prepare, batch_size=1000, generator=gen)
    iw = evaluate.iwae_nll(vae, x, prepare, k=args.iwae_k, batch_size=args.batch_size, generator=gen)
    dims = math.prod(s.data.event_shape)
    discrete = vae.likelihood.discrete
    result = {
        "nelbo": ev["nelbo"],
        "rec": ev["rec"],
        "kl": ev["kl"],
        "nll_iwae": iw["nll"],
        "nll_iwae_stderr": iw["stderr"],
        "k": iw["k"],
        "bpd": evaluate.bits_per_dim(iw["nll"], dims) if discrete else None,
        "n": iw["n"],
        "split": args.split,
        "data": s.data.name,
    }
    if args.json:
        print(json.dumps(result))
    else:
        bpd = f"  ({result['bpd']:.4f} bits/dim)" if result["bpd"] is not None else ""
        print(f"{args.split} set, {result['n']} examples of {s.data.name}:")
        print(
            f"  NELBO        {result['nelbo']:.3f} nats "
            f"(reconstruction {result['rec']:.3f} + KL {result['kl']:.3f})"
        )
        print(
            f"  IWAE NLL     {result['nll_iwae']:.3f} ± {result['nll_iwae_stderr']:.3f} nats, "
            f"k={result['k']}{bpd}"
        )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from . import runtime
    from .errors import ConfigError
    from .report import as_images, save_grid
    from .train import load

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    device = runtime.select_device(args.device)
    vae = load(args.run_dir, device)
    out = Path(args.out or Path(args.run_dir) / f"samples-{args.n}.png")
    if out.suffix not in (".png", ".npy"):
        raise ConfigError(f"--out must end in .png or .npy, got {out}")
    x = vae.sample(args.n, generator=runtime.generator(device, args.seed), mean=not args.draw).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, x.numpy())
    else:
        save_grid(as_images(x, vae.event_shape), out, nrow=min(8, args.n))
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # section.key=value overrides may stand anywhere, also between flags (argparse wants them last)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = overrides
    elif overrides:
        parser.error(f"{args.command} takes no section.key=value overrides (got {overrides[0]})")
    from .errors import TurboVAEError

    commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}
    try:
        return commands[args.command](args)
    except TurboVAEError as e:
        if args.debug:
            raise
        print(f"turbovae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbovae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
