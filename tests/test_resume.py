"""Runs that survive: SIGKILL at chosen moments (mid-epoch, halfway through writing a checkpoint file,
between a checkpoint's two files), resumed each time, end bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from turbovae.engine import checkpoint

pytestmark = pytest.mark.slow  # killed and resumed CLI processes, several runs each

# every piece of state a step changes: lr schedule, cyclical β, weight average, the adaptive skip's
# running norm, clipping, the noise-scale probe
ARGS = ["--data", "digits", "--hidden", "64,64", "--latent", "8", "--batch-size", "64", "--epochs", "5",
        "--checkpoint-every", "7", "--progress", "off", "train.threads=1", "train.log_every=5",
        "eval.iwae_k=3", "train.schedule=warmup-cosine", "train.warmup_steps=20", "train.kl_cycles=2",
        "train.ema=0.99", "train.skip_grad=5", "train.clip_grad=50", "train.noise_scale_every=3"]  # fmt: skip

# Runs the CLI with a kill plan: "step:N" (SIGKILL before training step N of this process),
# "partial:N" (SIGKILL halfway through writing the N-th checkpoint file) or "between:N" (SIGKILL just
# before the N-th file write: with N even, after a checkpoint's tensors and before its JSON).
WRAPPER = textwrap.dedent(
    """
    import os, signal, sys, tempfile, time
    import turbovae.engine.checkpoint as c
    import turbovae.engine.loop as t

    kind, _, n = os.environ.get("KILL_PLAN", "").partition(":")
    n = int(n or 0)
    writes = {"n": 0}
    original_write, original_step = c.atomic_write, t.make_step

    def atomic_write(path, data):
        writes["n"] += 1
        if writes["n"] == n and kind == "partial":
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        if writes["n"] == n and kind == "between":
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, data)

    def make_step(*args, **kwargs):
        step, calls = original_step(*args, **kwargs), {"n": 0}

        def counted(*a):
            calls["n"] += 1
            if kind == "step" and calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "slow":
                time.sleep(n / 1000)
            return step(*a)

        return counted

    c.atomic_write, t.make_step = atomic_write, make_step
    from turbovae.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def run(tmp: Path, argv: list[str], plan: str = "") -> subprocess.CompletedProcess:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "KILL_PLAN": plan, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(out)
    assert path is not None
    tensors, meta = checkpoint.load(path)
    assert meta["loop"]["epoch"] == 5
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim.", "ema.", "guard."))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run every interrupted one must match bit for bit."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run(tmp, ["train", *ARGS, "--out", str(tmp / "ref")])
    assert proc.returncode == 0, proc.stderr
    return final_state(tmp / "ref")


def test_sigkill_at_many_points_then_resume_is_bitwise_identical(tmp_path, reference):
    out = tmp_path / "killed"
    first = run(tmp_path, ["train", *ARGS, "--out", str(out)], plan="step:3")  # before any checkpoint
    assert first.returncode == -signal.SIGKILL
    plans = ["partial:1", "step:30", "between:4", "partial:5", "step:41"]
    for plan in plans:
        proc = run(tmp_path, ["train", "--resume", str(out)], plan=plan)
        assert proc.returncode == -signal.SIGKILL, (plan, proc.returncode, proc.stderr)
    done = run(tmp_path, ["train", "--resume", str(out)])
    assert done.returncode == 0, done.stderr

    a, b = reference, final_state(out)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 * ((1617 - 162) // 64)  # 162 training digits held out for validation


def test_sigterm_checkpoints_prints_the_resume_command_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "term"
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    # slowed down (not lengthened: the lr and β schedules depend on the run's length) to be stopped mid-run
    env = {**os.environ, "KILL_PLAN": "slow:40", "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, str(script), "train", *ARGS, "--out", str(out)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"turbovae train --resume {out}" in err and "Traceback" not in err
    path = checkpoint.latest(out)
    assert path is not None
    stopped_at = checkpoint.load(path)[1]["loop"]["step"]
    assert stopped_at > 0
    # continue: the same parameters as if never stopped
    done = run(tmp_path, ["train", "--resume", str(out)])
    assert done.returncode == 0, done.stderr
    b = final_state(out)
    assert all(torch.equal(reference[k], b[k]) for k in reference)


def test_sigkill_after_best_before_the_first_step_checkpoint_then_resume_is_bitwise_identical(tmp_path):
    """Issue 33, high 5: with checkpoints every 30 steps and 22 steps an epoch, the first epoch writes
    best.* (files 1 and 2) before the first step checkpoint (file 3). Killed between the two, the run
    could not be resumed ("start over with --overwrite"); it now starts over with its seed."""
    args = [a if a != "7" else "30" for a in ARGS]  # --checkpoint-every 30
    ref = run(tmp_path, ["train", *args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    first = run(tmp_path, ["train", *args, "--out", str(out)], plan="between:3")
    assert first.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "best.json").is_file() and not checkpoint.step_files(out / "checkpoints")
    done = run(tmp_path, ["train", "--resume", str(out)])
    assert done.returncode == 0, done.stderr
    assert "from the start" in done.stderr and "Traceback" not in done.stderr
    a, b = final_state(tmp_path / "ref"), final_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = [(p / "checkpoints" / "best.safetensors").read_bytes() for p in (tmp_path / "ref", out)]
    assert best[0] == best[1]
