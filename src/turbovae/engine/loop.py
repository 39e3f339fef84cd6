"""The training loop: plain functions and one state dict.

``fit(cfg, out)`` loads the data, builds the VAE, trains, checkpoints, evaluates and writes the run
directory. The loss is read back to the host only every ``train.log_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import evaluation, runtime
from ..config import Config, to_yaml
from ..data import mapwatch
from ..data.batches import gather
from ..data.text import bucketed
from ..errors import CheckpointError
from ..models import model_spec
from ..objectives import noise_shape_of
from ..progress import Progress
from . import checkpoint, distributed, hardware, optim, privacy, rundir, tracking
from .finish import averaged, collapse_check, finish, tracked_pictures
from .noise import NoiseProbe
from .optim import GradGuard, make_optimizer, weight_average
from .rundir import MetricsLog, check_out_dir, prepare_dir, saved_data_meta
from .setup import Setup, check_shares, setup
from .state import Snapshot, TrainingDiverged, TrainState, roll_back
from .step import STATS, Task, kl_weight, make_step
from .tracking import Tracker

if TYPE_CHECKING:
    from ..data.tables import Table


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


def fit(
    cfg: Config,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool | None = None,
    rows: Table | None = None,
) -> dict[str, Any]:
    """Train a VAE as configured and write the run directory ``out``. Returns the summary.

    ``rows``: a table's rows in memory, typed already (``TableSynthesizer.fit``'s DataFrame), trained
    on instead of reading ``data.name``'s file.

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
        summary = _fit(cfg, out, ctx, overwrite=overwrite, resume=resume, progress=progress, rows=rows)
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
        rundir.unlock_run(out)
        ctx.close(finished)


@dataclass
class Run:
    """One training run between its steps: what ``start`` built, read by the loop's functions."""

    s: Setup
    st: TrainState
    ctx: distributed.Context
    out: Path
    cfg: Config  # with the learning rate of the global batch (config.yaml keeps the unscaled one)
    log: MetricsLog
    prepare: Callable[[torch.Tensor], torch.Tensor]  # stored values -> the model's input
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    # prepare the global batch, then shard (dynamic binarisation, batches cut to their longest line: every
    # rank's share the same shape); else shard first
    whole: bool
    lengths: torch.Tensor | None  # text: tokens per line, for length-bucketed batches
    lr_now: torch.Tensor  # the optimiser's learning rate (a device tensor the loop refills)
    probe: NoiseProbe
    snapshot: Snapshot  # the last good state, for the NaN guard's rollback
    forward: Callable[..., dict[str, torch.Tensor]] | None  # data-parallel: the DDP-wrapped objective
    tracker: Tracker  # live TensorBoard / MLflow logging (train.tensorboard, train.mlflow), rank 0
    mean_tokens: float = 0.0  # text: tokens per training line (end markers included), for tokens/s
    watch: hardware.ThreadWatch | None = None  # train.threads 0 on the CPU: the thread count follows the load

    @property
    def loop(self) -> dict[str, Any]:
        return self.st.loop

    def past_limit(self, train_seconds: float) -> bool:  # train.time_limit or train.max_steps (0: none)
        return 0 < self.cfg.train.time_limit <= train_seconds or self.step_limited()

    def step_limited(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.loop["step"]

    def save_checkpoint(self, name: str | None = None) -> None:
        """A step checkpoint (the newest ``keep_checkpoints`` are kept), or one with a fixed name."""
        if not self.ctx.main:
            return
        tensors, meta = self.st.tensors_and_meta(self.s)
        if name is None:
            path = checkpoint.save(
                self.out, self.loop["step"], tensors, meta, keep=self.cfg.train.keep_checkpoints
            )
        else:
            path = checkpoint.save_named(self.out, name, tensors, meta)
        self.log.write("checkpoint", step=self.loop["step"], path=str(path.relative_to(self.out)))

    def extra_log(self, speed: float) -> dict[str, float]:
        """The KL weight of the last step under a KL schedule; tokens/s for text (end markers included)."""
        cfg, extra = self.cfg, {}
        if cfg.train.kl_warmup_steps or cfg.train.kl_cycles:
            extra["kl_weight"] = optim.kl_weight_at(cfg, self.loop["step"] - 1, self.total_steps)
        if self.lengths is not None:
            extra["tokens_per_second"] = speed * self.mean_tokens
        return extra


def _new_state(cfg: Config, s: Setup) -> TrainState:
    """A fresh state for ``s``: optimiser, guard, weight average, the two RNG streams, the loop position."""
    vae, device = s.vae, s.device
    gens = {
        "data": runtime.generator(device, cfg.train.seed),  # order and binarisation
        "model": runtime.generator(device, cfg.train.seed + 1),  # reparameterisation noise
    }
    loop: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "examples": 0,
            "best_val_nelbo": None, "skipped": 0, "rollbacks": 0, "lr_scale": 1.0}  # fmt: skip
    opt = make_optimizer(cfg, vae, device)
    return TrainState(
        vae,
        opt,
        runtime.grad_scaler(device, s.precision),
        gens,
        torch.empty(0, dtype=torch.long, device=device),
        loop,
        GradGuard(cfg, [p for p in vae.parameters() if p.requires_grad], device),
        weight_average(cfg, vae, opt),
    )


def check_position(loop: dict[str, Any], n_train: int, batch_size: int, source: Path) -> None:
    """A restored position (step, epoch, batch_in_epoch) must be one that epochs of ``n_train``
    examples in the run's global batches reach (a signed but forged 10^12 is refused, not run)."""
    step, epoch, batch = loop["step"], loop["epoch"], loop["batch_in_epoch"]
    per_epoch = -(-n_train // loop.get("global_batch", batch_size))  # at most: a smaller last batch (text)
    if batch > per_epoch or epoch > step or not batch <= step <= (epoch + 1) * per_epoch:
        raise CheckpointError(
            f"checkpoint {source} holds an impossible position (step {step}, epoch {epoch}, batch "
            f"{batch} of at most {per_epoch} per epoch): not this run's; remove it"
        )


def start(
    cfg: Config,
    out: Path,
    ctx: distributed.Context,
    *,
    overwrite: bool,
    resume: bool,
    rows: Table | None = None,
) -> Run:
    """Check the directory, set up data and model, restore a checkpoint, write config.yaml and the start
    event: everything before the first step."""
    resume_from = None
    if ctx.main:  # rank 0 alone decides about (and locks, for the whole run) the directory it alone writes
        rundir.lock_run(out, resume)
        check_out_dir(out, overwrite, resume, cfg)  # a new run's config.yaml: resumable from here
        resume_from = rundir.resume_point(out, cfg) if resume else None  # refused: nothing is touched
    tracking.check_available(cfg)
    runtime.seed_everything(cfg.train.seed)
    # every user error in config or data is raised here, before any file is touched
    s = setup(
        cfg, device=ctx.device, data_meta=saved_data_meta(out, resume_from) if resume else None, rows=rows
    )
    if ctx.world > 1:
        check_shares(s, ctx)
    runtime.configure(s.device, cfg.train.threads)
    st = _new_state(cfg, s)
    loop = st.loop
    state_json = ctx.broadcast(prepare_dir(out, cfg, overwrite, resume, resume_from) if ctx.main else None)
    if state_json is not None:
        st.restore(*checkpoint.load(state_json), source=state_json)
        check_position(loop, len(s.x_train), cfg.train.batch_size, state_json)  # before any file is written
        loop.pop("time_limited", None)  # a resumed run is stopped (or not) by its own limits
        loop.pop("step_limited", None)
    threads, choice = settle_hardware(cfg, s, ctx, loop, resumed=state_json is not None)
    # the global batch is the run's (train.batch_size x the ranks it started with; runs from before
    # data-parallel training: train.batch_size): any number of ranks continues it at the same global step
    started_with = ctx.world if state_json is None else 1
    global_batch = loop.setdefault("global_batch", cfg.train.batch_size * started_with)
    lr_factor = distributed.lr_factor(cfg, global_batch / cfg.train.batch_size)
    ctx.decorrelate(cfg.train.seed, loop["step"])
    if ctx.main:
        checkpoint.replace_file(out / "config.yaml", to_yaml(cfg).encode())
    cfg = distributed.scaled_lr(cfg, lr_factor)  # the learning rate of the global batch (as saved: unscaled)
    log = MetricsLog(out / "metrics.jsonl" if ctx.main else None)
    ranks = {"ranks": ctx.world, "global_batch": global_batch, "lr_factor": lr_factor}
    measured = {"probe": choice.speeds, "probe_cpu_seconds": choice.cpu_seconds} if choice else {}
    watch = thread_watch(threads, choice, global_batch, log, loop)
    log.write("start", step=loop["step"], resumed=resume, device=runtime.describe(s.device),
              precision=s.precision, threads=torch.get_num_threads(), **measured,
              params=sum(p.numel() for p in s.vae.parameters()), binarize=s.binarize_mode,
              **(ranks if ctx.world > 1 else {}))  # fmt: skip
    n_train, kind = len(s.x_train), s.kind
    steps_per_epoch = n_train // global_batch  # equal-sized batches: fixed shapes, no tiny last batch
    # batches whose shapes change anyway (text): every example once per epoch, a smaller last batch
    # (data-parallel runs, now or at their start, drop it: the ranks' shares stay equal)
    if not kind.fixed_shapes and ctx.world == 1 and global_batch == s.cfg.train.batch_size:
        steps_per_epoch = -(-n_train // global_batch)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    lr_now = optim.lr_tensor(st.opt)
    if lr_factor != 1.0:  # the scaled rate from the first step on (the loop refills it only under schedules)
        lr_now.fill_(optim.lr_at(cfg, loop["step"], total_steps) * loop["lr_scale"])
    if privacy.private(cfg):  # DP-SGD: its own step (privacy.py); no gradient-noise probe (it reads the data)
        privacy.check(cfg, ctx.world, s.precision, s.mapped)
        loop.setdefault("privacy", privacy.plan(cfg, n_train, total_steps))
        cfg = replace(cfg, train=replace(cfg.train, noise_scale_every=-1))
    forward = None
    if ctx.world > 1:  # model + objective in DDP, compiled before wrapping (the step itself runs eagerly)
        task = Task(s.vae, cfg)
        compiled = runtime.compile_fn(task, s.device) if _compiled_forward(cfg, s.device) else task
        forward = ctx.wrap(compiled)  # type: ignore[arg-type]
    dynamic = s.binarize_mode == "dynamic"
    lengths = kind.lengths(s.x_train)  # text: tokens per line, for length-bucketed batches
    mean_tokens = lengths.double().mean().item() if lengths is not None else 0.0
    return Run(s, st, ctx, out, cfg, log, kind.preparer(s.train_max, dynamic, st.gens["data"]), global_batch,
               steps_per_epoch, total_steps, not kind.fixed_shapes or dynamic, lengths, lr_now,
               NoiseProbe(cfg, s.vae, s.device, s.precision), Snapshot(st), forward,
               Tracker(cfg, out, ctx.main), mean_tokens, watch)  # fmt: skip


def settle_hardware(
    cfg: Config, s: Setup, ctx: distributed.Context, loop: dict[str, Any], *, resumed: bool
) -> tuple[list[int], hardware.Choice | None]:
    """train.threads 0 / train.precision auto on the CPU, decided by measurement (engine/hardware.py):
    sets the threads and ``s.precision``; returns the thread counts to follow the load with. A resumed
    run keeps the precision it started with (``loop["precision"]``: it changes the numbers)."""
    threads, precisions = hardware.options(cfg, s.device, ctx.world)
    if resumed and precisions:
        s.precision, precisions = loop.get("precision", s.precision), []
    choice = hardware.choose(cfg, s, cfg.train.batch_size, threads, precisions)
    if choice is not None:
        torch.set_num_threads(choice.threads)
        s.precision = choice.precision
    loop["precision"] = s.precision
    return threads, choice


def thread_watch(
    threads: list[int], choice: hardware.Choice | None, batch: int, log: MetricsLog, loop: dict[str, Any]
) -> hardware.ThreadWatch | None:
    """With more than one thread count to choose from, one that follows the load; each change logged."""
    if len(threads) < 2:
        return None

    def switched(n: int, speeds: dict[int, float]) -> None:
        log.write("threads", step=loop["step"], threads=n,
                  samples_per_second={str(k): round(v) for k, v in speeds.items()})  # fmt: skip

    rates = choice.by_threads if choice is not None else {}
    return hardware.ThreadWatch(threads, torch.get_num_threads(), rates, batch, switched)


def _compiled_forward(cfg: Config, device: torch.device) -> bool:
    """Data-parallel runs compile the objective's forward (on, or auto on CUDA) and run the step eagerly."""
    mode = cfg.train.compile
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compiled_step(r: Run) -> runtime.StepCompiler:
    """The training step as train.compile says (eager, compiled, CUDA graph), keyed by what shapes it."""
    s, cfg, st = r.s, r.cfg, r.st
    spec, m = model_spec(cfg.model.name), cfg.model
    batch = distributed.local_batch(r.global_batch, r.ctx.world, cfg.train.batch_size)  # this rank's share
    shape = "|".join(str(getattr(m, f)) for f in spec.fields)
    # data-parallel runs compile the forward only; schedule-free's step is not compiled (plain Python
    # over the library's state), but on CUDA it reads nothing back and is captured with the rest
    whole = r.forward is None
    compilable = whole and cfg.train.optimizer != "schedulefree"
    # schedule-free: only its device step (CUDA, no weight decay) is captured
    capturable = whole and getattr(st.opt, "device_scalars", True)
    if "privacy" in r.loop:  # eager, its own Poisson batches (privacy.py)
        data = (s.x_train, s.y_train)
        dp_step = privacy.make_private_step(s.vae, st.opt, cfg, st.guard, st.ema, data, r.loop["privacy"],
                                            st.gens["data"], r.prepare)  # fmt: skip
        return runtime.StepCompiler(dp_step, "off", s.device, key="dp", remaining_steps=0, graphs=False)
    return runtime.StepCompiler(
        make_step(s.vae, st.opt, st.scaler, cfg, s.device, s.precision, st.guard, st.ema, r.forward),
        cfg.train.compile if compilable else "off",
        s.device,
        key=f"{s.device.type}|{torch.__version__}|{m.name}|{s.data.event_shape}|{shape}|{cfg.train.objective}|"
        f"{s.precision}|{batch}" + (f"|classes {s.vae.n_classes}" if s.vae.n_classes else ""),
        remaining_steps=r.total_steps - r.loop["step"],
        graphs=cfg.train.cuda_graph and s.kind.fixed_shapes and st.scaler is None and capturable,
    )


class Meter:
    """The step statistics, summed on the device and read back at the log interval, and the clocks."""

    def __init__(self, r: Run, bar: Progress) -> None:
        self.sums = torch.zeros(len(STATS), device=r.s.device)
        self.since_log, self.t_log, self.examples_at_log = 0, time.perf_counter(), r.loop["examples"]
        self.t_segment = time.perf_counter()  # the start of the training time not yet in train_seconds
        self.bar = bar
        self.halt = False  # data-parallel: whether any rank was asked to stop, agreed at the last log

    def bank(self, loop: dict[str, Any]) -> None:
        """Add the training time since the segment's start to the run's training seconds."""
        now = time.perf_counter()
        loop["train_seconds"] += now - self.t_segment
        self.t_segment = now


def _fit(
    cfg: Config,
    out: Path,
    ctx: distributed.Context,
    *,
    overwrite: bool,
    resume: bool,
    progress: bool | None,
    rows: Table | None = None,
) -> dict[str, Any]:
    r = start(cfg, out, ctx, overwrite=overwrite, resume=resume, rows=rows)
    loop, step = r.loop, compiled_step(r)
    # a bar on a terminal (or with progress=True), a line every ~10 s otherwise; rank 0 only
    show = progress is not False and ctx.main
    bar = Progress(r.total_steps, "training", "steps", initial=loop["step"], enabled=show,
                   terminal=True if progress else None)  # fmt: skip
    # a resumed run whose training seconds (the same on every rank: they come from the checkpoint) are
    # already past the time limit takes no step
    over = r.past_limit(loop["train_seconds"])
    meter = Meter(r, bar)
    r.s.vae.train()
    try:
        with _StopFlag() as stop:
            meter.t_segment = time.perf_counter()
            while loop["epoch"] < r.cfg.train.epochs and not over:
                over = train_epoch(r, step, meter, stop)
                end_epoch(r, meter, over)
                meter.t_segment = meter.t_log = time.perf_counter()
                if r.watch is not None:  # an evaluation is not a fall in the step's speed
                    r.watch.restart()
    finally:
        bar.close(done=loop["epoch"] >= r.cfg.train.epochs or over)
        r.tracker.close()
    if over and loop["epoch"] < r.cfg.train.epochs:  # a limit stopped the run before its end
        at = loop["epoch"] + loop["batch_in_epoch"] / r.steps_per_epoch
        if r.step_limited():
            loop["step_limited"] = at
            r.log.write("max_steps", step=loop["step"], train_seconds=loop["train_seconds"], epoch=at)
        else:
            loop["time_limited"] = at
            r.log.write("time_limit", step=loop["step"], train_seconds=loop["train_seconds"], epoch=at)
    step.record()
    loop["compile"] = step.decision
    if ctx.world > 1:
        how = "compiled forward" if _compiled_forward(r.cfg, r.s.device) else "eager"
        loop["compile"] = f"{how}, DDP over {ctx.world} ranks"
    if r.cfg.train.checkpoint_every and loop["step"] % r.cfg.train.checkpoint_every:
        r.save_checkpoint()  # the final state, when it did not fall on a checkpoint step
    summary = finish(r.s, out, loop, r.st.ema, write=ctx.main, progress=show)
    r.log.write("end", **summary)
    r.log.close()
    return summary


def train_epoch(r: Run, step: Callable[..., torch.Tensor], meter: Meter, stop: _StopFlag) -> bool:
    """The rest of the current epoch's steps; whether the time limit stopped it (agreed over the ranks)."""
    s, cfg, st, ctx, loop = r.s, r.cfg, r.st, r.ctx, r.loop
    gens, device = st.gens, s.device
    if loop["batch_in_epoch"] == 0:
        st.perm = torch.randperm(len(s.x_train), generator=gens["data"], device=device)
        if r.lengths is not None:  # text: length buckets, little padding in each batch
            st.perm = bucketed(st.perm, r.lengths, r.global_batch, gens["data"])
    scheduled = cfg.train.schedule != "constant" or cfg.train.warmup_steps > 0
    anneal = bool(cfg.train.kl_warmup_steps or cfg.train.kl_cycles)  # β changes during the run
    over = False
    # a conditional run: the class ids of the batch go with it (a fixed β as a tensor: the step's
    # arguments are tensors, for the compiled step and the CUDA graph)
    fixed_beta = torch.tensor(cfg.train.beta, device=device) if s.y_train is not None else None
    # memory-mapped training rows are gathered on the host: the epoch's order copied there once
    order = st.perm.cpu() if s.mapped else st.perm
    for b in range(loop["batch_in_epoch"], r.steps_per_epoch):
        rows = order[b * r.global_batch : (b + 1) * r.global_batch]
        raw = gather(s.x_train, rows, device) if s.mapped else s.x_train[rows]
        # this rank's rows rank::world of the global batch (one rank: all of it)
        x = ctx.shard(r.prepare(raw)) if r.whole else r.prepare(ctx.shard(raw))
        y = None
        if s.y_train is not None:  # the same rows of the class ids, sharded the same way
            y = ctx.shard(s.y_train[st.perm[b * r.global_batch : (b + 1) * r.global_batch]])
        shape = noise_shape_of(cfg.train.objective, len(x) * ctx.world, s.vae.latent, cfg.train.iwae_k)
        eps = ctx.shard(torch.randn(shape, generator=gens["model"], device=device), dim=-2)
        # schedules (lr, β) follow the global step, so a resumed run continues them exactly
        if scheduled or loop["lr_scale"] != 1.0:
            r.lr_now.fill_(optim.lr_at(cfg, loop["step"], r.total_steps) * loop["lr_scale"])
        beta = kl_weight(cfg, loop["step"], device, r.total_steps) if anneal else None
        probing = r.probe.due(loop["step"], len(x))
        if probing:
            r.probe.small(x, eps, beta, y)  # the half batch's gradient, before the step moves θ
        if y is not None:
            meter.sums += step(x, eps, fixed_beta if beta is None else beta, y)
        else:
            meter.sums += step(x, eps) if beta is None else step(x, eps, beta)
        if probing:
            r.probe.big(st.guard.state["last_norm"], len(x) * ctx.world)
        meter.since_log += 1
        loop["step"] += 1
        loop["batch_in_epoch"] = b + 1
        loop["examples"] += len(x) * ctx.world
        if r.watch is not None:
            r.watch.tick(len(x))
        if loop["step"] % cfg.train.log_every == 0 or b + 1 == r.steps_per_epoch or r.step_limited():
            over = log_interval(r, meter, stop)
        every = cfg.train.checkpoint_every
        stopping = stop.signal is not None if ctx.world == 1 else meter.halt  # ranks stop together
        if stopping or (every and loop["step"] % every == 0):
            meter.bank(loop)
            r.save_checkpoint()
            if stopping:
                raise Interrupted(stop.signal or signal.SIGTERM, loop["step"], r.out)
        if over:
            break
    return over


def log_interval(r: Run, meter: Meter, stop: _StopFlag) -> bool:
    """The host sync: read the summed statistics back, log them, run the NaN guard's second line (roll
    back or take a snapshot). Returns whether the time limit is reached (agreed over the ranks)."""
    loop, guard = r.loop, r.st.guard
    over = r.past_limit(loop["train_seconds"] + time.perf_counter() - meter.t_segment)
    # data-parallel: over ranks (any rank's signal or clock stops them all)
    meter.halt, over = r.ctx.reduce_stats(meter.sums, stop.signal is not None, over)
    totals = dict(zip(STATS, meter.sums.tolist(), strict=True))
    max_run, nonfinite = guard.state["max_run"].item(), guard.state["nonfinite"].item()
    now = time.perf_counter()
    speed = (loop["examples"] - meter.examples_at_log) / (now - meter.t_log)  # text: last batch smaller
    applied = totals["applied"]
    terms = {k: totals[k] / applied if applied else math.nan for k in STATS[:4]}
    if applied and not math.isfinite(terms["loss"]):
        raise TrainingDiverged(
            f"the loss became {terms['loss']} near step {loop['step']}; lower --lr (now {r.cfg.train.lr:g}) "
            f"or check the data; the last checkpoint is in {r.out / 'checkpoints'}"
        )
    loop["skipped"] += int(totals["skipped"])
    epoch = loop["epoch"] + loop["batch_in_epoch"] / r.steps_per_epoch
    lr, grad_norm, probe = r.lr_now.item(), totals["grad_norm"] / max(applied, 1), r.probe.log()
    r.log.write("train", step=loop["step"], epoch=epoch, **terms, lr=lr, grad_norm=grad_norm,
                skipped=int(totals["skipped"]), skipped_total=loop["skipped"], **probe,
                samples_per_second=speed, **r.extra_log(speed))  # fmt: skip
    tracked = {**terms, "lr": lr, "grad_norm": grad_norm, "samples_per_second": speed, **probe}
    r.tracker.scalars(loop["step"], {f"train/{k}": v for k, v in tracked.items()})
    meter.bar.set_postfix(epoch=loop["epoch"] + 1, loss=f"{terms['loss']:.2f}", samples_s=f"{speed:,.0f}")
    meter.bar.update(meter.since_log)
    meter.sums.zero_()
    guard.state["max_run"].zero_()
    guard.state["nonfinite"].zero_()
    if max_run >= r.cfg.train.nan_patience:  # the NaN guard: back to the last good state
        roll_back(r.snapshot, loop, r.log, int(max_run), r.out)
    elif not nonfinite:
        r.snapshot.take()
    meter.since_log, meter.t_log, meter.examples_at_log = 0, now, loop["examples"]
    return over


def end_epoch(r: Run, meter: Meter, over: bool) -> None:
    """Count a completed epoch, checkpoint, and evaluate it on the validation split (eval.every_epoch;
    none without one); ``best`` is the model with the lowest validation NELBO so far. The test split is
    touched only by the final evaluation."""
    loop, cfg, s = r.loop, r.cfg, r.s
    mapwatch.check(s.x_train, full=True)  # a mapped file rewritten under the run: stop, keep checkpoints
    # the epoch is complete unless the time limit broke it off (>=: a text run resumed on more ranks has
    # fewer batches per epoch than the one that saved it)
    completed = not over or loop["batch_in_epoch"] >= r.steps_per_epoch
    if completed:
        loop["epoch"] += 1
        loop["batch_in_epoch"] = 0
    meter.bank(loop)
    if not cfg.train.checkpoint_every:
        r.save_checkpoint()  # (with checkpoint_every, the final save after the loop writes it)
    if not (completed and cfg.eval.every_epoch and s.has_validation):
        return
    # the same evaluation noise every epoch: the curve shows the model change, not noise
    with averaged(r.st.ema):
        ev = evaluation.nelbo(s.vae, s.x_val, s.prepare_val, batch_size=cfg.eval.batch_size,
                              generator=runtime.generator(s.device, 12345), y=s.y_val)  # fmt: skip
        units = collapse_check(s, r.log, loop)
    r.log.write("eval", step=loop["step"], epoch=loop["epoch"], split="val",
                **{f"val_{k}": v for k, v in ev.items()}, **units)  # fmt: skip
    if r.tracker.active:
        scalars = {f"val/{k}": v for k, v in ev.items()} | {"val/active_units": units["active_units"]}
        r.tracker.scalars(loop["step"], scalars)
        with averaged(r.st.ema):
            r.tracker.images(loop["step"], tracked_pictures(s))
    if loop.get("best_val_nelbo") is None or ev["nelbo"] < loop["best_val_nelbo"]:
        loop["best_val_nelbo"] = ev["nelbo"]
        r.save_checkpoint("best")
