"""``turbovae eval``: every held-out number of a trained run, or (``--fidelity``) how faithful a table
model's synthetic rows are to real ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import evaluation, runtime
from ..config import EvalConfig
from ..engine import hardware
from ..engine.rundir import load, write_json
from ..engine.setup import setup
from ..errors import ConfigError
from ..evaluation.fidelity import REPORT_STAGES, fidelity_report
from ..kinds import kind_of
from ..kinds.table import synthesize
from ..progress import Progress, note
from .options import checkpoint_option, json_out

DEFAULT_K = EvalConfig().iwae_k  # --iwae-k for a run trained with eval.iwae_k=0


def iwae_cost(k: int, n: int, split: str) -> str:
    """The line ``eval`` prints before its IWAE pass: train's (``announce_iwae``) with eval's flag."""
    cheaper = f", --iwae-k {k // 10} is about 10x faster" if k >= 20 else ""
    return (f"IWAE log-likelihood with k={k:,} samples on {n:,} {split} examples ({k * n:,} decoder "
            f"passes){cheaper}")  # fmt: skip


def add_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir")
    checkpoint_option(e)
    e.add_argument(
        "--iwae-k",
        type=int,
        help=f"importance samples per example (default: the run's eval.iwae_k; {DEFAULT_K} for a run "
        "that skipped it)",
    )
    e.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="the held-out test split (default), the validation split held out of the training data "
        "(data.validation), or the training examples",
    )
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
    e.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default: the run's train.threads; for 0, the count train would choose here now, "
        "measured on the run's step: on a busy machine one)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--out", help="write the JSON here (default RUN_DIR/eval.json; '-' writes no file)")
    e.add_argument(
        "--fidelity",
        action="store_true",
        help="tables: how faithful synthetic rows are to real held-out rows (KS, TV, correlations, "
        "ML efficacy, distance to closest record, SDMetrics' quality score): a summary (--json: all of it "
        "as JSON), and the JSON in RUN_DIR/fidelity.json",
    )
    e.add_argument(
        "--real", metavar="FILE", help="--fidelity: real rows to compare with (default: the held-out split)"
    )
    e.add_argument(
        "--target",
        help="--fidelity: the column ML efficacy predicts (default: the last categorical column with 2-20 "
        "classes, else the last numeric one)",
    )
    e.add_argument("--n", type=int, help="--fidelity: synthetic rows (default: as many as the training rows)")


def run(args: argparse.Namespace) -> int:
    if args.fidelity or args.real or args.target or args.n:
        return run_fidelity(args)
    if args.iwae_k is not None and args.iwae_k < 1:
        raise ConfigError(f"--iwae-k must be >= 1, got {args.iwae_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = json_out(args, "eval.json")
    device = runtime.select_device(args.device)
    runtime.configure(device, args.threads)
    vae = load(args.run_dir, device, args.checkpoint)
    s = setup(vae.config, device, vae.data_meta)
    s.vae = vae
    hardware.settle(vae.config, s, args.threads, precision=False)  # train's thread choice, shared
    k = args.iwae_k or vae.config.eval.iwae_k or DEFAULT_K  # the run's k (0: the run skipped IWAE)
    x, prepare = s.split(args.split)
    gen = runtime.generator(device, args.seed)
    result = {"split": args.split, "data": s.data.name, "run": str(args.run_dir)}
    result["device"] = runtime.describe(device)
    result["checkpoint"] = Path(vae.checkpoint_path).name
    note(iwae_cost(k, len(x), args.split))  # what the pass costs, as train says before its own
    with Progress(len(x), f"IWAE k={k:,}", "examples") as bar:
        result.update(
            evaluation.evaluate(
                vae, x, prepare, k=k, batch_size=args.batch_size, generator=gen,
                precision=args.precision, floor=args.floor, y=s.labels(args.split),
                progress=bar.update,
            )
        )  # fmt: skip
    result.update(s.kind.eval_metrics(result, x))  # text: nats per token and perplexity
    if out is not None:
        write_json(out, result)
    if args.json:
        print(json.dumps(result))
    else:
        bpd = f"  ({result['bpd_iwae']:.4f} bits/dim)" if result["bpd_iwae"] is not None else ""
        given = (
            f", conditional on {vae.config.data.condition}: -log p(x | y)"
            if result.get("conditional")
            else ""
        )
        print(f"{args.split} set, {result['n']} examples of {s.data.name}{given}:")
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
            f"I(x; z) {result['mutual_info']:.3f} ± {result['mutual_info_stderr']:.3f} nats, "
            f"KL(q(z) || p(z)) {result['marginal_kl']:.3f} ± {result['marginal_kl_stderr']:.3f} nats"
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


def run_fidelity(args: argparse.Namespace) -> int:
    """``turbovae eval RUN_DIR --fidelity``: synthetic rows against real ones (see fidelity.py)."""

    if not args.fidelity:
        raise ConfigError("--real, --target and --n go with --fidelity")
    if args.n is not None and args.n < 2:
        raise ConfigError(f"--n must be >= 2, got {args.n}")
    out = json_out(args, "fidelity.json")
    device = runtime.select_device(args.device)
    runtime.configure(device, args.threads)
    vae = load(args.run_dir, device, args.checkpoint)
    # the real rows (data with columns only): the run's splits, read again (the training file gone or
    # changed: --real only), or --real
    real_train, real_test, real = kind_of(vae).real_rows(vae, args.real, str(args.run_dir))
    n = args.n or (len(real_train) if real_train is not None else len(real_test))
    with Progress(1 + REPORT_STAGES, "fidelity", "stages") as bar:
        synthetic = synthesize(vae, n, generator=runtime.generator(device, args.seed))
        bar.update()
        result = {"run": str(args.run_dir), "real": real}
        result.update(fidelity_report(real_test, synthetic, real_train, target=args.target, seed=args.seed,
                                      progress=bar.update))  # fmt: skip
    if out is not None:
        write_json(out, result)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(fidelity_lines(result)))
        if out is not None:
            print(f"  written to     {out}")
    return 0


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fidelity_lines(r: dict[str, Any]) -> list[str]:
    """The fidelity report as a short readable summary (``--json`` prints all of it)."""
    columns = r.get("columns", {})
    numeric = sum("ks" in c for c in columns.values())
    train = f", {r['n_train']:,} training rows" if r.get("n_train") else ""
    lines = [
        f"{r['n_synthetic']:,} synthetic rows against {r['n_real']:,} real rows of {r['real']}{train}:",
        f"  marginals      mean KS {_f(r['mean_ks'])} over {numeric} numeric columns, mean TV "
        f"{_f(r['mean_tv'])} over {len(columns) - numeric} categorical (0: the same distribution)",
        f"  correlations   mean |Δρ| {_f(r['corr_mae'])} between numeric columns",
    ]
    ml = r.get("ml_efficacy")
    if ml:
        metric = "macro F1" if ml["metric"] == "macro_f1" else "R²"
        real = ""
        if ml.get("real") is not None:
            real = f", real-trained {_f(ml['real'])} (ratio {_f(ml['ratio'], 2)})"
        lines.append(f"  ML efficacy    predicts '{ml['target']}', {ml.get('target_rule', '')} (--target to "
                     "choose):")  # fmt: skip
        lines.append(f"                 {ml['task']}, {metric} synthetic-trained {_f(ml['synthetic'])}{real}")
    dcr = r.get("dcr") or {}
    if dcr:
        holdout = f" (real held-out rows: {_f(dcr['holdout_median'])})" if "holdout_median" in dcr else ""
        lines.append(f"  privacy        distance to the closest training row: median {_f(dcr['median'])}"
                     f"{holdout}, exact copies {100 * dcr['exact_copies']:.1f}%")  # fmt: skip
    quality = r.get("sdmetrics")
    if quality:
        shapes, pairs = _f(quality["column_shapes"]), _f(quality["column_pair_trends"])
        lines.append(f"  SDMetrics      quality score {_f(quality['score'])} (column shapes {shapes}, "
                     f"column pair trends {pairs}; sdmetrics {quality['version']})")  # fmt: skip
    elif r.get("sdmetrics_missing"):
        lines.append(f"  SDMetrics      quality score: sdmetrics is not installed ({r['sdmetrics_missing']})")
    worst = sorted(columns.items(), key=lambda kv: -kv[1].get("ks", kv[1].get("tv", 0.0)))[:3]
    if worst:
        shown = [
            f"{name} {'KS' if 'ks' in c else 'TV'} {_f(c.get('ks', c.get('tv')), 2)}" for name, c in worst
        ]
        lines.append(f"  furthest       {', '.join(shown)}")
    return lines
