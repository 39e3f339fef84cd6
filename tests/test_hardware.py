"""train.threads 0 / train.precision auto on the CPU: decided by timing the step (engine/hardware.py)."""

import json

import pytest
import torch

from turbovae import runtime
from turbovae.cli import main
from turbovae.config import resolve
from turbovae.engine import hardware
from turbovae.engine.setup import setup


@pytest.fixture
def measuring(monkeypatch):
    monkeypatch.setenv(hardware.PROBE_ENV, "1")


def test_options_follow_the_settings(measuring, monkeypatch):
    cpu = torch.device("cpu")
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: True)
    assert hardware.options(resolve(overrides=[]), cpu, 1) == ([1, 2], ["fp32", "bf16"])
    pinned = resolve(overrides=["train.threads=2", "train.precision=fp32"])
    assert hardware.options(pinned, cpu, 1) == ([], [])
    assert hardware.options(resolve(overrides=[]), cpu, 2) == ([], [])  # data-parallel ranks: no probe
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: False)
    assert hardware.options(resolve(overrides=[]), cpu, 1) == ([1, 2], [])
    monkeypatch.setenv(hardware.PROBE_ENV, "0")
    assert hardware.options(resolve(overrides=[]), cpu, 1) == ([], [])


def test_choose_times_every_pair_and_keeps_the_fastest_without_touching_the_run(measuring):
    cfg = resolve(flags={"data.name": "digits"}, overrides=["train.batch_size=64"])
    s = setup(cfg, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in s.vae.state_dict().items()}
    torch.set_num_threads(2)
    choice = hardware.choose(cfg, s, 64, [1, 2], ["fp32", "bf16"])
    assert choice is not None
    assert set(choice.speeds) == {f"{t} thread(s), {p}" for t in (1, 2) for p in ("fp32", "bf16")}
    assert all(v > 0 for v in choice.speeds.values())
    # the precision whose step costs one thread less CPU time, then the faster thread count at it
    assert set(choice.cpu_seconds) == {"fp32", "bf16"} and all(v > 0 for v in choice.cpu_seconds.values())
    cost, flags = choice.cpu_seconds, s.precision
    cheapest = min(cost, key=lambda p: cost[p])
    assert choice.precision == (
        flags if cost[flags] <= hardware.PRECISION_MARGIN * cost[cheapest] else cheapest
    )
    assert choice.by_threads == {t: choice.speeds[f"{t} thread(s), {choice.precision}"] for t in (1, 2)}
    assert choice.threads == max(choice.by_threads, key=lambda t: choice.by_threads[t])
    assert torch.get_num_threads() == 2  # the caller sets the chosen count
    for k, v in s.vae.state_dict().items():  # the probe trained a copy
        assert torch.equal(v, before[k]), k
    assert hardware.choose(cfg, s, 64, [2], []) is None  # one candidate: nothing to time


class FakeCPU:
    """A clock that advances by the step time of the current thread count under the current load."""

    def __init__(self) -> None:
        self.threads, self.now, self.busy = 2, 0.0, False
        self.log: list[int] = []

    def step_seconds(self) -> float:
        if self.threads == 2:
            return 0.017 if self.busy else 0.001  # two threads: 17x slower with the cores taken
        return 0.002 if self.busy else 0.0018

    def set_threads(self, n: int) -> None:
        self.threads = n

    def clock(self) -> float:
        return self.now

    def run(self, watch: hardware.ThreadWatch, steps: int) -> list[int]:
        counts = []
        for _ in range(steps):
            self.now += self.step_seconds()
            watch.tick(100)
            counts.append(self.threads)
        return counts


def test_thread_watch_leaves_two_threads_when_the_machine_gets_busy_and_comes_back():
    cpu = FakeCPU()
    switches = []
    speeds = {1: 100 / 0.0018, 2: 100 / 0.001}
    note = switches.append
    watch = hardware.ThreadWatch([1, 2], 2, speeds, 100, lambda n, _: note(n), cpu.set_threads, cpu.clock)
    quiet = cpu.run(watch, 3000)
    assert quiet.count(1) < 0.05 * len(quiet)  # on a quiet machine: two threads, trials now and then
    assert switches == []
    cpu.busy = True
    busy = cpu.run(watch, 3000)
    assert switches[:1] == [1]  # the collapse was noticed and one thread kept
    assert busy[-1000:].count(1) > 0.95 * 1000
    cpu.busy = False
    cpu.run(watch, 300_000)  # exploration (every 30 s to 4 min) finds that two threads are fast again
    assert switches[-1] == 2 and cpu.threads == 2


def test_thread_watch_corrects_a_probe_that_picked_the_slower_count_within_seconds():
    """The start's probe, disturbed by a moment of other work, put one thread ahead; on the quiet
    machine two are 1.8x as fast: the first trial (about 5 s in, not 30 s) moves to two threads."""
    cpu = FakeCPU()
    cpu.threads = 1
    switches = []
    speeds = {1: 100 / 0.0018, 2: 100 / 0.004}  # what the probe measured: two threads looked slow
    watch = hardware.ThreadWatch(
        [1, 2], 1, speeds, 100, lambda n, _: switches.append(n), cpu.set_threads, cpu.clock
    )
    cpu.run(watch, 5000)  # 9 s at one thread's speed
    assert switches == [2] and cpu.threads == 2
    assert cpu.now < 9.0


class WakingCPU(FakeCPU):
    """Two threads 1.4x as fast as one, but the first step after a change of thread count pays 20 ms
    (the pool's threads waking up, cold caches)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads, self.woken = 1, True

    def set_threads(self, n: int) -> None:
        self.woken = n == self.threads
        self.threads = n

    def step_seconds(self) -> float:
        wake, self.woken = (0.0 if self.woken else 0.02), True
        return wake + (0.001 if self.threads == 2 else 0.0014)


def test_a_trial_does_not_time_the_first_step_at_the_new_count():
    cpu = WakingCPU()
    switches = []
    speeds = {1: 100 / 0.0014, 2: 100 / 0.004}  # a disturbed probe: two threads looked slow
    watch = hardware.ThreadWatch(
        [1, 2], 1, speeds, 100, lambda n, _: switches.append(n), cpu.set_threads, cpu.clock
    )
    cpu.run(watch, 6000)
    assert switches == [2] and cpu.threads == 2


def test_a_measured_run_logs_its_choice_and_a_resumed_one_keeps_its_precision(
    measuring, monkeypatch, tmp_path
):
    calls = []
    real = hardware.choose

    def choose(cfg, s, batch, threads, precisions, **kw):
        calls.append(list(precisions))
        if precisions:  # the start picks fp32 (the CPU flags alone would say bf16): kept on resume?
            return hardware.Choice(1, "fp32", {"1 thread(s), fp32": 1.0}, {1: 1.0}, {"fp32": 1.0})
        return real(cfg, s, batch, threads, precisions, **kw)

    monkeypatch.setattr(runtime, "fast_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "choose", choose)
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--epochs", "2", "--out", str(out), "--progress", "off"]
    assert main([*args, "--checkpoint-every", "11", "train.time_limit=0.001"]) == 0
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["precision"] == "fp32" and start["probe"] == {"1 thread(s), fp32": 1.0}
    assert main(["train", "--resume", str(out), "--progress", "off", "train.time_limit=0"]) == 0
    assert calls[0] == ["fp32", "bf16"] and calls[1] == []  # resumed: the precision is not measured again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["steps"] == 22  # it did resume and finish
