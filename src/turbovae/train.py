"""The training loop: plain functions and one state dict.

``fit(cfg, out)`` loads the data, builds the VAE, trains, checkpoints, evaluates and writes the run
directory. The loss is read back to the host only every ``train.log_every`` steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed, evaluate, optim, runtime
from .config import Config, from_dict, parse_resize, to_yaml
from .data import Dataset, load_dataset
from .data.batches import binarize, preparer, value_range
from .data.text import bucketed, check_text_setup, lengths_of
from .errors import CheckpointError, ConfigError, DataError, TurboVAEError
from .likelihoods import build_likelihood
from .models import TEXT_MODELS, build_network
from .objectives import get_objective, noise_shape_of
from .optim import EMA, GradGuard, make_optimizer
from .report import as_images, save_grid
from .vae import VAE

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "samples.png",
    "reconstructions.png",
    "samples.txt",
    "reconstructions.txt",
    "interpolations.txt",
    "checkpoints",
)


class TrainingDiverged(TurboVAEError):
    """The loss became NaN or infinite."""


@dataclass
class Setup:
    """Everything built from a config before the first step."""

    cfg: Config
    device: torch.device
    data: Dataset
    x_train: torch.Tensor  # on the device, stored dtype (uint8 stays uint8)
    x_test: torch.Tensor  # on the device; fixed binarisation under dynamic binarisation
    train_max: float
    test_max: float
    binarize_mode: str  # resolved: none | static | dynamic
    vae: VAE
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16

    def prepare_test(self, raw: torch.Tensor) -> torch.Tensor:
        return preparer(self.test_max, False, None)(raw)

    def split(self, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(data, prepare) to evaluate a split on: binary data stay a fixed draw, so numbers repeat."""
        if name == "test":
            return self.x_test, self.prepare_test
        if self.binarize_mode == "dynamic":
            return binarize(self.x_train, self.train_max, seed=3), preparer(1.0, False, None)
        return self.x_train, preparer(self.train_max, False, None)


def resolve_binarize(mode: str, likelihood_support: str, binary: bool) -> str:
    if mode == "auto":
        return "dynamic" if likelihood_support == "binary" and not binary else "none"
    return mode


def build_vae(cfg: Config, event_shape: tuple[int, ...], data_meta: dict[str, Any] | None = None) -> VAE:
    m = cfg.model
    likelihood = build_likelihood(m.likelihood, event_shape, m.likelihood_scale, data_meta, m.mixtures)
    net = build_network(m.name, event_shape, m.latent, likelihood.params_per_dim, m)
    # a hierarchical net's latent vector is all its groups, flattened (the noise the loop draws)
    vae = VAE(net, likelihood, getattr(net, "latent_size", m.latent))
    vae.data_meta = data_meta or {}
    return vae


def setup(cfg: Config, device: torch.device | None = None, data_meta: dict[str, Any] | None = None) -> Setup:
    """Load and check the data and build the model: user errors surface here, before any file is written.

    ``data_meta``: a trained run's ``Dataset.meta``, whose fitted transforms (a table's) are reused."""
    device = device or runtime.select_device(cfg.train.device)
    data = load_dataset(
        cfg.data.name,
        resize=parse_resize(cfg.data.resize),
        test_fraction=cfg.data.test_fraction,
        split_seed=0,
        data_dir=cfg.data.dir,
        columns=cfg.data.columns,
        continuous_transform=cfg.data.continuous_transform,
        meta=data_meta,
        tokenizer=cfg.data.tokenizer,
        max_length=cfg.data.max_length,
        min_freq=cfg.data.min_freq,
    )
    low, high, binary = value_range(
        torch.cat([data.x_train.flatten(), data.x_test.flatten()]), data.max_value
    )
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"data '{data.name}' contains NaN or Inf values")
    vae = build_vae(cfg, data.event_shape, data.meta)
    mode = resolve_binarize(cfg.data.binarize, vae.likelihood.support, binary)
    if data.is_tokens or vae.likelihood.support == "tokens":  # text: no scaling and no binarisation
        check_text_setup(data, cfg.model.name, cfg.model.likelihood, cfg.data.binarize, TEXT_MODELS)
    if mode != "none" and (low < 0 or high > 1):
        raise DataError(
            f"binarisation needs data in [0, 1], but '{data.name}' has values in [{low:g}, {high:g}]"
        )
    if mode != "none":
        binary, low, high = True, 0.0, 1.0
    vae.likelihood.check_data(low, high, binary, data.name)
    if len(data.x_train) < cfg.train.batch_size:
        raise DataError(
            f"data '{data.name}' has {len(data.x_train)} training examples, fewer than train.batch_size "
            f"= {cfg.train.batch_size}; lower --batch-size"
        )
    if len(data.x_test) == 0:
        raise DataError(f"data '{data.name}' has an empty test split")
    x_train, x_test, train_max, test_max = data.x_train, data.x_test, data.max_value, data.max_value
    if mode == "static":
        x_train, train_max = binarize(x_train, data.max_value, seed=1), 1.0
    if mode in ("static", "dynamic"):
        x_test, test_max = binarize(x_test, data.max_value, seed=2), 1.0
    if cfg.model.name == "conv" and device.type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # cuDNN prefers NHWC
    precision = runtime.resolve_precision(cfg.train.precision, device)
    return Setup(cfg, device, data, x_train.to(device), x_test.to(device), train_max, test_max, mode,
                 vae.to(device), precision)  # fmt: skip


# ---- run directory ---------------------------------------------------------------------------------


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing run is never replaced without --overwrite, nor continued without --resume."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise CheckpointError(
                f"cannot resume {out}: no config.yaml there (is it a turbovae run directory?)"
            )
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace it, "
            f"--resume {out} to continue it, or --out for a new directory"
        )


def _clear_run(out: Path) -> None:
    """Remove a previous run's files (only those turbovae writes) before an --overwrite run starts."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as written. ``path`` None: a log that writes
    nothing (the ranks other than 0 of a data-parallel run)."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115 - close()

    def echo(self, message: str) -> None:
        """A warning on stderr, once per job (from the rank that writes the log)."""
        if self.file is not None:
            print(f"turbovae: warning: {message}", file=sys.stderr)

    def write(self, event: str, **values: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, **values}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---- checkpoint state --------------------------------------------------------------------------------


def _rng_state(gens: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"rng.{name}": g.get_state() for name, g in gens.items()}
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    return tensors, meta


def _load_rng_state(
    gens: dict[str, torch.Generator], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ---- the loop ------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, out: Path) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step, self.out = signum, step, out


@dataclass
class TrainState:
    """What a checkpoint holds, besides the config: the objects a step changes and the loop position."""

    vae: VAE
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    gens: dict[str, torch.Generator]  # "data": order and binarisation, "model": reparameterisation noise
    perm: torch.Tensor  # this epoch's order of the training examples
    loop: dict[str, Any]  # step, epoch, batch_in_epoch, train_seconds, examples, best_test_nelbo, ...
    guard: GradGuard  # the running gradient-norm statistics of the skip decision
    ema: EMA | None = None  # the weight average (train.ema > 0)

    def tensors_and_meta(self, s: Setup) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt_tensors, opt_meta = checkpoint.optimizer_state(self.opt)
        rng_tensors, rng_meta = _rng_state(self.gens)
        tensors = {f"model.{k}": v for k, v in self.vae.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors["loop.perm"] = self.perm
        tensors.update({f"guard.{k}": v for k, v in self.guard.state.items()})
        if self.ema is not None:
            tensors.update(self.ema.state())
        meta = {
            "optimizer": opt_meta,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_meta,
            "loop": dict(self.loop),
            "config": s.cfg.to_dict(),
            "event_shape": list(s.data.event_shape),
            "max_value": s.data.max_value,
            "data_meta": s.data.meta,
            "binarize": s.binarize_mode,
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: Path) -> None:
        try:
            self.vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            checkpoint.load_optimizer_state(self.opt, tensors, meta["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: {str(e).splitlines()[0]}"
            ) from None
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        _load_rng_state(self.gens, tensors, meta["rng"])
        self.perm = tensors["loop.perm"].to(self.perm.device)
        for k, v in self.guard.state.items():
            if f"guard.{k}" in tensors:
                v.copy_(tensors[f"guard.{k}"])
        if self.ema is not None:
            self.ema.load(tensors)
        self.loop.update(meta["loop"])


def kl_weight(
    cfg: Config, step: int, device: torch.device | None = None, total_steps: int = 1
) -> torch.Tensor:
    """β of the 0-based global ``step`` (KL warm-up or cyclical annealing, see optim.kl_weight_at), a 0-dim
    tensor (a step argument, so that the compiled step is not specialised on it)."""
    return torch.tensor(optim.kl_weight_at(cfg, step, total_steps), device=device)


# The step's statistics, accumulated on the device and read back at the log interval: the four loss
# terms summed over the applied steps, the number of applied steps, of skipped ones, and the gradient
# norm summed over the applied steps.
STATS = ("loss", "nelbo", "rec", "kl", "applied", "skipped", "grad_norm")


class Task(nn.Module):
    """The VAE and its objective as one module (timm's Task): ``forward(x, eps, beta)`` returns the
    objective's terms. Data-parallel runs wrap it in DDP, which syncs what runs through its forward."""

    def __init__(self, vae: VAE, cfg: Config) -> None:
        super().__init__()
        self.vae = vae
        self.objective = functools.partial(get_objective(cfg.train.objective), beta=cfg.train.beta,
                                           k=cfg.train.iwae_k, free_bits=cfg.train.free_bits)  # fmt: skip

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, beta: float | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if beta is None:
            return self.objective(self.vae, x, eps=eps)
        return self.objective(self.vae, x, eps=eps, beta=beta)


def make_step(
    vae: VAE,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    device: torch.device,
    precision: str = "fp32",
    guard: GradGuard | None = None,
    ema: EMA | None = None,
    forward: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> Callable[..., torch.Tensor]:
    """One optimisation step on a prepared batch ``x`` with reparameterisation noise ``eps``: the loss,
    its gradient, the guard (clipping; a NaN/Inf or, with train.skip_grad, an outlying gradient skips
    the step through the optimiser's found_inf), the update and the weight average.

    ``forward``: the objective's forward ``(x, eps, beta) -> terms``, by default ``Task(vae, cfg)``;
    data-parallel runs pass the DDP-wrapped Task, whose backward averages the gradients over the ranks
    (the guard then sees the same global gradient on every rank, so skip decisions agree).

    Returns the ``STATS`` vector on the device: nothing here waits for the device, so the whole step
    can be compiled, or captured as one CUDA graph.
    """
    forward = forward or Task(vae, cfg)
    params = [p for p in vae.parameters() if p.requires_grad]
    guard = guard or GradGuard(cfg, params, device)
    if scaler is not None and cfg.train.skip_grad:
        raise ConfigError(
            "train.skip_grad needs precision bf16 or fp32 (fp16's scaler already skips inf steps)"
        )

    # the optimiser reads its skip flag from this tensor (set once here: an attribute assignment inside
    # the step would break torch.compile's tracing on some versions)
    found_inf = torch.zeros((), device=device)
    if scaler is None:
        opt.found_inf = found_inf  # type: ignore[attr-defined]

    def step(x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
        """``beta``: this step's KL weight (a 0-dim tensor, under a KL schedule), else train.beta."""
        with runtime.autocast(device, precision):
            terms = forward(x, eps, beta)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: the scaler skips non-finite steps itself
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(opt)
            keep = guard()
            scaler.step(opt)
            scaler.update()
        else:
            terms["loss"].backward()
            keep = guard()
            found_inf.copy_(~keep)  # 1: the optimiser skips the step
            opt.step()
        if ema is not None:
            ema.update()
        zero = torch.zeros((), device=device)
        values = [torch.where(keep, terms[k].detach().float(), zero) for k in STATS[:4]]
        return torch.stack([*values, keep.float(), (~keep).float(), guard.state["last_norm"] * keep])

    return step


class NoiseProbe:
    """The gradient-noise scale B_simple = tr(Σ)/|G|² during training (McCandlish et al. 2018): every
    ``train.noise_scale_every`` steps (default: the log interval) one extra backward pass on half the
    batch, before the step, gives |G_small|²; the step's own gradient norm gives |G_big|² at the same
    parameters. The estimator (tune.NoiseScale) smooths both and logs ``noise_scale``, an
    estimate of the critical batch size. Costs one half-batch backward per probe (1% at every 50 steps)."""

    def __init__(self, cfg: Config, vae: VAE, device: torch.device, precision: str) -> None:
        from .tune import NoiseScale  # here: tune imports the training loop

        every = cfg.train.noise_scale_every or cfg.train.log_every
        self.every = max(every, 0)
        self.device, self.precision = device, precision
        self.task = Task(vae, cfg)  # not DDP's: the probe's gradient is this rank's own
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.estimator = NoiseScale()
        self.g2_small: torch.Tensor | None = None
        self.b_small = 0

    def due(self, step: int, batch: int) -> bool:
        return bool(self.every) and step % self.every == 0 and batch >= 4

    def small(self, x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None) -> None:
        h = len(x) // 2
        with runtime.autocast(self.device, self.precision):
            loss = self.task(x[:h], eps.narrow(-2, 0, h), beta)["loss"]
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.g2_small = sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(()))
        self.b_small = h

    def big(self, norm: torch.Tensor, batch: int) -> None:
        g2_big = norm.square()
        if self.g2_small is not None and torch.isfinite(self.g2_small) & torch.isfinite(g2_big):
            self.estimator.update(self.g2_small, self.b_small, g2_big, batch)

    def log(self) -> dict[str, float]:
        value = self.estimator.value if self.every else None
        value = None if value is None else float(value)
        return {"noise_scale": value} if value is not None and math.isfinite(value) else {}


class Snapshot:
    """The last good state (model, optimiser, guard, weight average) in memory, taken at each log
    interval without NaN/Inf gradients; ``restore`` copies it back in place (the tensors a compiled or
    graph-captured step holds stay the same objects)."""

    def __init__(self, st: TrainState) -> None:
        self.st, self.step = st, 0
        self.take()

    def _tensors(self) -> dict[str, list[torch.Tensor]]:
        st = self.st
        return {
            "model": list(st.vae.state_dict().values()),
            "optim": [v for p in st.opt.state.values() for v in p.values() if isinstance(v, torch.Tensor)],
            "guard": list(st.guard.state.values()),
            "ema": [*st.ema.params, st.ema.updates] if st.ema is not None else [],
        }

    @torch.no_grad()
    def take(self) -> None:
        self.saved = {k: [t.detach().clone() for t in ts] for k, ts in self._tensors().items()}
        self.step = self.st.loop["step"]

    @torch.no_grad()
    def restore(self) -> None:
        for key, tensors in self._tensors().items():
            saved = self.saved[key]
            if key == "optim" and len(saved) != len(tensors):  # taken before the first step: a fresh state
                saved = [torch.zeros_like(t) for t in tensors]
            for t, v in zip(tensors, saved, strict=True):
                t.copy_(v)


MAX_ROLLBACKS = 3


def _roll_back(snapshot: Snapshot, loop: dict[str, Any], log: MetricsLog, run: int, out: Path) -> None:
    """The NaN guard's second line: after ``run`` non-finite gradients in a row, return to the last good
    state with half the learning rate; after MAX_ROLLBACKS of these, stop."""
    loop["rollbacks"] += 1
    if loop["rollbacks"] > MAX_ROLLBACKS:
        raise TrainingDiverged(
            f"NaN/Inf gradients kept coming after {MAX_ROLLBACKS} roll-backs (near step {loop['step']}); "
            "lower "
            f"--lr or check the data; the last checkpoint is in {out / 'checkpoints'}"
        )
    snapshot.restore()
    loop["lr_scale"] *= 0.5
    msg = (f"{run} steps in a row had NaN/Inf gradients near step {loop['step']}: rolled back to the state "
           f"of step {snapshot.step}, learning rate now x{loop['lr_scale']:g}")  # fmt: skip
    log.write("rollback", step=loop["step"], to_step=snapshot.step, bad_steps=run, lr_scale=loop["lr_scale"])
    log.echo(msg)


def averaged(ema: EMA | None) -> contextlib.AbstractContextManager[None]:
    """The weight average in the model while evaluating and drawing pictures (train.ema > 0)."""
    return ema.swapped() if ema is not None else contextlib.nullcontext()


COLLAPSE_EXAMPLES = 2000  # test examples the per-epoch active-unit count looks at


def collapse_check(s: Setup, log: MetricsLog, loop: dict[str, Any]) -> dict[str, Any]:
    """Active units (Burda et al.'s criterion) and KL per latent dimension on the first test examples,
    for metrics.jsonl; a warning, once, when most units are inactive (posterior collapse)."""
    q = evaluate.encode_all(
        s.vae, s.x_test[:COLLAPSE_EXAMPLES], s.prepare_test, batch_size=s.cfg.eval.batch_size
    )
    active, _ = evaluate.active_units(q)
    kl = evaluate.kl_per_dim(q)
    # early epochs often look collapsed and recover (the decoder learns first): warn from a quarter on
    late = loop["epoch"] >= max(1, s.cfg.train.epochs // 4)
    if active < len(kl) / 2 and late and not loop.get("collapse_warned"):
        loop["collapse_warned"] = True
        which = " of the top group" if getattr(s.vae.net, "hierarchical", False) else ""
        msg = (f"posterior collapse: {active} of {len(kl)} latent units{which} are active after epoch "
               f"{loop['epoch']}; "
               "remedies: train.kl_warmup_steps or train.kl_cycles (anneal β), train.free_bits, a lower "
               "train.beta, model.word_dropout for text")  # fmt: skip
        log.write("warning", step=loop["step"], message=msg)
        log.echo(msg)
    return {"active_units": active, "kl_per_dim": [round(v, 5) for v in kl]}


def _check_shares(s: Setup, ctx: distributed.Context) -> None:
    """Data-parallel: enough training examples for one global batch, and test examples for every rank."""
    need = s.cfg.train.batch_size * ctx.world
    if len(s.x_train) < need:
        raise DataError(
            f"data '{s.data.name}' has {len(s.x_train)} training examples, fewer than one global batch: "
            f"train.batch_size {s.cfg.train.batch_size} per rank x {ctx.world} ranks = {need}; lower "
            "--batch-size or use fewer ranks"
        )
    if len(s.x_test) < ctx.world:
        raise DataError(f"data '{s.data.name}' has {len(s.x_test)} test examples, fewer than the {ctx.world} "
                        "ranks that share the evaluation")  # fmt: skip


def _saved_data_meta(out: Path) -> dict[str, Any] | None:
    """The Dataset.meta the run's checkpoints recorded (the same in all): a resumed run encodes its
    data with the transforms it was trained with, not refitted ones."""
    for path in sorted((out / "checkpoints").glob("step-*.json"), reverse=True):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text()).get("data_meta")
    return None


def _start(out: Path, cfg: Config, overwrite: bool, resume: bool) -> Path | None:
    """Prepare the run directory; on resume, the checkpoint to continue from (None: from the start)."""
    if resume:
        checkpoint.clean_temporary(out)  # left by a process killed while writing
        return checkpoint.latest(out)
    if overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def fit(
    cfg: Config,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train a VAE as configured and write the run directory ``out``. Returns the summary.

    With ``resume=True`` the run in ``out`` continues from its newest valid checkpoint (or from the
    start if it has none); ``cfg`` should be its saved config with at most ``train.epochs`` and
    ``train.time_limit`` changed (``turbovae train --resume`` allows no other change).

    Under torchrun with several ranks the run is data-parallel (see ``turbovae.distributed``): every
    rank calls ``fit`` with the same arguments, rank 0 alone writes ``out``; when torchrun restarts
    the workers (``--max-restarts``), they continue from the newest checkpoint.
    """
    out = Path(out)
    timeout = cfg.train.dist_timeout
    ctx = distributed.start(cfg.train.device, timeout)
    if distributed.restarted() and (out / "config.yaml").is_file():
        overwrite, resume = False, True  # torchrun restarted the workers: continue, never clear
    finished = False
    try:
        summary = _fit(cfg, out, ctx, overwrite=overwrite, resume=resume, progress=progress)
        finished = True
        return summary
    except Exception as e:
        if ctx.world > 1 and distributed.is_comm_failure(e):
            # torchrun's agent SIGTERMs the survivors as soon as it sees a rank die: let this one say
            # why it stops (the process is ending anyway)
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise distributed.lost_contact(e, ctx, out) from None
        raise
    finally:
        ctx.close(finished)


def _fit(
    cfg: Config, out: Path, ctx: distributed.Context, *, overwrite: bool, resume: bool, progress: bool | None
) -> dict[str, Any]:
    if ctx.main:  # rank 0 alone decides about the directory it alone writes
        check_out_dir(out, overwrite, resume)
    runtime.seed_everything(cfg.train.seed)
    # every user error in config or data is raised here, before any file is touched
    s = setup(cfg, device=ctx.device, data_meta=_saved_data_meta(out) if resume else None)
    if ctx.world > 1:
        _check_shares(s, ctx)
    runtime.configure(s.device, cfg.train.threads)
    vae, device = s.vae, s.device
    opt = make_optimizer(cfg, vae, device)
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    guard = GradGuard(cfg, [p for p in vae.parameters() if p.requires_grad], device)
    ema = EMA(vae, cfg.train.ema) if cfg.train.ema else None
    gens = {
        "data": runtime.generator(device, cfg.train.seed),
        "model": runtime.generator(device, cfg.train.seed + 1),
    }
    loop: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "examples": 0,
            "best_test_nelbo": None, "skipped": 0, "rollbacks": 0, "lr_scale": 1.0}  # fmt: skip
    st = TrainState(vae, opt, scaler, gens, torch.empty(0, dtype=torch.long, device=device), loop, guard, ema)
    state_json = ctx.broadcast(_start(out, cfg, overwrite, resume) if ctx.main else None)  # rank 0's choice
    if state_json is not None:
        st.restore(*checkpoint.load(state_json), source=state_json)
        loop.pop("time_limited", None)  # a resumed run is stopped (or not) by its own train.time_limit
    # the global batch is the run's (train.batch_size x the ranks it started with; runs from before
    # data-parallel training: train.batch_size): any number of ranks continues it at the same global step
    started_with = ctx.world if state_json is None else 1
    global_batch = loop.setdefault("global_batch", cfg.train.batch_size * started_with)
    batch = distributed.local_batch(global_batch, ctx.world, cfg.train.batch_size)  # this rank's share
    lr_factor = distributed.lr_factor(cfg, global_batch / cfg.train.batch_size)
    ctx.decorrelate(cfg.train.seed, loop["step"])
    if ctx.main:
        (out / "config.yaml").write_text(to_yaml(cfg))
    cfg = distributed.scaled_lr(cfg, lr_factor)  # the learning rate of the global batch (as saved: unscaled)
    log = MetricsLog(out / "metrics.jsonl" if ctx.main else None)
    ranks = (
        {"ranks": ctx.world, "global_batch": global_batch, "lr_factor": lr_factor} if ctx.world > 1 else {}
    )
    log.write("start", step=loop["step"], resumed=resume, device=runtime.describe(device),
              params=sum(p.numel() for p in vae.parameters()), binarize=s.binarize_mode, **ranks)  # fmt: skip

    def save_checkpoint(name: str | None = None) -> None:
        """A step checkpoint (the newest ``keep_checkpoints`` are kept), or one with a fixed name."""
        if not ctx.main:
            return
        tensors, meta = st.tensors_and_meta(s)
        if name is None:
            path = checkpoint.save(out, loop["step"], tensors, meta, keep=cfg.train.keep_checkpoints)
        else:
            path = checkpoint.save_named(out, name, tensors, meta)
        log.write("checkpoint", step=loop["step"], path=str(path.relative_to(out)))

    prepare = preparer(s.train_max, s.binarize_mode == "dynamic", gens["data"])
    n_train = len(s.x_train)
    steps_per_epoch = n_train // global_batch  # equal-sized batches: fixed shapes, no tiny last batch
    tokens = s.data.is_tokens
    # data-parallel: a dynamic binarisation draw and a text batch's trim are made for the global batch
    # (as one process would), then sliced; other data are sliced first
    whole = tokens or s.binarize_mode == "dynamic"
    if tokens:  # text: every line once per epoch, a smaller last batch (data-parallel runs, now or at
        # their start, drop it: the ranks' shares stay equal)
        if ctx.world == 1 and global_batch == s.cfg.train.batch_size:
            steps_per_epoch = -(-n_train // global_batch)
        lengths = lengths_of(s.x_train)
        mean_tokens = lengths.double().mean().item()
    total_steps = cfg.train.epochs * steps_per_epoch
    anneal = bool(cfg.train.kl_warmup_steps or cfg.train.kl_cycles)  # β changes during the run

    def extra_log(speed: float) -> dict[str, float]:
        """The KL weight of the last step under a KL schedule; tokens/s for text (end markers included)."""
        extra = {"kl_weight": optim.kl_weight_at(cfg, loop["step"] - 1, total_steps)} if anneal else {}
        return {**extra, "tokens_per_second": speed * mean_tokens} if tokens else extra

    lr_now = optim.lr_tensor(opt)
    scheduled = cfg.train.schedule != "constant" or cfg.train.warmup_steps > 0
    if lr_factor != 1.0:  # the scaled rate from the first step on (the loop refills it only under schedules)
        lr_now.fill_(optim.lr_at(cfg, loop["step"], total_steps) * loop["lr_scale"])
    probe = NoiseProbe(cfg, vae, device, s.precision)
    snapshot = Snapshot(st)  # the last good state, for the NaN guard's rollback
    m = cfg.model
    forward, compiled_forward = None, False
    if ctx.world > 1:  # model + objective in DDP, compiled before wrapping (the step itself runs eagerly)
        mode = cfg.train.compile
        compiled_forward = mode == "on" or (mode == "auto" and device.type == "cuda")
        task = Task(vae, cfg)
        forward = ctx.wrap(runtime.compile_fn(task, device) if compiled_forward else task)  # type: ignore[arg-type]
    step = runtime.StepCompiler(
        make_step(vae, opt, scaler, cfg, device, s.precision, guard, ema, forward),
        cfg.train.compile if forward is None else "off",
        device,
        key=f"{device.type}|{torch.__version__}|{m.name}|{s.data.event_shape}|{m.hidden}|{m.channels}|"
        f"{m.latent}|{m.likelihood}|{cfg.train.objective}|{s.precision}|{batch}"
        + (f"|{m.groups}|{m.latent_channels}|{m.enc_blocks}|{m.patch}" if m.name == "hvae" else ""),
        remaining_steps=total_steps - loop["step"],
        graphs=cfg.train.cuda_graph and not tokens and scaler is None and forward is None,
    )
    show = (sys.stderr.isatty() if progress is None else progress) and ctx.main
    bar = tqdm(total=total_steps, initial=loop["step"], disable=not show, unit="step", dynamic_ncols=True)
    halt = False  # data-parallel: whether any rank was asked to stop, agreed at the last log interval

    def past_limit(train_seconds: float) -> bool:  # train.time_limit (0: none)
        return 0 < cfg.train.time_limit <= train_seconds

    # the time limit reached (agreed over the ranks at the last log interval); a resumed run whose
    # training seconds (the same on every rank: they come from the checkpoint) are already past it
    # takes no step
    over = past_limit(loop["train_seconds"])
    sums = torch.zeros(len(STATS), device=device)  # accumulated on the device, read back at the log interval
    since_log, t_log, examples_at_log = 0, time.perf_counter(), loop["examples"]
    vae.train()
    try:
        with _StopFlag() as stop:
            t_segment = time.perf_counter()
            while loop["epoch"] < cfg.train.epochs and not over:
                if loop["batch_in_epoch"] == 0:
                    st.perm = torch.randperm(n_train, generator=gens["data"], device=device)
                    if tokens:  # length buckets: little padding in each batch
                        st.perm = bucketed(st.perm, lengths, global_batch, gens["data"])
                for b in range(loop["batch_in_epoch"], steps_per_epoch):
                    raw = s.x_train[st.perm[b * global_batch : (b + 1) * global_batch]]
                    # this rank's rows rank::world of the global batch (one rank: all of it)
                    x = ctx.shard(prepare(raw)) if whole else prepare(ctx.shard(raw))
                    n_global = len(x) * ctx.world
                    shape = noise_shape_of(cfg.train.objective, n_global, vae.latent, cfg.train.iwae_k)
                    eps = ctx.shard(torch.randn(shape, generator=gens["model"], device=device), dim=-2)
                    # schedules (lr, β) follow the global step, so a resumed run continues them exactly
                    if scheduled or loop["lr_scale"] != 1.0:
                        lr_now.fill_(optim.lr_at(cfg, loop["step"], total_steps) * loop["lr_scale"])
                    beta = kl_weight(cfg, loop["step"], device, total_steps) if anneal else None
                    probing = probe.due(loop["step"], len(x))
                    if probing:
                        probe.small(x, eps, beta)  # the half batch's gradient, before the step moves θ
                    sums += step(x, eps) if beta is None else step(x, eps, beta)
                    if probing:
                        probe.big(guard.state["last_norm"], len(x) * ctx.world)
                    since_log += 1
                    loop["step"] += 1
                    loop["batch_in_epoch"] = b + 1
                    loop["examples"] += len(x) * ctx.world
                    if loop["step"] % cfg.train.log_every == 0 or b + 1 == steps_per_epoch:
                        over = past_limit(loop["train_seconds"] + time.perf_counter() - t_segment)
                        # data-parallel: over ranks (any rank's signal or clock stops them all)
                        halt, over = ctx.reduce_stats(sums, stop.signal is not None, over)
                        totals = dict(zip(STATS, sums.tolist(), strict=True))  # the host sync
                        max_run, nonfinite = guard.state["max_run"].item(), guard.state["nonfinite"].item()
                        now = time.perf_counter()
                        speed = (loop["examples"] - examples_at_log) / (
                            now - t_log
                        )  # text: last batch smaller
                        applied = totals["applied"]
                        terms = {k: totals[k] / applied if applied else math.nan for k in STATS[:4]}
                        if applied and not math.isfinite(terms["loss"]):
                            raise TrainingDiverged(
                                f"the loss became {terms['loss']} near step {loop['step']}; "
                                f"lower --lr (now {cfg.train.lr:g}) or check the data; "
                                f"the last checkpoint is in {out / 'checkpoints'}"
                            )
                        loop["skipped"] += int(totals["skipped"])
                        log.write("train", step=loop["step"], epoch=loop["epoch"] + (b + 1) / steps_per_epoch,
                                  **terms, lr=lr_now.item(), grad_norm=totals["grad_norm"] / max(applied, 1),
                                  skipped=int(totals["skipped"]), skipped_total=loop["skipped"],
                                  **probe.log(), samples_per_second=speed, **extra_log(speed))  # fmt: skip
                        bar.set_postfix(
                            epoch=loop["epoch"] + 1, loss=f"{terms['loss']:.2f}", samples_s=f"{speed:,.0f}"
                        )
                        bar.update(since_log)
                        sums.zero_()
                        guard.state["max_run"].zero_()
                        guard.state["nonfinite"].zero_()
                        if max_run >= cfg.train.nan_patience:  # the NaN guard: back to the last good state
                            _roll_back(snapshot, loop, log, int(max_run), out)
                        elif not nonfinite:
                            snapshot.take()
                        since_log, t_log, examples_at_log = 0, now, loop["examples"]
                    every = cfg.train.checkpoint_every
                    stopping = stop.signal is not None if ctx.world == 1 else halt  # ranks stop together
                    if stopping or (every and loop["step"] % every == 0):
                        loop["train_seconds"] += time.perf_counter() - t_segment
                        save_checkpoint()
                        t_segment = time.perf_counter()
                        if stopping:
                            raise Interrupted(stop.signal or signal.SIGTERM, loop["step"], out)
                    if over:
                        break
                # the epoch is complete unless the time limit broke it off (>=: a text run resumed on
                # more ranks has fewer batches per epoch than the one that saved it)
                completed = not over or loop["batch_in_epoch"] >= steps_per_epoch
                if completed:
                    loop["epoch"] += 1
                    loop["batch_in_epoch"] = 0
                loop["train_seconds"] += time.perf_counter() - t_segment
                if not cfg.train.checkpoint_every:
                    save_checkpoint()  # (with checkpoint_every, the final save after the loop writes it)
                if completed and cfg.eval.every_epoch:
                    # the same evaluation noise every epoch: the curve shows the model change, not noise
                    with averaged(ema):
                        ev = evaluate.nelbo(vae, s.x_test, s.prepare_test, batch_size=cfg.eval.batch_size,
                                            generator=runtime.generator(device, 12345))  # fmt: skip
                        units = collapse_check(s, log, loop)
                    log.write("eval", step=loop["step"], epoch=loop["epoch"], split="test",
                              **{f"test_{k}": v for k, v in ev.items()}, **units)  # fmt: skip
                    if loop["best_test_nelbo"] is None or ev["nelbo"] < loop["best_test_nelbo"]:
                        loop["best_test_nelbo"] = ev["nelbo"]
                        save_checkpoint("best")  # the model with the lowest test NELBO so far
                t_segment, t_log = time.perf_counter(), time.perf_counter()
    finally:
        bar.close()
    if over and loop["epoch"] < cfg.train.epochs:  # train.time_limit stopped the run before its end
        loop["time_limited"] = loop["epoch"] + loop["batch_in_epoch"] / steps_per_epoch
        log.write("time_limit", step=loop["step"], train_seconds=loop["train_seconds"],
                  epoch=loop["time_limited"])  # fmt: skip
    step.record()
    loop["compile"] = step.decision
    if ctx.world > 1:
        loop["compile"] = f"{'compiled forward' if compiled_forward else 'eager'}, DDP over {ctx.world} ranks"
    if cfg.train.checkpoint_every and loop["step"] % cfg.train.checkpoint_every:
        save_checkpoint()  # the final state, when it did not fall on a checkpoint step
    summary = finish(s, out, loop, ema, write=ctx.main)
    log.write("end", **summary)
    log.close()
    return summary


def finish(
    s: Setup, out: Path, loop: dict[str, Any], ema: EMA | None = None, write: bool = True
) -> dict[str, Any]:
    """Final evaluation, pictures and summary.json (with the weight average, where there is one).

    Data-parallel runs: every rank evaluates its share; only rank 0 (``write``) writes files."""
    with averaged(ema):
        return _finish(s, out, loop, write)


def _finish(s: Setup, out: Path, loop: dict[str, Any], write: bool = True) -> dict[str, Any]:
    cfg, vae = s.cfg, s.vae
    t0 = time.perf_counter()
    eval_gen = runtime.generator(s.device, 54321)
    ev = evaluate.nelbo(vae, s.x_test, s.prepare_test, batch_size=cfg.eval.batch_size, generator=eval_gen)
    no_iwae = {"nll": None, "stderr": None, "k": 0}  # eval.iwae_k = 0: skipped
    iw = (
        no_iwae
        if not cfg.eval.iwae_k
        else evaluate.iwae_nll(
            vae,
            s.x_test,
            s.prepare_test,
            k=cfg.eval.iwae_k,
            batch_size=max(1, cfg.eval.batch_size // 10),
            generator=eval_gen,
        )
    )
    if write:
        write_pictures(s, out)
    dims = math.prod(s.data.event_shape)
    discrete = vae.likelihood.discrete
    summary = {
        "test_nelbo": ev["nelbo"],
        "test_rec": ev["rec"],
        "test_kl": ev["kl"],
        "test_nll_iwae": iw["nll"],
        "test_nll_iwae_stderr": iw["stderr"],
        "iwae_k": iw["k"],
        "test_bpd": evaluate.bits_per_dim(ev["nelbo"], dims) if discrete else None,
        "test_bpd_iwae": evaluate.bits_per_dim(iw["nll"], dims)
        if discrete and iw["nll"] is not None
        else None,
        "train_seconds": loop["train_seconds"],
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": runtime.process_seconds(),
        "samples_per_second": loop["examples"] / max(loop["train_seconds"], 1e-9),
        "epochs": loop["epoch"],
        # train.time_limit stopped the run after this many epochs (a fraction: mid-epoch); absent otherwise
        **({"time_limited_epochs": loop["time_limited"]} if "time_limited" in loop else {}),
        "steps": loop["step"],
        "params": sum(p.numel() for p in vae.parameters()),
        "device": runtime.describe(s.device),
        "precision": s.precision,
        "compile": loop.get("compile", "eager"),
        "data": s.data.name,
        "n_train": len(s.x_train),
        "n_test": len(s.x_test),
        "binarize": s.binarize_mode,
        "model": cfg.model.name,
        "likelihood": cfg.model.likelihood,
        "objective": cfg.train.objective,
        "skipped_steps": loop.get("skipped", 0),
        "rollbacks": loop.get("rollbacks", 0),
        "ema": cfg.train.ema,
    }
    if loop.get("global_batch", cfg.train.batch_size) != cfg.train.batch_size:  # data-parallel
        summary["global_batch"] = loop["global_batch"]
    if not write:
        return summary
    if s.data.is_tokens:  # text: nats per token, perplexity, active units, reconstruction accuracy
        from .text import text_summary

        summary.update(text_summary(s, ev, iw, loop))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@torch.no_grad()
def write_pictures(s: Setup, out: Path, n_samples: int = 64, n_recon: int = 16) -> None:
    """samples.png (prior samples, E[x|z]) and reconstructions.png (inputs above, outputs below).

    Text runs write samples.txt, reconstructions.txt and interpolations.txt instead."""
    if s.data.is_tokens:
        from .text import write_text_outputs

        return write_text_outputs(s, out)
    vae = s.vae
    vae.eval()
    shape = s.data.event_shape
    samples = vae.sample(n_samples, generator=runtime.generator(s.device, 7))
    save_grid(as_images(samples, shape), out / "samples.png", nrow=8)
    x = s.prepare_test(s.x_test[:n_recon])
    recon = vae.reconstruct(x)
    both = torch.cat([as_images(x, shape), as_images(recon, shape)])
    save_grid(both, out / "reconstructions.png", nrow=min(n_recon, len(x)))
    vae.train()


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The trained model of a run directory (newest valid checkpoint), in eval mode.

    The returned VAE has ``encode(x)``, ``decode(z)``, ``sample(n)``, and carries ``config`` (the run's
    Config) and ``max_value`` (inputs are ``stored_values / max_value``).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a turbovae run directory (no config.yaml)")
    import yaml

    try:
        cfg = from_dict(yaml.safe_load(cfg_path.read_text()) or {})
    except yaml.YAMLError as e:
        raise CheckpointError(f"{cfg_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    state_json = checkpoint.latest(run_dir)
    if state_json is None:
        raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}")
    tensors, meta = checkpoint.load(state_json)
    if "event_shape" not in meta:
        raise CheckpointError(f"checkpoint {state_json} does not record the data shape (event_shape)")
    shape = tuple(meta["event_shape"])
    vae = build_vae(cfg, shape, meta.get("data_meta"))
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if cfg.train.ema:  # the weight average is the model the run evaluated and sampled
        weights.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {state_json} does not fit its config: {str(e).splitlines()[0]}"
        ) from None
    vae.config = cfg
    vae.max_value = float(meta.get("max_value", 1.0))
    return vae.to(device).eval()
