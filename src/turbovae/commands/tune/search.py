"""``turbovae tune --search N``: an Optuna search (``turbovae[search]``) over width, depth, latent size,
learning rate and β, scored on a validation share of the training split."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ... import evaluation, runtime
from ...config import Config, resolve
from ...engine.optim import kl_weight_at, lr_at
from ...engine.setup import Setup, setup
from ...errors import ConfigError, unknown_name
from ...models import model_spec
from .measure import Runner
from .rules import show

SEARCH_PARAMS = ("width", "depth", "latent", "lr", "beta")
Space = dict[str, tuple[str, Any, Any]]  # name -> (kind, low, high)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search needs Optuna: pip install 'turbovae[search]'") from None
    return optuna


def search_space(cfg: Config, params: Sequence[str]) -> Space:
    """name -> (kind, low, high) around the configured values: the width (the model spec's width list)
    ¼× to 2×, its depth 1 to 3 where the spec allows (MLP and sentence models; convolutional nets keep
    their levels), latent ¼× to 2×, learning rate ÷10 to ×10 and β ½× to 2× (log scales)."""
    unknown = [p for p in params if p not in SEARCH_PARAMS]
    if unknown:
        raise unknown_name("search parameter", unknown[0], SEARCH_PARAMS)
    m, t, spec = cfg.model, cfg.train, model_spec(cfg.model.name)
    space: Space = {
        "latent": ("int", max(2, m.latent // 4), m.latent * 2),
        "lr": ("float", t.lr / 10, t.lr * 10),
        "beta": ("float", t.beta / 2, t.beta * 2),
    }
    if spec.width is not None:
        width = getattr(m, spec.width)[0]
        space["width"] = ("int", max(8, width // 4), width * 2)
        if spec.depth:
            space["depth"] = ("int", 1, 3)
    if t.beta == 0:
        space.pop("beta")
    return {k: space[k] for k in SEARCH_PARAMS if k in space and k in params}


def apply_params(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with the searched values in place (validated). A width scales the whole width list (a
    convolutional net keeps its ratios between levels); a depth repeats the first width."""
    flags: dict[str, Any] = {}
    m, spec = cfg.model, model_spec(cfg.model.name)
    if spec.width is not None and ("width" in values or "depth" in values):
        widths = list(getattr(m, spec.width))
        width = int(values.get("width", widths[0]))
        if spec.depth:
            widths = [width] * int(values.get("depth", len(widths)))
        else:
            widths = [round(width * w / widths[0]) for w in widths]
        flags[f"model.{spec.width}"] = widths
    if "latent" in values:
        flags["model.latent"] = int(values["latent"])
    if "lr" in values:
        flags["train.lr"] = float(f"{values['lr']:.3g}")
    if "beta" in values:
        flags["train.beta"] = float(f"{values['beta']:.3g}")
    return resolve(base=cfg.to_dict(), flags=flags)


def _trial_run(
    s: Setup,
    cfg: Config,
    x_train: torch.Tensor,
    validate: Callable[[Any], float],
    epochs: int,
    report: Callable[[float, int], None],
) -> float:
    """Train a fresh model with ``cfg`` for ``epochs`` epochs over ``x_train``; ``report(nelbo, epoch)`` after
    each epoch with ``validate(vae)`` (it may raise optuna.TrialPruned). Returns the last validation NELBO."""
    runner = Runner(s, cfg, cfg.train.seed, x_train=x_train)
    batch = cfg.train.batch_size
    steps_per_epoch = max(1, len(x_train) // batch)
    total = epochs * steps_per_epoch
    value = math.inf
    for epoch in range(epochs):
        last = torch.zeros(())
        for _ in range(steps_per_epoch):
            step = runner.steps
            last = runner.step(batch, lr_at(cfg, step, total), kl_weight_at(cfg, step, total))
        if not math.isfinite(float(last)):
            return math.inf
        value = validate(runner.vae)
        report(value, epoch)
    return value


def _fit_and_validation(cfg: Config) -> tuple[Setup, torch.Tensor, Callable[[Any], float]]:
    """The set-up, the training examples trials train on, and the NELBO on the run's validation split
    (data.validation; a fixed draw under binarisation: every trial is scored on the same data)."""
    runtime.seed_everything(cfg.train.seed)
    s = setup(cfg)
    runtime.configure(s.device, cfg.train.threads)
    if not s.has_validation:
        raise ConfigError("--search scores trials on the validation split: set data.validation > 0")

    def validate(vae: Any) -> float:
        gen = runtime.generator(s.device, 12345)
        ev = evaluation.nelbo(vae, s.x_val, s.prepare_val, batch_size=cfg.eval.batch_size, generator=gen)
        return ev["nelbo"]

    return s, s.x_train, validate


def _objective(
    optuna: Any,
    s: Setup,
    cfg: Config,
    space: dict[str, tuple[str, Any, Any]],
    x_fit: torch.Tensor,
    validate: Callable[[Any], float],
    epochs: int,
    log: Callable[[str], None],
) -> Callable[[Any], float]:
    """Optuna's objective: a trial's config from its suggestions, trained and scored (pruned on the way)."""

    def objective(trial: Any) -> float:
        values = {}
        for pname, (kind, low, high) in space.items():
            if kind == "int":
                values[pname] = trial.suggest_int(pname, low, high, log=pname != "depth")
            else:
                values[pname] = trial.suggest_float(pname, low, high, log=True)
        trial_cfg = apply_params(cfg, values)

        def report(value: float, epoch: int) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                log(f"trial {trial.number}: pruned after epoch {epoch + 1} (validation NELBO {value:.2f})")
                raise optuna.TrialPruned()

        t0 = time.perf_counter()
        value = _trial_run(s, trial_cfg, x_fit, validate, epochs, report)
        shown = ", ".join(f"{k} {show(v)}" for k, v in values.items())
        if not math.isfinite(value):
            log(f"trial {trial.number}: {shown}: diverged")
            raise optuna.TrialPruned()
        log(f"trial {trial.number}: {shown}: validation NELBO {value:.2f} ({time.perf_counter() - t0:.1f} s)")
        return value

    return objective


def search(
    cfg: Config,
    n_trials: int,
    *,
    storage: Path,
    budget: float | None = None,
    trial_epochs: int | None = None,
    params: Sequence[str] = SEARCH_PARAMS,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """An Optuna search (TPE sampler, median pruning on the per-epoch validation NELBO) over ``params``
    around ``cfg``, until the study holds ``n_trials`` finished trials or ``budget`` seconds pass.

    Trials train ``trial_epochs`` epochs (default a fifth of train.epochs, at least 1) on the training
    examples and are scored by the NELBO of the validation split the run holds out (data.validation):
    the test split is left for the final run. The study lives in the SQLite file ``storage`` under a
    name derived from the config, the trial length and the parameters, so the same command resumes an
    interrupted search.

    Returns {"config": the best config (with the full epochs), "best_validation_nelbo", "trial" (its
    number), "params", "trials" (count per state), "trial_epochs", "study", "storage"}. ``progress`` is
    called with the number of trials finished (stored ones first, then 1 after each)."""
    optuna = _import_optuna()
    if n_trials < 1:
        raise ConfigError(f"--search must be >= 1 trials, got {n_trials}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"--budget must be > 0 seconds, got {budget}")
    epochs = trial_epochs if trial_epochs is not None else max(1, cfg.train.epochs // 5)
    if epochs < 1:
        raise ConfigError(f"--trial-epochs must be >= 1, got {epochs}")
    space = search_space(cfg, params)
    if not space:
        raise ConfigError(f"nothing to search: --search-params {','.join(params)} leaves no parameter here")
    s, x_fit, validate = _fit_and_validation(cfg)
    key = json.dumps({"config": cfg.to_dict(), "epochs": epochs, "space": space}, sort_keys=True, default=str)
    name = "turbovae-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    storage.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{storage}",
        load_if_exists=True,
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    # seeded past the stored trials: a resumed search does not propose its first points again
    study.sampler = optuna.samplers.TPESampler(seed=cfg.train.seed + len(study.trials))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done:
        log(f"resuming study {name} in {storage}: {done} of {n_trials} trials done")
    step = progress or (lambda n: None)
    step(min(done, n_trials))

    objective = _objective(optuna, s, cfg, space, x_fit, validate, epochs, log)
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done, timeout=budget, gc_after_trial=False,
                       callbacks=[lambda study, trial: step(1)])  # fmt: skip
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(
            f"no search trial finished (of {len(study.trials)}); raise --budget or --trial-epochs, or lower "
            "--lr"
        )
    best = study.best_trial
    states = [t.state.name.lower() for t in study.trials]
    return {
        "config": apply_params(cfg, best.params),
        "best_validation_nelbo": best.value,
        "trial": best.number,
        "params": best.params,
        "trials": {state: states.count(state) for state in sorted(set(states))},
        "trial_epochs": epochs,
        "study": name,
        "storage": str(storage),
    }
