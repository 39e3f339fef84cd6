"""Data-parallel training under torchrun (CPU, gloo, 2 processes): 2 ranks with batch B compute what 1
process with batch 2B computes; a checkpoint of 2 ranks continues on 1 or 2 identically; a rank that
dies ends the job quickly with a clear message and an intact checkpoint; torchrun's restarts resume."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from turbovae.config import resolve
from turbovae.engine import checkpoint, distributed
from turbovae.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed"
)

# 1,617 training digits less 162 held out for validation, global batch 32: 45 steps an epoch, 90 in all;
# checkpoints every 30 steps
PER_RANK = 16
ARGS = ["--data", "digits", "--hidden", "64", "--latent", "8", "--epochs", "2", "--checkpoint-every", "30",
        "--progress", "off", "train.threads=1", "train.compile=off", "train.precision=fp32", "eval.iwae_k=3",
        "train.log_every=5", "train.keep_checkpoints=10"]  # fmt: skip
STEPS = 2 * ((1617 - 162) // (2 * PER_RANK))

# torchrun's entry point for the kill tests: rank 1 SIGKILLs itself before its KILL_AT_STEP-th step,
# in the first attempt only (a restarted worker group runs normally)
WRAPPER = textwrap.dedent(
    """
    import os, signal, sys
    import turbovae.engine.loop as t

    at = int(os.environ.get("KILL_AT_STEP", "0"))
    if at and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        original = t.make_step

        def make_step(*args, **kwargs):
            step, calls = original(*args, **kwargs), {"n": 0}

            def counted(*a):
                calls["n"] += 1
                if calls["n"] == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return step(*a)

            return counted

        t.make_step = make_step
    from turbovae.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def torchrun(argv: list[str], *, script: Path | None = None, restarts: int = 0, **extra: str):
    """``python -m torch.distributed.run --nproc-per-node 2 ... -m turbovae ARGV`` (or SCRIPT ARGV)."""
    target = [str(script)] if script else ["-m", "turbovae"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "--max-restarts", str(restarts), *target, *argv]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra), timeout=120)


def single(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turbovae", *argv], capture_output=True, text=True,
                          env=env(), timeout=120)  # fmt: skip


def final_state(out: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(out)
    assert path is not None
    tensors, meta = checkpoint.load(path)
    assert meta["loop"]["step"] == steps and meta["loop"]["global_batch"] == 2 * PER_RANK
    keep = ("model.", "optim.", "guard.", "rng.data", "rng.model", "loop.perm")
    return {k: v for k, v in tensors.items() if k.startswith(keep)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to float tolerance (the ranks sum the gradient in another order than one process)."""
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
        else:  # the data order and noise generators, the epoch's permutation: exactly the same
            assert torch.equal(a[k], b[k]), k


def events(out: Path, name: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted run of 2 ranks with PER_RANK examples each."""
    out = tmp_path_factory.mktemp("ddp") / "ref"
    proc = torchrun(["train", *ARGS, "--batch-size", str(PER_RANK), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test NELBO") == 1  # rank 0's result line only
    (start,) = events(out, "start")  # one writer: rank 0
    assert start["ranks"] == 2 and start["global_batch"] == 32 and start["lr_factor"] == pytest.approx(2**0.5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["global_batch"] == 32 and "DDP over 2" in summary["compile"]
    assert math.isfinite(summary["test_nll_iwae"]) and summary["test_nll_iwae_stderr"] > 0
    return final_state(out)


@pytest.mark.slow  # torchrun, two processes
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, reference):
    # the same global batch; Adam's learning rate on 2 ranks is scaled by √2, so here it is given
    lr = 1e-3 * math.sqrt(2)
    out = tmp_path / "one"
    proc = single(["train", *ARGS, "--batch-size", str(2 * PER_RANK), "--lr", repr(lr), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(reference, final_state(out))


@pytest.mark.slow  # torchrun, two processes
def test_a_killed_rank_stops_the_job_and_its_checkpoint_resumes_on_one_and_on_two_ranks(tmp_path, reference):
    out, script = tmp_path / "killed", tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    t0 = time.monotonic()
    proc = torchrun(["train", *ARGS, "--batch-size", str(PER_RANK), "--out", str(out)], script=script,
                    KILL_AT_STEP="40")  # fmt: skip
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    # rank 0 says what happened and what to do; torchrun names the rank that died
    message = "turbovae: error: rank 0 of 2 lost contact with the other ranks"
    assert message in proc.stderr, proc.stderr[-3000:]
    assert f"--resume {out}" in proc.stderr
    assert "SIGKILL" in proc.stderr
    last = checkpoint.latest(out)
    assert last is not None and last.name == "step-000000030.json"
    checkpoint.load(last)

    shutil.copytree(out, tmp_path / "copy")
    # side by side: 1 process takes the whole global batch of 32; 2 ranks through the --nproc
    # convenience (torchrun --standalone on this machine)
    one, two = (subprocess.Popen([sys.executable, "-m", "turbovae", "train", *nproc, "--resume", str(run)],
                                 stderr=subprocess.PIPE, text=True, env=env())
                for nproc, run in (([], out), (["--nproc", "2"], tmp_path / "copy")))  # fmt: skip
    for proc in (one, two):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    assert_same(reference, final_state(out))
    assert_same(reference, final_state(tmp_path / "copy"))


@pytest.mark.slow  # torchrun, two processes
def test_torchrun_restarts_resume_from_the_last_checkpoint(tmp_path, reference):
    out, script = tmp_path / "elastic", tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    proc = torchrun(["train", *ARGS, "--batch-size", str(PER_RANK), "--out", str(out)], script=script,
                    restarts=1, KILL_AT_STEP="40")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = events(out, "start")
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 30
    assert_same(reference, final_state(out))


@pytest.mark.slow  # torchrun, two processes
def test_a_time_limit_stops_both_ranks_after_the_same_step(tmp_path):
    """train.time_limit under torchrun: each rank reads its own clock at the log interval and the ranks
    agree (any rank over the limit stops all), so both leave the loop after the same step (a rank that
    went on alone would hang in its next all-reduce until the test's timeout) and rank 0 writes."""
    out = tmp_path / "limited"
    proc = torchrun(["train", *ARGS, "--epochs", "1000", "--batch-size", str(PER_RANK), "--out", str(out),
                     "train.time_limit=1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (stop,) = events(out, "time_limit")
    assert stop["step"] == summary["steps"] and summary["steps"] % 5 == 0
    # rank 0's clock (the summary's) may be a little behind the rank whose clock stopped them
    assert summary["train_seconds"] > 0.5 and summary["time_limited_epochs"] < 1000


# ---- without processes --------------------------------------------------------------------------------


def test_learning_rate_scaling_rule():
    adam, sgd = resolve("digits-mlp"), resolve("digits-mlp", overrides=["train.optimizer=sgd"])
    assert distributed.lr_factor(adam, 4) == 2.0 and distributed.lr_factor(sgd, 4) == 4.0
    assert distributed.lr_factor(adam, 1) == 1.0
    assert distributed.scaled_lr(adam, 1.0) is adam
    assert distributed.scaled_lr(adam, 2.0).train.lr == 2 * adam.train.lr and adam.train.lr == 1e-3


def test_global_batch_must_split_evenly():
    assert distributed.local_batch(32, 4, 16) == 8
    with pytest.raises(ConfigError, match="3 ranks cannot share it evenly"):
        distributed.local_batch(32, 3, 16)


def test_single_process_context_changes_nothing():
    ctx = distributed.Context()
    x = torch.arange(10)
    assert ctx.shard(x) is x and ctx.main and ctx.broadcast("a") == "a"
    sums = torch.ones(3)
    assert ctx.reduce_stats(sums, True, False) == (True, False) and torch.equal(sums, torch.ones(3))


def test_shard_takes_every_world_th_row():
    ctx = distributed.Context(rank=1, world=3)
    assert ctx.shard(torch.arange(9)).tolist() == [1, 4, 7]
    assert ctx.shard(torch.zeros(5, 9, 2), dim=-2).shape == (5, 3, 2)


def test_nproc_launcher_argv_and_refusal_under_torchrun(monkeypatch):
    argv = ["train", "--nproc", "2", "--epochs", "1", "--nproc=4", "train.lr=1e-3"]
    assert distributed.strip_nproc(argv) == ["train", "--epochs", "1", "train.lr=1e-3"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="under torchrun, leave --nproc out"):
        distributed.launch(["train"], 2)
