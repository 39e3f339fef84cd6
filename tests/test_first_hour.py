"""A user's first hour (issue 22): progress on long work, outputs that fit the data, a comparison
report that ranks only what compares, sharper messages, the API gaps, the front door."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

import turbovae
from turbovae.cli import main
from turbovae.progress import Progress

# a tiny digits run: seconds on two busy cores
TINY = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "train.log_every=5",
        "eval.iwae_k=5", "train.compile=off"]  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "digits"
    assert main(["train", *TINY, "--epochs", "1", "--progress", "off", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from turbovae.data.tables import export_tables

    return {p.stem: p for p in export_tables(tmp_path_factory.mktemp("tables"))}


@pytest.fixture(scope="module")
def wine_run(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "wine"
    args = ["--data", f"csv:{tables['wine']}", "--batch-size", "64", "--epochs", "20", "--progress", "off"]
    assert main(["train", *args, "eval.iwae_k=5", "--out", str(out)]) == 0
    return out


@pytest.fixture
def lines_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain progress lines at every update (the interval is 10 s by default)."""
    monkeypatch.setenv("TURBOVAE_PROGRESS_INTERVAL", "0")


# ---- 1. progress on long work ------------------------------------------------------------------------


def test_progress_writes_a_plain_line_every_interval_when_stderr_is_not_a_terminal():
    clock, out = FakeClock(), io.StringIO()  # a StringIO is not a terminal
    with Progress(100, "IWAE k=1000", "examples", file=out, interval=10, clock=clock) as bar:
        for t in (1, 5, 11, 15, 25):
            clock.now = t
            bar.update(10)
    lines = out.getvalue().splitlines()
    assert lines == [
        "turbovae: IWAE k=1000: 30 of 100 examples (30%), 11 s elapsed, ETA 26 s",
        "turbovae: IWAE k=1000: 50 of 100 examples (50%), 25 s elapsed, ETA 25 s",
        "turbovae: IWAE k=1000: done, 50 examples in 25 s",
    ]
    quiet = io.StringIO()  # work that ends before the first interval says nothing
    with Progress(10, "short", file=quiet, interval=10, clock=FakeClock()) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_training_and_its_final_evaluation_show_progress_without_a_terminal(tmp_path, capsys, lines_at_once):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "turbovae: training: 5 of 22 steps (23%)" in err and "ETA" in err
    # the final evaluation says up front what it costs and how to skip it, then shows its progress
    assert "final evaluation: IWAE log-likelihood with k=5 samples on 180 test examples" in err
    assert "eval.iwae_k=0 skips it" in err
    assert "turbovae: IWAE k=5: " in err and "of 180 examples" in err
    assert main(["train", *TINY, "--epochs", "1", "--progress", "off", "--out", str(tmp_path / "quiet")]) == 0
    assert "turbovae: training" not in capsys.readouterr().err


def test_eval_report_fidelity_and_tune_report_progress(digits_run, wine_run, tmp_path, capsys, lines_at_once):
    assert main(["eval", str(digits_run), "--iwae-k", "3", "--out", "-"]) == 0
    err = capsys.readouterr().err
    assert "turbovae: IWAE k=3: " in err and "of 180 examples" in err
    assert main(["report", str(digits_run)]) == 0
    assert "turbovae: report: " in capsys.readouterr().err
    assert main(["eval", str(wine_run), "--fidelity", "--out", "-"]) == 0
    assert "turbovae: fidelity: " in capsys.readouterr().err
    tune = ["tune", *TINY, "--budget", "2", "--out", str(tmp_path / "tuned.yaml")]
    assert main(tune) == 0
    err = capsys.readouterr().err
    assert "turbovae: tune: 1 s elapsed of 2 s" in err and "turbovae: tune: done in" in err


def test_iwae_calls_its_progress_callback_for_every_batch(digits_run):
    vae = turbovae.load(digits_run)
    x = torch.bernoulli(torch.full((30, 1, 8, 8), 0.3))
    seen: list[int] = []
    turbovae.evaluation.iwae_nll(vae, x, lambda t: t, k=4, batch_size=8, progress=seen.append)
    assert seen == [8, 8, 8, 6]


def test_the_profiler_record_function_warning_of_compiled_steps_is_dropped():
    from turbovae import runtime

    runtime.quiet_compile_logs()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.variables.ctx_manager")
    handler = Keep()
    log.addHandler(handler)
    try:
        cls = "<class 'torch.autograd.profiler.record_function'>"
        log.warning("Profiler record function %s will be ignored", cls)
        log.warning("something else")
    finally:
        log.removeHandler(handler)
    assert records == ["something else"]


@pytest.mark.slow
def test_a_compiled_optimiser_step_prints_no_profiler_warning(capfd):
    from turbovae import runtime

    m = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(m.parameters())

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = m(x).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    runtime.compile_fn(step, torch.device("cpu"))(torch.randn(2, 4))
    assert "Profiler record function" not in capfd.readouterr().err
