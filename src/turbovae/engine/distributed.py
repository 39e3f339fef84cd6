"""Data-parallel training on PyTorch's own distributed engine: torch.distributed, launched by torchrun.

Rank, world size and the rendezvous address come from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), never from the config. Without
that environment (or with one rank) nothing here does anything, and a run is the single-process run.

What the loop relies on:

- **The global batch is fixed for the life of a run**: ``train.batch_size`` is per rank, the global
  batch G = train.batch_size × the ranks the run started with, recorded in every checkpoint. A run
  resumed on W ranks gives each G / W examples, so it continues at the same global step with the
  same data order, noise and learning rate, whatever W is.
- **Each rank takes rows rank::W of every global batch**: one global permutation per epoch (drawn
  from the shared data generator, the same on every rank), cut into global batches as a single
  process would; rank r keeps positions r, r + W, ... of each. The reparameterisation noise (and a
  dynamic binarisation draw) is drawn for the whole global batch and sliced the same way, so W ranks
  compute exactly what one process with batch G computes, up to float summation order.
- **The learning rate follows the scaling rule** for G / train.batch_size (``train.lr_scaling``).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..errors import ConfigError, TurboVAEError
from ..runtime import select_device
from . import checkpoint

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this ends the job (a rank died or hangs)
LR_SCALINGS = ("auto", "sqrt", "linear", "none")
_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")


class DistributedError(TurboVAEError):
    """A rank lost contact with the others (one died, or a collective timed out)."""


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment torchrun sets; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {e}") from None


def restarted() -> bool:
    """Whether torchrun restarted this worker group (``--max-restarts``): the run then resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


@dataclass
class Context:
    """This process's place in the job: rank, world size, its device, and whether it owns the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: a single process, the config chooses the device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0

    def shard(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows rank::world of ``t`` along ``dim`` (all of ``t`` for one rank)."""
        if self.world == 1:
            return t
        index = [slice(None)] * t.dim()
        index[dim] = slice(self.rank, None, self.world)
        return t[tuple(index)].contiguous()

    def reduce_stats(self, sums: torch.Tensor, *flags: bool) -> tuple[bool, ...]:
        """Average the ranks' step statistics in place; for each flag (a stop signal, a time limit
        reached), whether any rank raised it, so that all ranks stop after the same step."""
        if self.world == 1:
            return flags
        buf = torch.cat([sums.float(), torch.tensor([float(f) for f in flags], device=sums.device)])
        dist.all_reduce(buf)
        sums.copy_(buf[: len(sums)] / self.world)
        return tuple(bool(v > 0) for v in buf[len(sums) :].tolist())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a small picklable value: a path, a decision)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel: its backward all-reduces (averages) the gradients.

        Buffers are constants in turbovae's models, so they are not broadcast every step; every
        parameter takes part in every forward, so unused-parameter search stays off."""
        if self.world == 1:
            return module
        cuda = self.device is not None and self.device.type == "cuda"
        ddp = nn.parallel.DistributedDataParallel
        # newer torch calls it forward_sync_buffers (and warns about the old name)
        params = inspect.signature(ddp).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        options: dict[str, Any] = {no_sync: False}
        return ddp(module, device_ids=[self.device] if cuda else None, **options)

    def decorrelate(self, seed: int, step: int) -> None:
        """Give ranks other than 0 a torch RNG stream of their own (dropout masks), after the shared
        seed built identical models on every rank and a checkpoint restored rank 0's stream."""
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank * 7_919 + step) % 2**63)

    def close(self, finished: bool = False) -> None:
        """Leave the group. ``finished``: after a run that ended normally, first wait for every rank
        (rank 0 writes its pictures and summary after the last collective), so that no rank tears its
        connections down while another still holds them."""
        if self.owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):  # the run's work is done: a failure here changes nothing
                if finished:
                    dist.barrier()
            gc.collect()  # anything left holding the group goes now, not during interpreter shutdown
            with contextlib.suppress(Exception):  # after a failure the group may be half gone
                dist.destroy_process_group()
            self.owns_group = False


def start(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the job torchrun launched: the process group (NCCL on CUDA, gloo on the CPU, collectives
    time out after ``timeout_s``), and this rank's device (``cuda:LOCAL_RANK`` on GPUs). Outside
    torchrun, or with one rank, a Context for the single process and nothing else."""
    rank, world, local_rank = environment()
    if dist.is_available() and dist.is_initialized():  # the caller's own group (fit inside a DDP program)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return Context()
        return Context(rank, world, local_rank, _rank_device(device_name, local_rank), owns_group=False)
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    device = _rank_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    # env:// as usual, with the keys of each worker-group attempt apart: torchrun's static rendezvous
    # (--master-port) keeps its store across --max-restarts, and gloo would find the dead group's addresses
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"turbovae/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if rank > 0:  # the result lines are rank 0's; the others' stdout would repeat them
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)


def _rank_device(device_name: str, local_rank: int) -> torch.device:
    """train.device for this rank: on GPUs, the local rank's GPU (one GPU per rank)."""
    device = select_device(device_name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; start at "
            "most one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


# ---- the global batch and the learning rate ----------------------------------------------------------


def local_batch(global_batch: int, world: int, per_rank: int) -> int:
    """This rank's share of the run's global batch."""
    if global_batch % world:
        raise ConfigError(
            f"this run's global batch is {global_batch} examples (train.batch_size = {per_rank} per rank "
            f"when it started); {world} ranks cannot share it evenly: use a number of ranks that divides "
            f"{global_batch}"
        )
    return global_batch // world


def lr_factor(cfg: Config, ratio: float) -> float:
    """The learning-rate multiplier for a global batch ``ratio`` × train.batch_size: √ratio for the Adam
    family (Adam, AdamW, Adamax), ratio for SGD (Goyal et al. 2017), 1 with ``train.lr_scaling=none``."""
    rule = cfg.train.lr_scaling
    if rule not in LR_SCALINGS:
        raise ConfigError(f"train.lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {rule!r}")
    if rule == "auto":
        rule = "linear" if cfg.train.optimizer == "sgd" else "sqrt"
    if rule == "none" or ratio == 1:
        return 1.0
    return math.sqrt(ratio) if rule == "sqrt" else float(ratio)


def scaled_lr(cfg: Config, factor: float) -> Config:
    """A copy of ``cfg`` whose train.lr is multiplied by ``factor`` (schedules scale with it)."""
    if factor == 1.0:
        return cfg
    return replace(cfg, train=replace(cfg.train, lr=cfg.train.lr * factor))


# ---- failures ----------------------------------------------------------------------------------------


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from a collective: a dead peer (gloo: connection reset) or a timeout."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _COMM_WORDS)


def lost_contact(e: BaseException, ctx: Context, out: Path) -> DistributedError:
    """The error a rank ends with when a collective fails: what happened, and how to go on."""
    last = checkpoint.latest(out) if out.is_dir() else None
    saved = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written yet"
    return DistributedError(
        f"rank {ctx.rank} of {ctx.world} lost contact with the other ranks ({_first_sentence(e)}): another "
        f"rank died or stopped answering; {saved}. Resume with `turbovae train --resume {out}` under "
        "torchrun, on any number of ranks that divides the global batch (torchrun --max-restarts N "
        "resumes by itself)"
    )


def _first_sentence(e: BaseException) -> str:
    """gloo's "[.../pair.cc:537] Read error [127.0.0.1]:27845: Connection reset by peer. This is ..."
    → "Read error [127.0.0.1]:27845: Connection reset by peer"."""
    text = " ".join(str(e).split()) or type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0].rstrip(".")[:200]


# ---- the launcher --------------------------------------------------------------------------------------


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


# torchrun without its ChildFailedError traceback: a worker that failed with a user error (exit 2) has
# said why in one line, which the launcher prints once; torchrun's exit status becomes the worker's
_TORCHRUN = """
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run
try:
    run(parse_args(sys.argv[1:]))
except ChildFailedError as e:
    codes = [f.exitcode for f in e.failures.values()]
    sys.exit(next((c for c in codes if c is not None and c > 0), 1))
"""
ERRORS_ENV = "TURBOVAE_LAUNCH_ERRORS"  # the file where launched workers leave their error lines


def report_error(line: str) -> None:
    """A command's one-line error: on stderr, or, in a worker that ``launch`` started, appended to the
    launcher's file (every rank meets the same bad data or config: the launcher prints it once)."""
    path = os.environ.get(ERRORS_ENV)
    if path and "RANK" in os.environ:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line.replace("\n", " ") + "\n")
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def launch(argv: Sequence[str], nproc: int) -> int:
    """``turbovae <argv>`` under torchrun with ``nproc`` processes on this machine (``--nproc``): the
    command ``python -m torch.distributed.run --standalone --nproc-per-node N -m turbovae <argv>``
    (without torchrun's traceback when a worker fails; the workers' error lines are printed once).

    Returns torchrun's exit status. Ctrl-C reaches torchrun and its workers directly (one process
    group), which checkpoint and stop; SIGTERM sent to this process is passed on to torchrun."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if "RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    cmd = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
           "-m", "turbovae", *strip_nproc(argv)]  # fmt: skip
    fd, errors = tempfile.mkstemp(prefix="turbovae-launch-", suffix=".errors")
    os.close(fd)
    proc = subprocess.Popen(cmd, env={**os.environ, ERRORS_ENV: errors})
    forward: Callable[[int, Any], None] = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    previous: Any = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its workers
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            with open(errors, encoding="utf-8", errors="replace") as f:
                lines = list(dict.fromkeys(line.rstrip("\n") for line in f if line.strip()))
        except OSError:
            lines = []
        with contextlib.suppress(OSError):
            os.unlink(errors)
    for line in lines:
        print(line, file=sys.stderr)
    return code
