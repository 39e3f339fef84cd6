"""What a checkpoint holds besides the config (``TrainState``: model, optimiser, RNG streams, loop
position), and the NaN guard's in-memory snapshot with its roll-back."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, TurboVAEError, clip
from ..vae import VAE
from . import checkpoint
from .optim import Average, GradGuard
from .rundir import MetricsLog
from .setup import Setup


class TrainingDiverged(TurboVAEError):
    """The loss became NaN or infinite."""


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


def _first_line(e: BaseException) -> str:
    return clip((str(e).splitlines() or [""])[0], 160)


@dataclass
class TrainState:
    """What a checkpoint holds, besides the config: the objects a step changes and the loop position."""

    vae: VAE
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    gens: dict[str, torch.Generator]  # "data": order and binarisation, "model": reparameterisation noise
    perm: torch.Tensor  # this epoch's order of the training examples
    loop: dict[str, Any]  # step, epoch, batch_in_epoch, train_seconds, examples, best_val_nelbo, ...
    guard: GradGuard  # the running gradient-norm statistics of the skip decision
    ema: Average | None = None  # the weights evaluated (train.ema, schedule-free)

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
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {source} does not fit this model: {_first_line(e)}") from None
        try:  # the rest was written by turbovae; a checkpoint that fails here is damaged, not mismatched
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
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError) as e:
            raise CheckpointError(
                f"checkpoint {source} holds an unusable training state ({type(e).__name__}: {_first_line(e)})"
            ) from None


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
            "ema": st.ema.held() if st.ema is not None else [],
        }

    @torch.no_grad()
    def take(self) -> None:
        self.saved = {k: [t.detach().clone() for t in ts] for k, ts in self._tensors().items()}
        # the groups' own numbers (schedule-free's step count k, weight_sum and lr_max live there; on
        # CUDA on the device, read back first)
        if sync := getattr(self.st.opt, "sync_host", None):
            sync()
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params" and not torch.is_tensor(v)}
                       for g in self.st.opt.param_groups]  # fmt: skip
        self.step = self.st.loop["step"]

    @torch.no_grad()
    def restore(self) -> None:
        opt = self.st.opt
        for group, saved_group in zip(opt.param_groups, self.groups, strict=True):
            group.update(copy.deepcopy(saved_group))
        if sync := getattr(opt, "sync_device", None):
            sync()
        for key, tensors in self._tensors().items():
            saved = self.saved[key]
            if key == "optim" and len(saved) != len(tensors):  # taken before the first step: a fresh state
                if reset := getattr(opt, "reset_state", None):  # schedule-free: z = y (the model is back)
                    reset()
                    continue
                saved = [torch.zeros_like(t) for t in tensors]  # Adam's and the others' fresh state
            for t, v in zip(tensors, saved, strict=True):
                t.copy_(v)


MAX_ROLLBACKS = 3


def roll_back(snapshot: Snapshot, loop: dict[str, Any], log: MetricsLog, run: int, out: Path) -> None:
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
