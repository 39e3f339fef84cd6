"""``turbovae tune``: measure this machine and this problem, then recommend a training config.

- ``measure``: tune's own short runs: throughput per batch size, the gradient-noise scale (see
  turbovae.engine.noise.NoiseScale), the learning-rate range test;
- ``rules``: what to do with the measurements (batch, learning rate, warm-up, compile);
- ``recommend``: all of it within a time budget (:func:`tune`);
- ``search``: an Optuna search over width, depth, latent size, learning rate and β (``turbovae[search]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...progress import Progress
from ..options import config_from, config_options
from .recommend import check_out_path, tune, write_config
from .search import SEARCH_PARAMS, search


def add_parser(sub: Any) -> None:
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
    config_options(p)
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
        help="run an Optuna search of N trials (short runs on the training examples, median pruning on "
        "the per-epoch NELBO of the validation split, data.validation) and write the best config; the same "
        "command resumes an "
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


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_path(out, args.overwrite)  # before any time is spent
    if args.search is None:
        given = [f for f, v in (("--storage", args.storage), ("--trial-epochs", args.trial_epochs),
                                ("--search-params", args.search_params)) if v is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} goes with --search N")
    elif args.train_budget is not None:
        raise ConfigError("--train-budget sets the epochs of a tuned config; --search keeps the configured")
    cfg = config_from(args)
    if args.search is not None:
        params = [p.strip() for p in (args.search_params or ",".join(SEARCH_PARAMS)).split(",") if p.strip()]
        storage = Path(args.storage or out.parent / "search.db")
        try:
            with Progress(args.search, "search", "trials") as bar:
                result = search(cfg, args.search, storage=storage, budget=args.budget,
                                trial_epochs=args.trial_epochs, params=params,
                                log=lambda line: bar.write(f"tune: {line}"), progress=bar.update)  # fmt: skip
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
    budget = 60.0 if args.budget is None else args.budget
    # measured against the clock: the bar (or a line every ~10 s) counts the budget's seconds
    with Progress(budget, "tune", "s").follow_clock() as bar:
        rec = tune(cfg, budget=budget, train_budget=args.train_budget,
                   log=lambda line: bar.write(f"tune: {line}"))  # fmt: skip
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
