"""benchmarks/paired_iwae.py: the per-image IWAE differences behind the README's "A beats B" claims."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from turbovae.cli import main

pytestmark = pytest.mark.slow  # three training runs and an IWAE script per test

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_iwae.py"
FAST = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "--progress", "off",
        "eval.iwae_k=0"]  # fmt: skip


def paired(a: Path, b: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), str(a), str(b), "--iwae-k", "8", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paired")
    out = {"short": root / "short", "long": root / "long", "other": root / "other"}
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out["short"])]) == 0
    assert main(["train", *FAST, "--epochs", "8", "--out", str(out["long"])]) == 0
    grey = ["--likelihood", "continuous-bernoulli", "--binarize", "none"]  # the others: binarised (auto)
    assert main(["train", *FAST, "--epochs", "1", *grey, "--out", str(out["other"])]) == 0
    return out


def test_a_run_against_itself_differs_by_exactly_zero(runs):
    r = paired(runs["long"], runs["long"])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["a_minus_b"] == 0 and res["paired_stderr"] == 0 and res["a_better_fraction"] == 0
    assert res["n"] == 180  # digits' test split


def test_the_longer_run_wins_and_the_paired_error_is_the_smaller_one(runs):
    r = paired(runs["long"], runs["short"])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    a, b = res["a"], res["b"]
    assert res["a_minus_b"] == pytest.approx(a["nll"] - b["nll"], abs=1e-9)
    assert res["a_minus_b"] < 0 and res["a_better_fraction"] > 0.5  # 8 epochs against 1
    # the same images in both: their differences spread less than two independent means would
    assert 0 < res["paired_stderr"] < (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5


def test_runs_scored_on_different_images_are_refused(runs):
    r = paired(runs["short"], runs["other"])  # a binarised draw against grey values
    assert r.returncode == 2 and "test images differ" in r.stderr
