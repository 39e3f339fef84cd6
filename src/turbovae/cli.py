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
    "columns": "data.columns",
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
    _config_options(p)
    p.add_argument("--out", help="run directory (default runs/DATA-MODEL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, with its saved config "
        "(only --epochs and train.time_limit=S may change)",
    )
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="data-parallel on this machine: run the same command under torchrun with N processes "
        "(one per GPU; on CPUs set train.threads); train.batch_size is per process",
    )


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training throughput against the hardware and a peer",
        description="Time the training step that `turbovae train` with the same options would run: median "
        "samples/s over timed windows after warm-up, FLOP/s against the matmul ceiling measured in the same "
        "run, and with --vs the same model in a peer's training loop on the same data.",
    )
    _config_options(p)
    p.add_argument("--vs", choices=("examples", "pythae"), help="also time a peer's loop and print the ratio")
    p.add_argument("--windows", type=int, default=5, help="timed windows (default 5)")
    p.add_argument("--window-steps", type=int, default=50, help="steps per window (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _tune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help="measure, then recommend batch size, learning rate, schedule, precision, compile and epochs",
        description="Measure the configured training on this machine within --budget seconds (throughput "
        "per batch size up to the largest that fits, the gradient-noise scale, an LR range test) and write a "
        "config that `turbovae train --config OUT` runs: batch size, learning rate, warm-up + cosine "
        "schedule, precision, compile and epochs, each with a one-line reason. With --search N, an "
        "Optuna search over width, depth, latent size, learning rate and β instead (pip install "
        "'turbovae[search]'). Takes the options of `turbovae train`.",
    )
    _config_options(p)
    p.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="time tune itself may take, from its start (default 60; with --search: no limit, N trials)",
    )
    p.add_argument(
        "--train-budget",
        type=float,
        metavar="SECONDS",
        help="choose epochs so that the whole `turbovae train --config OUT` process takes about this long, "
        "start-up and final evaluation included, at the throughput tune measured (default: the configured "
        "epochs, scaled by (1 + B/B_noise)/(1 + B0/B_noise) when the batch changes from B0 to B, so that the "
        "run sees the examples it needs to reach the configured run's loss)",
    )
    p.add_argument("--out", default="tuned.yaml", help="the YAML config to write (default tuned.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--search",
        type=int,
        metavar="N",
        help="run an Optuna search of N trials (short runs on 90%% of the training split, median pruning on "
        "the per-epoch NELBO of the other 10%%) and write the best config; the same command resumes an "
        "interrupted search",
    )
    p.add_argument(
        "--storage", help="--search: the study's SQLite file (default search.db in --out's directory)"
    )
    p.add_argument(
        "--trial-epochs", type=int, help="--search: epochs per trial (default train.epochs / 5, at least 1)"
    )
    p.add_argument(
        "--search-params",
        help="--search: what to search, from width,depth,latent,lr,beta (default all)",
    )


def _config_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--binarize", help="auto | none | static | dynamic")
    p.add_argument("--resize", help="HxW, for image folders of mixed sizes")
    p.add_argument("--model", help="mlp | conv | sentence (text)")
    p.add_argument("--hidden", help="MLP widths, e.g. 400 or 512,256")
    p.add_argument("--channels", help="conv widths per level, e.g. 32,64")
    p.add_argument("--latent", type=int, help="latent dimensions")
    p.add_argument(
        "--likelihood",
        help="bernoulli | bernoulli-grey | continuous-bernoulli | gaussian | "
        "gaussian-learned | gaussian-pixel | mixed (tables) | categorical (text)",
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
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbovae", description="Train variational autoencoders fast and correctly."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _tune_parser(sub)

    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir")
    e.add_argument("--iwae-k", type=int, default=1000, help="importance samples per example (default 1000)")
    e.add_argument("--split", choices=("test", "train"), default="test")
    e.add_argument("--batch-size", type=int, help="examples per IWAE batch (default: chosen from k)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="decoder matmuls of the IWAE estimate; auto: bf16 where it is fast and, checked on the first "
        "examples, moves the estimate by < 0.02 nats (default auto)",
    )
    e.add_argument("--floor", action="store_true", help="also time the matmul-bound floor of the IWAE pass")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--out", help="write the JSON here (default RUN_DIR/eval.json; '-' writes no file)")
    e.add_argument(
        "--fidelity",
        action="store_true",
        help="tables: how faithful synthetic rows are to real held-out rows (KS, TV, correlations, "
        "ML efficacy, distance to closest record), as JSON (default file RUN_DIR/fidelity.json)",
    )
    e.add_argument(
        "--real", metavar="FILE", help="--fidelity: real rows to compare with (default: the held-out split)"
    )
    e.add_argument(
        "--target", help="--fidelity: the column ML efficacy predicts (default: the last categorical)"
    )
    e.add_argument("--n", type=int, help="--fidelity: synthetic rows (default: as many as the training rows)")

    r = sub.add_parser("report", help="an HTML report of one run, or a comparison of several")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", help="the HTML file (default RUN_DIR/report.html for one run)")
    r.add_argument("--figures", help="folder for the PNG pictures (default: figures/ beside the report)")
    r.add_argument("--device", default="auto")
    r.add_argument(
        "--tensorboard", metavar="LOGDIR", help="also write TensorBoard event files (one subfolder per run)"
    )

    d = sub.add_parser("data", help="data helpers")
    data_sub = d.add_subparsers(dest="data_command", required=True)
    x = data_sub.add_parser(
        "export-tables",
        help="write scikit-learn's wine, breast-cancer and iris tables as CSV (the class as a string column)",
    )
    x.add_argument("folder")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument(
        "--out",
        help="FILE.png (a grid) or FILE.npy (the values); for tables FILE.csv (rows drawn from the model, "
        "with the training file's columns and types) or FILE.parquet; default RUN_DIR/samples-N.png|.csv",
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
    s.add_argument("--device", default="auto")

    c = sub.add_parser(
        "encode",
        help="posterior means of new inputs: the lines of a text file, or images",
        description="Encode every line of a UTF-8 text file (text runs, with the run's tokeniser) or every "
        "image of a .npy/.npz file or an image folder: posterior means (N, latent) to a .npy file; a .npz "
        "out also holds the posterior standard deviations (mean, stddev).",
    )
    c.add_argument("run_dir")
    c.add_argument("--input", required=True, help="FILE.txt (text runs), FILE.npy, FILE.npz or IMAGE_FOLDER/")
    c.add_argument("--out", help="FILE.npy or FILE.npz (default RUN_DIR/encoded-INPUT.npy)")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--device", default="auto")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_preset, parse_override, resolve
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
        # a time-limited run is continued by raising (or clearing) its limit
        limit = [o for o in args.overrides if parse_override(o)[0] == "train.time_limit"]
        others = [o for o in args.overrides if o not in limit]
        if changed or args.config or others:
            raise ConfigError(
                "--resume continues the saved config; only --epochs and train.time_limit may change "
                f"(got {', '.join(changed + (['--config'] if args.config else []) + others)})"
            )
        saved = out / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume {out}: no config.yaml there (is it a turbovae run directory?)")
        cfg = resolve(base=load_preset(str(saved)), flags={"train.epochs": args.epochs}, overrides=limit)
    else:
        cfg = _config_from(args)
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


def _config_from(args: argparse.Namespace) -> Any:
    from .config import resolve

    flags = {key: getattr(args, name) for name, key in TRAIN_FLAGS.items()}
    from .data.tables import table_path

    # with neither --config nor --data, the built-in demo preset; a table without --config: tabular
    default = ("tabular" if table_path(args.data) else None) if args.data else "digits-mlp"
    from .data.text import is_text_spec

    if args.data and is_text_spec(args.data):  # text without --config: the text presets
        default = "words-char" if args.data == "words" else "text"
    return resolve(args.config or default, flags, args.overrides)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench

    result = bench(_config_from(args), vs=args.vs, windows=args.windows, steps=args.window_steps)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['data']}, {result['model']}, batch {result['batch_size']}, {result['precision']}, "
          f"{result['device']}; {result['compile']}")  # fmt: skip
    print(f"  turbovae  {result['samples_per_second']:>10,.0f} samples/s  {result['step_ms']:.2f} ms/step  "
          f"{result['flops_per_second'] / 1e9:.1f} GFLOP/s = {100 * result['ceiling_fraction']:.0f}% of the "
          f"measured matmul ceiling ({result['ceiling_flops_per_second'] / 1e9:.0f} GFLOP/s)")  # fmt: skip
    if "tokens_per_second" in result:
        print(f"  turbovae  {result['tokens_per_second']:>10,.0f} tokens/s")
    if "peer" in result:
        print(f"  {result['peer']:<9} {result['peer_samples_per_second']:>10,.0f} samples/s  "
              f"→ speed-up {result['speedup']:.2f}×")  # fmt: skip
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .tune import SEARCH_PARAMS, check_out_path, log_to_stderr, search, tune, write_config

    out = Path(args.out)
    check_out_path(out, args.overwrite)  # before any time is spent
    if args.search is None:
        given = [f for f, v in (("--storage", args.storage), ("--trial-epochs", args.trial_epochs),
                                ("--search-params", args.search_params)) if v is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} goes with --search N")
    elif args.train_budget is not None:
        raise ConfigError("--train-budget sets the epochs of a tuned config; --search keeps the configured")
    cfg = _config_from(args)
    if args.search is not None:
        params = [p.strip() for p in (args.search_params or ",".join(SEARCH_PARAMS)).split(",") if p.strip()]
        storage = Path(args.storage or out.parent / "search.db")
        try:
            result = search(cfg, args.search, storage=storage, budget=args.budget,
                            trial_epochs=args.trial_epochs, params=params, log=log_to_stderr)  # fmt: skip
        except KeyboardInterrupt:
            print(f"turbovae: search interrupted; its finished trials are in {storage}, and the same command "
                  "resumes it", file=sys.stderr)  # fmt: skip
            return 130
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result["params"].items()
        )
        header = (
            f"# turbovae tune --search: the best of {sum(result['trials'].values())} trials of "
            f"{result['trial_epochs']} epochs ({result['trials']}), trial {result['trial']}: validation "
            f"NELBO {result['best_validation_nelbo']:.3f} nats with {shown}; study {result['study']} in "
            f"{result['storage']}\n"
        )
        write_config(result["config"], out, header)
        if args.json:
            print(json.dumps({"config": str(out), **{k: v for k, v in result.items() if k != "config"}}))
        else:
            print(f"{out}: best validation NELBO {result['best_validation_nelbo']:.2f} nats (trial "
                  f"{result['trial']}; {shown}); train with: turbovae train --config {out}")  # fmt: skip
        return 0
    rec = tune(cfg, budget=60.0 if args.budget is None else args.budget, train_budget=args.train_budget,
               log=log_to_stderr)  # fmt: skip
    m = rec.measured
    write_config(
        rec.config, out, rec.header(f"turbovae tune, {m['device']}, {rec.seconds:.0f} s of measurements")
    )
    if args.json:
        print(json.dumps({"config": str(out), **rec.to_json()}))
        return 0
    print(f"{out}: train with: turbovae train --config {out}")
    for key, value in rec.choices().items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"  {key.split('.')[1]:<13} {shown:<14} {rec.reasons[key]}")
    print(
        f"  (measured in {rec.seconds:.1f} s; predicted training time {m['predicted_train_seconds']:.0f} s)"
    )
    return 0


def _json_out(args: argparse.Namespace, default_name: str) -> Path | None:
    """Where ``eval`` writes its JSON: ``--out FILE.json``, RUN_DIR/default_name, or nowhere for '-'."""
    from .errors import ConfigError

    out = None if args.out == "-" else Path(args.out or Path(args.run_dir) / default_name)
    if out is not None and out.suffix != ".json":
        raise ConfigError(f"--out must end in .json (or be '-'), got {out}")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate, runtime
    from .errors import ConfigError
    from .train import load, setup

    if args.fidelity or args.real or args.target or args.n:
        return cmd_fidelity(args)
    if args.iwae_k < 1:
        raise ConfigError(f"--iwae-k must be >= 1, got {args.iwae_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = _json_out(args, "eval.json")
    device = runtime.select_device(args.device)
    runtime.configure(device, args.threads)
    vae = load(args.run_dir, device)
    s = setup(vae.config, device, vae.data_meta)
    s.vae = vae
    x, prepare = s.split(args.split)
    gen = runtime.generator(device, args.seed)
    result = {"split": args.split, "data": s.data.name, "run": str(args.run_dir)}
    result["device"] = runtime.describe(device)
    result.update(
        evaluate.evaluate(
            vae, x, prepare, k=args.iwae_k, batch_size=args.batch_size, generator=gen,
            precision=args.precision, floor=args.floor,
        )
    )  # fmt: skip
    if s.data.is_tokens:  # text: nats per token and perplexity
        from .text import text_metrics

        result.update(text_metrics(result["nelbo"], result["nll_iwae"], x))
    if out is not None:
        from .checkpoint import atomic_write

        atomic_write(out, (json.dumps(result, indent=1) + "\n").encode())
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
        if "perplexity" in result:
            print(
                f"  per token    NELBO {result['nelbo_per_token']:.4f}, "
                f"IWAE NLL {result['nll_iwae_per_token']:.4f} nats, perplexity {result['perplexity']:.3f}"
            )
        print(
            f"  latent       {result['active_units']} of {result.get('top_latent', result['latent'])} units "
            f"{'of the top group ' if 'top_latent' in result else ''}active, "
            f"I(x; z) {result['mutual_info']:.3f} nats, KL(q(z) || p(z)) {result['marginal_kl']:.3f} nats"
        )
        floor = f", {result['floor_ratio']:.2f}x the matmul floor" if "floor_ratio" in result else ""
        if "floor_ratio_fp32" in result:
            floor += f", {result['floor_ratio_fp32']:.2f}x the fp32 floor"
        print(
            f"  time         {result['seconds']:.1f} s "
            f"(IWAE {result['iwae_seconds']:.1f} s, {result['precision']}{floor})"
        )
        if out is not None:
            print(f"  written to   {out}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """``turbovae eval RUN_DIR --fidelity``: synthetic rows against real ones (see fidelity.py)."""
    from . import runtime
    from .checkpoint import atomic_write
    from .data.table_transform import is_table_meta, source_splits
    from .data.tables import read_table
    from .errors import ConfigError, DataError
    from .fidelity import fidelity_report, synthesize
    from .train import load

    if not args.fidelity:
        raise ConfigError("--real, --target and --n go with --fidelity")
    if args.n is not None and args.n < 2:
        raise ConfigError(f"--n must be >= 2, got {args.n}")
    out = _json_out(args, "fidelity.json")
    device = runtime.select_device(args.device)
    runtime.configure(device, args.threads)
    vae = load(args.run_dir, device)
    if not is_table_meta(vae.data_meta):
        raise DataError(f"{args.run_dir}: --fidelity is for runs trained on a table (csv:PATH)")
    transform = vae.data_meta["table"]
    try:
        real_train, real_test = source_splits(transform)
    except DataError:
        if not args.real:
            raise
        real_train = None  # the training file is gone or changed: compare with --real only
    if args.real:
        real_test = read_table(args.real, schema=transform["columns"])
    n = args.n or (len(real_train) if real_train is not None else len(real_test))
    synthetic = synthesize(vae, n, generator=runtime.generator(device, args.seed))
    result = {"run": str(args.run_dir), "real": args.real or f"{transform['source']} (held-out split)"}
    result.update(fidelity_report(real_test, synthetic, real_train, target=args.target, seed=args.seed))
    if out is not None:
        atomic_write(out, (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.tables import export_tables

    for path in export_tables(args.folder):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import runtime
    from .report import build_report, write_tensorboard

    device = runtime.select_device(args.device)
    out = build_report(args.run_dirs, args.out, device=device, figures=args.figures)
    print(out)
    if args.tensorboard:
        runs = [Path(d) for d in args.run_dirs]
        for run in runs:
            logdir = Path(args.tensorboard) / (run.resolve().name if len(runs) > 1 else "")
            figures = Path(args.figures) if args.figures else out.parent / "figures"
            if len(runs) > 1:
                figures = figures / run.resolve().name
            pictures = {p.stem: p for p in sorted(figures.glob("*.png"))} if figures.is_dir() else None
            print(write_tensorboard(run, logdir, pictures))
    return 0


def _sample_text(args: argparse.Namespace, vae: Any, device: Any) -> int:
    from . import runtime
    from .errors import ConfigError
    from .text import sample_lines

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".txt":
        raise ConfigError(f"--out must end in .txt for a text run, got {out}")
    lines = sample_lines(
        vae, args.n, runtime.generator(device, args.seed), greedy=not args.draw, temperature=args.temperature
    )
    if out is None:
        print("\n".join(lines))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{line}\n" for line in lines))
        print(out)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from . import runtime
    from .encode import encode, read_input
    from .errors import ConfigError
    from .train import load

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out or Path(args.run_dir) / f"encoded-{Path(args.input).stem}.npy")
    if out.suffix not in (".npy", ".npz"):
        raise ConfigError(f"--out must end in .npy or .npz, got {out}")
    device = runtime.select_device(args.device)
    vae = load(args.run_dir, device)
    mean, stddev = encode(vae, read_input(vae, args.input), args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, mean=mean, stddev=stddev)
    else:
        np.save(out, mean)
    print(out)
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
    if vae.data_meta.get("text"):  # text: generated lines, on stdout or in --out FILE.txt
        return _sample_text(args, vae, device)
    table = bool(vae.data_meta.get("table"))
    out = Path(args.out or Path(args.run_dir) / f"samples-{args.n}.{'csv' if table else 'png'}")
    if out.suffix.lower() in (".csv", ".tsv", ".parquet"):
        from .data.tables import write_table
        from .fidelity import synthesize

        rows = synthesize(
            vae, args.n, generator=runtime.generator(device, args.seed), temperature=args.temperature
        )
        print(write_table(rows, out))
        return 0
    if out.suffix not in (".png", ".npy"):
        raise ConfigError(f"--out must end in .png or .npy (tables: .csv or .parquet), got {out}")
    x = vae.sample(
        args.n,
        generator=runtime.generator(device, args.seed),
        mean=not args.draw,
        temperature=args.temperature,
    ).cpu()
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

    commands = {
        "train": cmd_train,
        "bench": cmd_bench,
        "tune": cmd_tune,
        "eval": cmd_eval,
        "sample": cmd_sample,
        "encode": cmd_encode,
        "data": cmd_data,
        "report": cmd_report,
    }
    try:
        if getattr(args, "nproc", None) not in (None, 1):  # train --nproc N: the same command under torchrun
            from .distributed import launch

            return launch(argv, args.nproc)
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
