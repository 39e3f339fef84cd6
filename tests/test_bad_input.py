"""Bad input beyond the basics in test_cli.py: each ends with one line, exit code 2, nothing changed;
and property-based tests that feed random bytes and values to the loaders and the config parser."""

import contextlib
import hashlib
import io
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from turbovae import config
from turbovae.cli import main
from turbovae.data import load_dataset
from turbovae.engine import checkpoint
from turbovae.errors import TurboVAEError

FAST = ["--hidden", "16", "--latent", "2", "--batch-size", "32", "--epochs", "1", "--progress", "off",
        "eval.iwae_k=2", "eval.every_epoch=false"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(["train", "--data", "digits", *FAST, "--out", str(out)]) == 0
    return out


def expect_error(capsys, argv: list[str], expected: str) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("turbovae: error:") and expected in lines[0], lines
    return lines[0]


def test_image_folder_of_mixed_sizes_needs_resize(tmp_path, earlier, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("L", (8, 8) if i else (12, 8), color=i * 5).save(folder / f"{i:02d}.png")
    before = snapshot(earlier)
    expect_error(
        capsys, ["train", "--data", str(folder), *FAST, "--out", str(earlier), "--overwrite"], "--resize"
    )
    assert snapshot(earlier) == before
    assert (
        main(["train", "--data", str(folder), "--resize", "8x8", *FAST, "--out", str(tmp_path / "ok")]) == 0
    )


def test_npz_without_the_expected_arrays(tmp_path, earlier, capsys):
    np.savez(tmp_path / "odd.npz", foo=np.zeros((3, 4)), bar=np.zeros(3))
    before = snapshot(earlier)
    line = expect_error(capsys, ["train", "--data", str(tmp_path / "odd.npz"), *FAST, "--out", str(earlier),
                                 "--overwrite"], "x_train")  # fmt: skip
    assert "odd.npz" in line and "foo" in line
    assert snapshot(earlier) == before


def test_infinite_values_and_out_of_support_values(tmp_path, capsys):
    x = np.random.default_rng(0).random((100, 6)).astype(np.float32)
    x[3, 2] = np.inf
    np.save(tmp_path / "inf.npy", x)
    expect_error(capsys, ["train", "--data", str(tmp_path / "inf.npy"), *FAST, "--likelihood", "gaussian",
                          "--out", str(tmp_path / "a")], "Inf")  # fmt: skip
    np.save(tmp_path / "wide.npy", np.linspace(-3, 3, 600, dtype=np.float32).reshape(100, 6))
    expect_error(capsys, ["train", "--data", str(tmp_path / "wide.npy"), *FAST, "--likelihood",
                          "continuous-bernoulli", "--out", str(tmp_path / "b")], "[0, 1]")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: fast\n", "train.lr must be a number"),
        ("train:\n  learning_rate: 0.1\n", "unknown config key"),
        ("trian:\n  lr: 0.1\n", "did you mean 'train'"),
        ("model:\n  hidden: [64, -1]\n", "model.hidden"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("train: {lr: [1, 2\n", "not valid YAML"),
        ("train:\n  epochs: 2.5\n", "train.epochs must be an integer"),
    ],
)
def test_config_files_with_unknown_keys_or_wrong_types(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    expect_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")], expected)
    assert not (tmp_path / "o").exists()


def test_out_of_range_numbers(tmp_path, earlier, capsys):
    expect_error(capsys, ["eval", str(earlier), "--iwae-k", "0"], "--iwae-k must be >= 1")
    expect_error(capsys, ["sample", str(earlier), "--n", "0"], "--n must be >= 1")
    expect_error(capsys, ["train", "--data", "digits", "--epochs", "0", "--out", str(tmp_path / "o")],
                 "train.epochs must be > 0")  # fmt: skip
    expect_error(capsys, ["train", "--data", "digits", "train.lr=nan", "--out", str(tmp_path / "o")],
                 "train.lr must be > 0")  # fmt: skip
    expect_error(capsys, ["train", "--data", "digits", "train.optimizer=adamww",
                          "--out", str(tmp_path / "o")], "did you mean 'adamw'")  # fmt: skip


def test_a_checkpoint_from_an_incompatible_model(tmp_path, earlier, capsys):
    other = tmp_path / "other"
    assert main(["train", "--data", "digits", *FAST, "--hidden", "24", "--out", str(other)]) == 0
    victim = tmp_path / "victim"
    shutil.copytree(earlier, victim)
    shutil.rmtree(victim / "checkpoints")
    shutil.copytree(other / "checkpoints", victim / "checkpoints")
    expect_error(capsys, ["train", "--resume", str(victim), "--epochs", "2"], "does not fit")
    expect_error(capsys, ["eval", str(victim)], "does not fit")


def test_pickled_checkpoint_in_a_run_is_refused_by_every_command(tmp_path, earlier, capsys):
    victim = tmp_path / "victim"
    shutil.copytree(earlier, victim)
    for path in (victim / "checkpoints").glob("*.safetensors"):
        path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # pickle protocol 4 header
    # every checkpoint is now invalid: nothing loads, and nothing is unpickled
    expect_error(capsys, ["eval", str(victim)], "no valid checkpoint")
    expect_error(capsys, ["sample", str(victim)], "no valid checkpoint")
    json_path = sorted((victim / "checkpoints").glob("step-*.json"))[-1]
    with pytest.raises(TurboVAEError, match="pickle"):
        checkpoint.load(json_path)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(TurboVAEError):
        main(["--debug", "train", "--data", str(tmp_path / "missing.npz")])


def test_not_a_run_directory(tmp_path, capsys):
    expect_error(capsys, ["eval", str(tmp_path)], "not a turbovae run directory")
    expect_error(capsys, ["train", "--resume", str(tmp_path)], "cannot resume")


# ---- property-based: random input never crashes, never hangs --------------------------------------------

FAST_PROPS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST_PROPS
@given(st.binary(max_size=400))
def test_random_bytes_as_an_image_folder(tmp_path, blob):
    folder = tmp_path / "imgs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "a.png").write_bytes(blob)
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    (folder / "b.png").write_bytes(buf.getvalue())
    try:
        ds = load_dataset(str(folder))
    except TurboVAEError:
        return
    assert ds.x_train.dtype.is_floating_point or ds.max_value == 255


@FAST_PROPS
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_as_a_checkpoint(tmp_path, blob, as_tensors):
    folder = tmp_path / "run" / "checkpoints"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    good = json.dumps({"format": checkpoint.FORMAT, "tensors": "step-000000001.safetensors",
                       "tensors_sha256": hashlib.sha256(blob).hexdigest()})  # fmt: skip
    (folder / "step-000000001.json").write_bytes(good.encode() if as_tensors else blob)
    (folder / "step-000000001.safetensors").write_bytes(blob)
    with contextlib.suppress(TurboVAEError):  # a clean error is fine; anything else fails the test
        checkpoint.load(folder / "step-000000001.json")
    assert checkpoint.latest(folder.parent) in (None, folder / "step-000000001.json")


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(string.printable, max_size=12))  # fmt: skip
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
keys = st.sampled_from(["data", "model", "train", "eval", "trian", "lr", "hidden", "latent", "epochs",
                        "binarize", "name", "batch_size", "likelihood", "x"])  # fmt: skip


@FAST_PROPS
@given(
    st.dictionaries(keys, st.one_of(yaml_values, st.dictionaries(keys, yaml_values, max_size=4)), max_size=4)
)
def test_random_config_values_give_a_valid_config_or_a_clean_error(tmp_path, nested):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(nested))
    try:
        cfg = config.resolve(str(path))
    except TurboVAEError:
        return
    config.validate(cfg)  # what resolve returns is valid
    assert cfg.train.lr > 0 and cfg.model.latent > 0


@FAST_PROPS
@given(st.text(max_size=40))
def test_random_override_strings(text):
    with contextlib.suppress(TurboVAEError):  # a clean error is fine; anything else fails the test
        config.resolve(overrides=[text])
