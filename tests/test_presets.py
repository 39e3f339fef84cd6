"""Every shipped preset loads and trains: a few steps of each on small data made here (the presets'
own data, Fashion-MNIST or the word list, are replaced by tiny stand-ins of the same shape), then the
run directory's summary.json and config.yaml are checked against the preset.

The list is read at collection time from turbovae.config.preset_names(): a new YAML file in
src/turbovae/configs/ is covered without touching this file (STAND_INS says what data it trains on)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from turbovae.cli import main
from turbovae.config import from_dict, load_preset, preset_names, resolve, to_yaml
from turbovae.models import MODELS

# a few steps, one epoch, a cheap test log-likelihood, one thread
QUICK = ["train.epochs=1", "train.batch_size=16", "eval.iwae_k=2", "train.threads=1", "train.compile=off",
         "train.log_every=2"]  # fmt: skip


def image_npz(path: Path, shape: tuple[int, ...], n_train: int = 64, n_test: int = 16) -> Path:
    """Random 8-bit images of ``shape`` (C, H, W) with smooth structure, in the keras layout."""
    rng = np.random.default_rng(0)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)

    def images(n: int) -> np.ndarray:
        phase = rng.uniform(0, 2 * np.pi, size=(n, c, 1, 1))
        freq = rng.uniform(2, 6, size=(n, c, 1, 1))
        wave = 0.5 + 0.5 * np.sin(freq * (xx + yy)[None, None] * np.pi + phase)
        return (255 * wave).astype(np.uint8)

    np.savez(path, x_train=images(n_train), x_test=images(n_test))
    return path


def text_file(path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "red", "log", "fast"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(2, 7)))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_file(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["height", "age", "colour", "smoker"])
        for _ in range(n):
            out.writerow([f"{rng.normal(170, 10):.1f}", int(rng.integers(18, 90)),
                          rng.choice(["red", "green", "blue"]), rng.choice(["yes", "no"])])  # fmt: skip
    return path


def stand_in(preset: dict, tmp_path: Path) -> list[str]:
    """Overrides that replace the preset's data by a small local stand-in of the same kind and shape."""
    data, model = preset.get("data", {}), preset.get("model", {})
    name = data.get("name")
    if model.get("likelihood") == "mixed":  # tables
        return [f"data.name=csv:{csv_file(tmp_path / 'table.csv')}"]
    if model.get("likelihood") == "categorical":  # text
        return [f"data.name=text:{text_file(tmp_path / 'lines.txt')}"]
    if name == "digits":  # built in: the preset's own data, 1,617 training images in a few large batches
        return ["train.batch_size=256"]
    if name == "fashion-mnist":
        return [f"data.name={image_npz(tmp_path / 'fmnist.npz', (1, 28, 28))}"]
    if name == "photos":  # scikit-image's photos as crops: three small photos of other sizes
        rng = np.random.default_rng(0)
        (tmp_path / "photos").mkdir()
        for i, size in enumerate(((40, 36), (36, 52), (33, 33))):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                tmp_path / f"photos/{i}.png"
            )
        return [f"data.name={tmp_path / 'photos'}", "data.crop=16"]
    if name is None and data.get("resize") in ("32x32", "8x8"):  # the user's own colour images
        side = int(data["resize"].partition("x")[0])
        return [f"data.name={image_npz(tmp_path / 'colour.npz', (3, side, side))}"]
    raise AssertionError(f"no small stand-in for this preset's data ({data}): add one to stand_in()")


# What a model needs on top (hierarchical VAEs: 11-13 groups of a GPU-sized net take seconds a step
# on a CPU: narrower channels, the same levels, groups, patch and likelihood)
SHRINK = {"hvae": {"fmnist-hvae-gpu": ["model.channels=[16,16,16,16,16]"],
                   "hvae-32-colour": ["model.channels=[16,16,16,16,16]"]},
          "autoencoder-kl": {"photos-ae-kl": ["model.channels=[8,16,16]", "model.disc_channels=8",
                                              "model.disc_start=0", "model.disc_layers=2"]}}  # fmt: skip


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_to_its_model_familys_options(name):
    preset = load_preset(name)
    cfg = resolve(name)  # validated
    family = MODELS[preset["model"]["name"]].config
    assert type(cfg.model) is family
    assert set(preset["model"]) <= set(yaml.safe_load(to_yaml(cfg))["model"]), "options of another family"
    assert all(getattr(cfg.model, key) == value for key, value in preset["model"].items())
    assert from_dict(cfg.to_dict()) == cfg  # config.yaml reads back as the same config


SLOW_PRESETS = {"photos-ae-kl"}  # about 5 s (the GAN's two players on photo crops): with the slow tests


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PRESETS else n for n in preset_names()]
)
def test_every_preset_trains_a_few_steps(name, tmp_path, capsys):
    preset = load_preset(name)
    model = preset["model"]
    overrides = [*QUICK, *stand_in(preset, tmp_path), *SHRINK.get(model["name"], {}).get(name, [])]
    out = tmp_path / "run"
    code = main(["train", "--config", name, "--out", str(out), "--progress", "off", *overrides])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test_nelbo"]) and summary["steps"] > 0
    assert summary["model"] == model["name"] and summary["likelihood"] == model["likelihood"]
    assert summary["iwae_k"] == 2 and math.isfinite(summary["test_nll_iwae"])
    # the preset's own settings reached the run, except those overridden here
    saved = yaml.safe_load((out / "config.yaml").read_text())
    overridden = {o.partition("=")[0] for o in overrides}
    for section, values in preset.items():
        for key, value in values.items():
            if f"{section}.{key}" not in overridden:
                assert saved[section][key] == value, f"{section}.{key}"
