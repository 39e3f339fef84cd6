"""A run directory written by the previous release still loads and gives the same figures.

tests/data/run-0.1.0 was written by turbovae 0.1.0 (tests/data/README.md says how), whose config.yaml
holds every model family's options, as the one ModelConfig of that release did; the families now have
dataclasses of their own, and the other families' options are dropped on load. The expected outputs
beside it were computed by that release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import turbovae
from turbovae.cli import main
from turbovae.models import MLPConfig

DATA = Path(__file__).resolve().parent / "data"
RUN = DATA / "run-0.1.0"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)  # eval writes into the run directory
    return run


def test_the_old_config_holds_every_familys_options() -> None:
    model = yaml.safe_load((RUN / "config.yaml").read_text())["model"]
    assert {"hidden", "channels", "embedding", "cell", "groups", "patch", "init_output_bias"} <= set(model)


def test_load_gives_the_outputs_of_the_release_that_wrote_it(old_run: Path) -> None:
    vae = turbovae.load(old_run)
    assert isinstance(vae.config.model, MLPConfig) and vae.config.model.hidden == [32]
    assert not hasattr(vae.config.model, "channels")  # another family's option, dropped
    expected = load_file(str(DATA / "run-0.1.0.outputs.safetensors"))
    x = expected["x"]
    with torch.no_grad():
        q = vae.encode(x)
        got = {
            "loc": q.loc,
            "log_scale": q.log_scale,
            "reconstruction": vae.reconstruct(x),
            "samples": vae.sample(4, generator=torch.Generator().manual_seed(0)),
        }
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_eval_on_the_old_run_gives_the_old_figures(old_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", str(old_run), "--iwae-k", "10", "--seed", "0", "--threads", "1", "--precision", "fp32"]
    assert main([*argv, "--json", "--out", "-"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = json.loads((DATA / "run-0.1.0.eval.json").read_text())
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float | list) else value), key
