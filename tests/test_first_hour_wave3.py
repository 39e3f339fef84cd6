"""A user's first hour, wave 3 (issue 33): each test is an item of the issue's list, or one of its
"measured on held-out data" findings, and failed on the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import turbovae
from turbovae.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_all_extra_installs_every_optional_feature():
    """`pip install 'turbovae[all]'` installed only the base package: there was no `all` extra."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    features = {r for name, reqs in extras.items() if name not in ("all", "dev", "optimizers") for r in reqs}
    assert set(extras["all"]) == features
    assert len(extras["all"]) == len(features)  # each once


def test_the_hub_export_keeps_no_local_path_of_the_training_machine(tmp_path):
    """The Hub export's config.json and config.yaml held the training data's absolute local path (and
    data.dir, a TensorBoard folder): the data keep their file name only, the folders are cleared."""
    data = tmp_path / "private" / "faces.npy"
    data.parent.mkdir()
    rng = np.random.default_rng(0)
    np.save(data, (rng.random((300, 1, 8, 8)) * 255).astype(np.uint8))
    run, out = tmp_path / "run", tmp_path / "hub"
    argv = ["--data", f"{data}", "--hidden", "16", "--latent", "2", "--batch-size", "32", "--epochs", "1",
            "--progress", "off", "eval.iwae_k=2", "train.compile=off", f"data.dir={tmp_path / 'cache'}",
            f"train.tensorboard={tmp_path / 'tb'}"]  # fmt: skip
    assert main(["train", *argv, "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "hub", "--out", str(out)]) == 0
    for name in ("config.json", "config.yaml"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert str(data.parent) not in (out / "README.md").read_text()  # (its usage names the export folder)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["data"]["name"] == "faces.npy" and config["data"]["dir"] is None
    assert config["train"]["tensorboard"] is None
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["name"] == "faces.npy"
    vae = turbovae.from_pretrained(out)
    assert vae.config.data.name == "faces.npy"
