"""CPU threads and precision chosen by measurement: ``train.threads 0`` and ``train.precision auto``.

A CPU is often busy with other work, and then the settings that win on a quiet machine lose: on a
2-core machine shared with two other processes, two torch threads ran up to 17x slower than one
(OpenMP barriers wait for a core) and bf16 at 0.58x the fp32 speed. So on the CPU ``auto`` is
decided by timing the run's own training step:

- ``choose``, once at the start: the step, on a copy of the model (the run itself is not touched),
  timed for each thread count in {1, torch's default} and each precision in {fp32, bf16 where the
  CPU multiplies bf16 in hardware}: the precision the CPU flags say unless the other's step costs one
  thread clearly fewer CPU seconds, then the thread count that runs it fastest. A resumed run keeps
  its precision (it changes the numbers) and measures only the threads.
- ``ThreadWatch``, during the run: it times windows of steps and, when the speed falls to half of
  what this thread count did before, or every so often, tries the other thread count for one short
  window and keeps the faster.

Set the two explicitly (``train.threads=1 train.precision=fp32``) for runs that repeat bit for bit;
``TURBOVAE_PROBE=0`` makes ``auto`` decide without measuring (torch's threads, bf16 by the CPU flags).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import runtime
from ..config import Config
from ..objectives import noise_shape_of
from .optim import make_optimizer
from .setup import Setup
from .step import make_step

PROBE_ENV = "TURBOVAE_PROBE"
CHUNK_SECONDS = 0.05  # one timed chunk of steps
ROUNDS = 3  # chunks per (threads, precision) pair, timed in turn
MAX_STEP_SECONDS = 1.0  # a candidate whose single step takes longer is not timed further
PRECISION_MARGIN = 1.1  # the other precision must cost 10% less CPU time to replace the flags' choice
TRIAL_MARGIN = 1.2  # a short trial window is noisy: the other thread count must be 20% faster to stay


def measuring() -> bool:
    return os.environ.get(PROBE_ENV, "1") != "0"


def options(cfg: Config, device: torch.device, world: int) -> tuple[list[int], list[str]]:
    """The thread counts and precisions ``auto`` chooses among here ([]: nothing to choose)."""
    if device.type != "cpu" or world > 1 or not measuring():
        return [], []
    default = torch.get_num_threads()
    threads = sorted({1, default}) if cfg.train.threads == 0 and default > 1 else []
    precisions = ["fp32", "bf16"] if cfg.train.precision == "auto" and runtime.fast_bf16(device) else []
    return threads, precisions


@dataclass
class Choice:
    threads: int
    precision: str
    speeds: dict[str, float] = field(default_factory=dict)  # "2 thread(s), bf16" -> samples/s
    by_threads: dict[int, float] = field(default_factory=dict)  # at the chosen precision
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # precision -> one thread's CPU s/step


def _timer(step: Callable[[], object], clock: Callable[[], float]) -> Callable[[], tuple[float, float]]:
    """A timed chunk of ``step``: one warm-up step sizes it to ~CHUNK_SECONDS; each call returns the
    wall and this thread's CPU seconds per step of one chunk."""
    t0 = clock()
    step()
    first = clock() - t0
    n = 0 if first > MAX_STEP_SECONDS else max(1, int(CHUNK_SECONDS / max(first, 1e-6)))

    def chunk() -> tuple[float, float]:
        if n == 0:  # too slow to time again
            return first, first
        t0, c0 = clock(), time.thread_time()
        for _ in range(n):
            step()
        return (clock() - t0) / n, (time.thread_time() - c0) / n

    return chunk


def choose(
    cfg: Config, s: Setup, batch: int, threads: list[int], precisions: list[str],
    clock: Callable[[], float] = time.perf_counter,
) -> Choice | None:  # fmt: skip
    """Time the training step for every (threads, precision) pair; None when there is nothing to choose.
    The pairs are timed in turn, ROUNDS times over, and each pair's speed is its median: other work on
    the machine comes and goes, and in turns it falls on every pair alike."""
    threads = threads or [torch.get_num_threads()]
    precisions = precisions or [s.precision]
    if len(threads) * len(precisions) == 1:
        return None
    device, default_threads = s.device, torch.get_num_threads()
    g = torch.Generator(device=device).manual_seed(12345)  # the run's own generators are not touched
    dynamic = s.binarize_mode == "dynamic"
    x = s.kind.preparer(s.train_max, dynamic, g)(s.x_train[:batch])
    eps = torch.randn(noise_shape_of(cfg.train.objective, len(x), s.vae.latent, cfg.train.iwae_k),
                      generator=g, device=device)  # fmt: skip
    extra = () if s.y_train is None else (torch.tensor(cfg.train.beta, device=device), s.y_train[:batch])
    chunks: dict[tuple[int, str], Callable[[], tuple[float, float]]] = {}
    times: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        for precision in precisions:
            vae = copy.deepcopy(s.vae)
            step = make_step(vae, make_optimizer(cfg, vae, device), None, cfg, device, precision)
            for t in threads:
                torch.set_num_threads(t)
                chunks[(t, precision)] = _timer(lambda: step(x, eps, *extra), clock)  # noqa: B023
        for _ in range(ROUNDS):
            for (t, precision), chunk in chunks.items():
                torch.set_num_threads(t)
                times.setdefault((t, precision), []).append(chunk())
    finally:
        torch.set_num_threads(default_threads)
    speeds = {k: len(x) / max(float(np.median([w for w, _ in v])), 1e-9) for k, v in times.items()}
    # the precision by the CPU seconds of one thread: what a step costs, whatever share of the core
    # other work leaves it (on a busy machine the wall time swings with that share)
    cost = {p: float(np.median([c for _, c in times[(1, p)]])) for p in precisions if (1, p) in times}
    if len(cost) == len(precisions):
        precision = min(cost, key=lambda p: cost[p])
        # the CPU flags' choice stands unless the other is clearly cheaper (a near tie is noise)
        if s.precision in cost and cost[s.precision] <= PRECISION_MARGIN * cost[precision]:
            precision = s.precision
    else:
        precision = max(speeds, key=lambda k: speeds[k])[1]
    by_threads = {t: v for (t, p), v in speeds.items() if p == precision}
    best = max(by_threads, key=lambda t: by_threads[t])
    named = {f"{t} thread(s), {p}": v for (t, p), v in speeds.items()}
    return Choice(best, precision, named, by_threads, cost)


def settle(cfg: Config, s: Setup, threads: int = 0, precision: bool = True) -> Choice | None:
    """What ``train`` decides at its start, for the commands that run its model without training it
    (``eval``, ``bench``): CPU threads (``threads`` if given, else train.threads, else, for 0, the count
    that runs the run's training step fastest now, measured as ``choose`` does: on a busy machine one
    thread, not torch's default) and, with ``precision``, train.precision auto (``s.precision``).
    Returns the measurement (None: nothing was measured)."""
    counts, precisions = options(cfg, s.device, 1)
    threads = threads or cfg.train.threads
    if threads > 0:
        torch.set_num_threads(threads)
        counts = []
    choice = choose(cfg, s, cfg.train.batch_size, counts, precisions if precision else [])
    if choice is not None:
        torch.set_num_threads(choice.threads)
        s.precision = choice.precision
    return choice


class ThreadWatch:
    """Keeps the faster thread count while the load on the machine changes (see the module's text).

    ``tick(examples)`` after every step; a window ends after ``window`` steps or ``WINDOW_SECONDS``.
    ``on_switch(threads, speeds)`` is told of every change of thread count that is kept."""

    WINDOW_SECONDS = 0.5
    # windows (about 30 s) before the other count is tried again; doubled (up to 8x) each time it loses
    EXPLORE_EVERY = 60
    # the first try comes sooner (about 5 s): the start's probe times each count for a fraction of a
    # second, and a moment of other work during it can pick the slower count for a whole short run
    FIRST_EXPLORE = 10

    def __init__(
        self, options: list[int], current: int, speeds: dict[int, float], batch: int,
        on_switch: Callable[[int, dict[int, float]], None] | None = None,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        self.options, self.current = options, current
        self.speed = dict(speeds)  # the last speed measured at each thread count (samples/s)
        self.peak = speeds.get(current, 0.0)  # what the current count did at its best lately
        rate = max(speeds.get(current, 1.0), 1.0)
        self.window = max(3, int(self.WINDOW_SECONDS * rate / batch))
        self.on_switch, self.set_threads, self.clock = on_switch, set_threads, clock
        self.trial_from: int | None = None  # the count a trial window left, to go back to if it loses
        self.trial_warm = False  # whether the trial's first (untimed) step is done
        self.explore_every, self.since_trial = self.FIRST_EXPLORE, 0
        self.n = self.examples = 0
        self.t0 = clock()

    def restart(self) -> None:
        """A new window from now (after work that is not a training step: an evaluation, a checkpoint)."""
        self.n = self.examples = 0
        self.t0 = self.clock()

    def tick(self, examples: int) -> None:
        self.n += 1
        self.examples += examples
        now = self.clock()
        trial = self.trial_from is not None
        if trial and not self.trial_warm:  # the first step at a new count wakes its threads: not timed
            self.trial_warm = True
            self.n = self.examples = 0
            self.t0 = now
            return
        # a trial is a quarter of a window, at most 0.2 s: at the wrong count on a busy machine a step is
        # 17x slower (a tenth, 2 steps at least, was too noisy to tell 1.4x apart on a quiet one)
        steps, seconds = (
            (max(5, self.window // 4), self.WINDOW_SECONDS / 2.5)
            if trial
            else (self.window, 2 * self.WINDOW_SECONDS)
        )
        if self.n < steps and now - self.t0 < seconds:
            return
        speed = self.examples / max(now - self.t0, 1e-9)
        self.n = self.examples = 0
        self.t0 = now
        self.speed[self.current] = speed
        if self.trial_from is not None:
            self._end_trial(speed)
            return
        self.peak = max(self.peak, speed)
        self.since_trial += 1
        if speed < 0.5 * self.peak or self.since_trial >= self.explore_every:
            others = [t for t in self.options if t != self.current]
            if others:
                self.trial_from, self.trial_warm = self.current, False
                self._set(max(others, key=lambda t: self.speed.get(t, float("inf"))))

    def _end_trial(self, speed: float) -> None:
        back, self.trial_from, self.since_trial = self.trial_from, None, 0
        assert back is not None
        if speed < TRIAL_MARGIN * self.speed[back]:  # the trial lost: back, and explore less often
            self._set(back)
            self.explore_every = min(max(2 * self.explore_every, self.EXPLORE_EVERY), 8 * self.EXPLORE_EVERY)
            self.peak = self.speed[back]  # the slower present is the new normal at this count
        else:
            self.explore_every = self.EXPLORE_EVERY
            self.peak = speed
            if self.on_switch is not None:
                self.on_switch(self.current, dict(self.speed))

    def _set(self, threads: int) -> None:
        self.current = threads
        self.set_threads(threads)
