"""The training loop: plain functions and one state dict.

``fit(cfg, out)`` loads the data, builds the VAE, trains, checkpoints, evaluates and writes the run
directory. The loss is read back to the host only every ``train.log_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import evaluation, runtime
from ..config import Config, to_yaml
from ..data.batches import preparer
from ..data.text import bucketed, lengths_of
from ..objectives import noise_shape_of
from . import checkpoint, distributed, optim
from .finish import averaged, collapse_check, finish
from .noise import NoiseProbe
from .optim import EMA, GradGuard, make_optimizer
from .rundir import MetricsLog, check_out_dir, prepare_dir, saved_data_meta
from .setup import check_shares, setup
from .state import Snapshot, TrainingDiverged, TrainState, roll_back
from .step import STATS, Task, kl_weight, make_step

# ---- run directory ---------------------------------------------------------------------------------


# ---- checkpoint state --------------------------------------------------------------------------------


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
    s = setup(cfg, device=ctx.device, data_meta=saved_data_meta(out) if resume else None)
    if ctx.world > 1:
        check_shares(s, ctx)
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
    state_json = ctx.broadcast(
        prepare_dir(out, cfg, overwrite, resume) if ctx.main else None
    )  # rank 0's choice
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
                            roll_back(snapshot, loop, log, int(max_run), out)
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
                        ev = evaluation.nelbo(vae, s.x_test, s.prepare_test, batch_size=cfg.eval.batch_size,
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
