"""Bits-back ANS compression (turbovae/compression.py, commands/compress.py): exact round trips for every
supported likelihood and model, the rate of a trained model against its NELBO, and refusals."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

import turbovae
from turbovae import compression
from turbovae.cli import main
from turbovae.config import Config
from turbovae.engine.setup import build_vae
from turbovae.errors import CheckpointError, ConfigError, DataError
from turbovae.models import MODELS

# (model, likelihood, event shape): every model and likelihood the codec supports, the RGB coupling too
CASES = [
    ("mlp", "bernoulli", (1, 8, 8)),
    ("conv", "bernoulli", (1, 8, 8)),
    ("mlp", "categorical-256", (1, 6, 6)),
    ("conv", "categorical-256", (1, 8, 8)),
    ("mlp", "discretized-logistic", (1, 8, 8)),
    ("conv", "discretized-logistic", (1, 8, 8)),
    ("mlp", "discretized-logistic", (3, 4, 4)),  # coupled: R, G | R, B | R, G
    ("conv", "discretized-logistic", (3, 8, 8)),
    ("hvae", "bernoulli", (1, 8, 8)),
    ("hvae", "discretized-logistic", (3, 8, 8)),
    ("hvae", "categorical-256", (1, 8, 8)),
]


def random_vae(model: str, likelihood: str, shape: tuple[int, ...], seed: int = 0) -> turbovae.VAE:
    torch.manual_seed(seed)
    options = {
        "mlp": {"hidden": [32]},
        "conv": {"channels": [8, 16]},
        "hvae": {
            "channels": [8, 16, 16],
            "groups": [1, 1, 1],
            "enc_blocks": [1, 1, 1],
            "latent_channels": [1, 2, 2],
        },
    }[model]
    cfg = Config(model=MODELS[model].config(likelihood=likelihood, mixtures=3, latent=4, **options))
    vae = build_vae(cfg, shape, {"levels": 256})
    vae.config = cfg
    return vae.eval()


def random_images(likelihood: str, n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    high = 2 if likelihood == "bernoulli" else 256
    return torch.randint(0, high, (n, *shape), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


@pytest.mark.parametrize(("model", "likelihood", "shape"), CASES)
def test_round_trip_is_exact_on_random_models(model, likelihood, shape):
    vae = random_vae(model, likelihood, shape)
    n = 5 if model == "hvae" else 11  # 3 lanes: steps of 3 and a last one of 2
    x = random_images(likelihood, n, shape)
    stats: dict = {}
    data = compression.compress(vae, x, batch=3, latent_bits=10, stats=stats)
    y = compression.decompress(vae, data)
    assert y.dtype == torch.uint8 and torch.equal(x, y)
    assert stats["bits"] == 8 * len(data) and stats["net_bits"] > 0 and stats["initial_bits"] > 0


def test_compression_is_deterministic_and_takes_model_inputs():
    vae = random_vae("mlp", "discretized-logistic", (1, 6, 6))
    x = random_images("discretized-logistic", 5, (1, 6, 6))
    a = turbovae.compress(vae, x, batch=2)
    assert turbovae.compress(vae, x.float() / 255.0, batch=2) == a  # bytes / 255, as the model takes them
    assert torch.equal(turbovae.decompress(vae, a), x)
    one = turbovae.compress(vae, x[:1], batch=64)  # more lanes than images
    assert torch.equal(turbovae.decompress(vae, one), x[:1])


def test_the_rate_of_an_8_bit_model_tracks_its_nelbo():
    """Random model, so the NELBO is high; the coded rate still equals it up to the discretisation."""
    vae = random_vae("mlp", "discretized-logistic", (1, 8, 8))
    x = random_images("discretized-logistic", 64, (1, 8, 8))
    stats: dict = {}
    compression.compress(vae, x, batch=2, stats=stats)
    gen = torch.Generator().manual_seed(0)
    nats = turbovae.nelbo(vae, x.float() / 255.0, lambda r: r, generator=gen)["nelbo"]
    nelbo_bits = nats * len(x) / np.log(2.0)
    assert abs(stats["net_bits"] / nelbo_bits - 1.0) < 0.02


def test_values_off_the_likelihood_are_refused():
    vae = random_vae("mlp", "bernoulli", (1, 4, 4))
    with pytest.raises(DataError, match="binary"):
        compression.compress(vae, torch.full((2, 1, 4, 4), 3, dtype=torch.uint8))
    with pytest.raises(DataError, match="shape"):
        compression.compress(vae, torch.zeros(2, 1, 5, 5, dtype=torch.uint8))
    grey = random_vae("mlp", "gaussian", (1, 4, 4))
    with pytest.raises(ConfigError, match="probability mass"):
        compression.compress(grey, torch.zeros(2, 1, 4, 4))


def test_another_model_and_a_tampered_payload_are_refused():
    vae = random_vae("mlp", "bernoulli", (1, 6, 6))
    x = random_images("bernoulli", 9, (1, 6, 6))
    data = compression.compress(vae, x, batch=2)
    with pytest.raises(CheckpointError, match="another model"):
        compression.decompress(random_vae("mlp", "bernoulli", (1, 6, 6), seed=5), data)
    with pytest.raises(CheckpointError, match="checkpoint"):
        compression.decompress(
            vae, compression.compress(vae, x, checkpoint=b"\1" * 32), checkpoint=b"\2" * 32
        )
    # a changed ANS word with a recomputed CRC (as if the file had been rewritten): the chains do not
    # end on their seed words, or constriction refuses a state
    body = bytearray(data[:-4])
    body[-8] ^= 0xFF
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(DataError, match="corrupt"):
        compression.decompress(vae, forged)
    with pytest.raises(DataError, match="corrupt or truncated"):
        compression.decompress(vae, data[:-10])
    with pytest.raises(DataError, match="not a turbovae"):
        compression.decompress(vae, b"PK\3\4" + data[4:])


# ---- a briefly trained digits model, through the CLI -----------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """digits-mlp (Bernoulli, dynamically binarised) trained for 30 epochs (a few seconds)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    args = ["train", "--config", "digits-mlp", "--out", str(out), "--epochs", "30", "--progress", "off"]
    assert main([*args, "train.threads=1", "eval.iwae_k=1"]) == 0
    return out


@pytest.fixture(scope="module")
def digits_test(digits_run, tmp_path_factory) -> Path:
    """The run's own binarised test images (N, 8, 8) uint8 0/1, the images its NELBO is measured on."""
    from turbovae.engine.setup import setup

    vae = turbovae.load(digits_run)
    path = tmp_path_factory.mktemp("data") / "test.npy"
    np.save(path, setup(vae.config).x_test.numpy()[:, 0])
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("turbovae: error:"), err
    return err[0]


def test_cli_round_trip_and_rate_within_3_percent_of_the_nelbo(digits_run, digits_test, tmp_path, capsys):
    tvz = tmp_path / "test.tvz"
    capsys.readouterr()
    assert (
        main(["compress", str(digits_run), str(digits_test), "--out", str(tvz), "--json", "--batch", "4"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 180 and report["bytes"] == tvz.stat().st_size
    for key in ("bits_per_dim", "initial_bits", "nelbo_bits_per_dim", "seconds"):
        assert key in report
    # the chains' rate (initial bits and header apart) against the single-sample NELBO on the same images
    assert abs(report["net_bits_per_dim"] / report["nelbo_bits_per_dim"] - 1.0) < 0.03
    out = tmp_path / "back.npy"
    assert main(["decompress", str(digits_run), str(tvz), "--out", str(out)]) == 0
    a, b = np.load(digits_test), np.load(out)
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_cli_image_folder_round_trip(digits_run, digits_test, tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    x = np.load(digits_test)[:7] * np.uint8(255)  # binary PNGs, 0/255
    for i, image in enumerate(x):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"d{i}.png")
    tvz = tmp_path / "f.tvz"
    assert main(["compress", str(digits_run), str(folder), "--out", str(tvz)]) == 0
    assert main(["decompress", str(digits_run), str(tvz), "--out", str(tmp_path / "out")]) == 0
    for path in folder.rglob("*.png"):
        back = tmp_path / "out" / path.relative_to(folder)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(back)))


def test_cli_refuses_grey_data_for_a_bernoulli_run_unless_asked(digits_run, tmp_path, capsys):
    grey = tmp_path / "grey.npy"
    np.save(grey, (np.arange(64 * 3) % 17).astype(np.uint8).reshape(3, 8, 8))  # the run's values, 0..16
    capsys.readouterr()
    assert main(["compress", str(digits_run), str(grey), "--out", str(tmp_path / "g.tvz")]) == 2
    assert "--binarize" in _one_line_error(capsys)
    assert main(["compress", str(digits_run), str(grey), "--out", str(tmp_path / "g.tvz"), "--binarize"]) == 0


@pytest.fixture(scope="module")
def digits_tvz(digits_run, digits_test, tmp_path_factory) -> Path:
    tvz = tmp_path_factory.mktemp("tvz") / "test.tvz"
    assert main(["compress", str(digits_run), str(digits_test), "--out", str(tvz), "--batch", "4"]) == 0
    return tvz


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_cli_refuses_a_corrupt_or_truncated_file(digits_run, digits_tvz, tmp_path, capsys, damage):
    data = bytearray(digits_tvz.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) - 37]
    bad = tmp_path / "bad.tvz"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["decompress", str(digits_run), str(bad), "--out", str(tmp_path / "x.npy")]) == 2
    assert "corrupt" in _one_line_error(capsys)
    assert not (tmp_path / "x.npy").exists()


def test_cli_refuses_another_checkpoint(digits_run, digits_tvz, tmp_path, capsys):
    other = tmp_path / "other"
    args = ["train", "--config", "digits-mlp", "--out", str(other), "--epochs", "1", "--seed", "7"]
    assert main([*args, "--progress", "off", "train.threads=1", "eval.iwae_k=1"]) == 0
    capsys.readouterr()
    assert main(["decompress", str(other), str(digits_tvz), "--out", str(tmp_path / "x.npy")]) == 2
    assert "checkpoint" in _one_line_error(capsys)


# ---- small inputs: the initial bits paid once, a small header ---------------------------------------


def test_initial_bits_are_one_images_and_the_header_is_small():
    """One stack whose first step holds one image: the initial bits do not grow with the count (64 lanes
    each paid theirs: 11.6% of a 2,000-image file), and an API file's header is a few dozen bytes."""
    vae = random_vae("mlp", "bernoulli", (1, 8, 8))
    bound = vae.latent * compression.PRECISION_BITS + 64  # one image's pops, and the stack's last word
    for n in (1, 40, 300):
        stats: dict = {}
        data = compression.compress(vae, random_images("bernoulli", n, (1, 8, 8)), stats=stats, batch=16)
        assert 0 < stats["initial_bits"] <= bound, (n, stats)
        assert stats["header_bytes"] <= 40 and stats["bits"] == 8 * len(data)
    assert compression.steps(300, 16) == [1, 2, 4, 8] + [16] * 17 + [13]


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's Fashion-MNIST absent")
@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized-logistic"])
def test_100_and_2000_images_cost_within_2_percent_of_the_nelbo(tmp_path, likelihood):
    """Issue 36: with 64 lanes a 2,000-image binarised file was 16% above the NELBO. Whole file (initial
    bits and header counted) against the single-sample NELBO on the same images, for a small
    Fashion-MNIST MLP trained for a few seconds."""
    from turbovae.engine.setup import setup

    out = tmp_path / "run"
    argv = ["train", "--data", "fashion-mnist", "--model", "mlp", "--hidden", "256", "--latent", "16"]
    argv += ["--likelihood", likelihood, "--epochs", "1", "--out", str(out), "--progress", "off"]
    assert main([*argv, "train.threads=1", "eval.iwae_k=1", "train.time_limit=10"]) == 0
    vae = turbovae.load(out)
    x = setup(vae.config).x_test
    for n in (100, 2000):
        data = compression.compress(vae, x[:n], checkpoint=compression.checkpoint_sha256(out))
        xf = x[:n].float() if likelihood == "bernoulli" else x[:n].float() / 255.0
        nats = turbovae.nelbo(vae, xf, lambda r: r, generator=torch.Generator().manual_seed(0))["nelbo"]
        assert 8 * len(data) / (nats * n / np.log(2.0)) < 1.02, n
        assert torch.equal(compression.decompress(vae, data), x[:n])


# ---- photos of any size: tiles of the run's size ----------------------------------------------------


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    """An 8-bit colour run (discretised logistic mixture with the RGB coupling) on 8x8 crops, briefly."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (300, 1, 1, 3))
    np.save(root / "rgb.npy", np.clip(base + rng.integers(-20, 21, (300, 8, 8, 3)), 0, 255).astype(np.uint8))
    out = root / "run"
    argv = ["train", "--data", str(root / "rgb.npy"), "--model", "mlp", "--hidden", "32", "--latent", "4"]
    argv += ["--likelihood", "discretized-logistic", "--epochs", "1", "--out", str(out), "--progress", "off"]
    assert main([*argv, "model.mixtures=3", "train.threads=1", "eval.iwae_k=1"]) == 0
    return out


def _photo(path: Path, shape: tuple[int, ...], seed: int, **kwargs) -> np.ndarray:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return pixels


def test_a_photo_of_any_size_comes_back_with_the_same_pixels(rgb_run, tmp_path, capsys):
    """A 21x13 RGB photo (tiles of 8x8, the edge ones padded) and back: the same pixels, size, mode."""
    from PIL import Image

    pixels = _photo(tmp_path / "photo.png", (21, 13, 3), 4)
    tvz, back = tmp_path / "photo.tvz", tmp_path / "back.png"
    capsys.readouterr()
    assert main(["compress", str(rgb_run), str(tmp_path / "photo.png"), "--out", str(tvz), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 * 2 and report["files"] == 1  # ceil(21/8) x ceil(13/8) tiles
    assert main(["decompress", str(rgb_run), str(tvz), "--out", str(back)]) == 0
    with Image.open(back) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), pixels)


@pytest.mark.slow  # about 1 s
def test_a_folder_of_photos_streams_to_a_folder(rgb_run, tmp_path, monkeypatch):
    """Folders in, folders out, the files of other sizes and formats each back in its own; read and
    written a file at a time (never more than a step's files in memory)."""
    from PIL import Image

    from turbovae.commands import photos

    shapes = {"a.png": (8, 8, 3), "sub/b.bmp": (17, 30, 3), "c.tif": (5, 3, 3), "d.png": (40, 9, 3)}
    pixels = {name: _photo(tmp_path / "in" / name, s, i) for i, (name, s) in enumerate(shapes.items())}
    reads: list[Path] = []
    real = photos.read_pixels
    monkeypatch.setattr(photos, "read_pixels", lambda path: reads.append(path) or real(path))
    tvz, out = tmp_path / "f.tvz", tmp_path / "out"
    assert main(["compress", str(rgb_run), str(tmp_path / "in"), "--out", str(tvz), "--batch", "4"]) == 0
    assert len(reads) <= 2 * len(shapes)  # once a file (twice at a step's edge), not once a tile
    assert main(["decompress", str(rgb_run), str(tvz), "--out", str(out)]) == 0
    for name, want in pixels.items():
        with Image.open(out / name) as im:
            assert im.format == Image.open(tmp_path / "in" / name).format
            assert np.array_equal(np.asarray(im), want), name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.parametrize("damage", ["truncated", "foreign", "flipped"])
def test_a_damaged_photo_file_is_one_line_and_writes_nothing(rgb_run, tmp_path, capsys, damage):
    _photo(tmp_path / "p.png", (19, 11, 3), 1)
    tvz = tmp_path / "p.tvz"
    assert main(["compress", str(rgb_run), str(tmp_path / "p.png"), "--out", str(tvz)]) == 0
    data = tvz.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "foreign":
        data = (tmp_path / "p.png").read_bytes()
    else:  # a flipped bit in the ANS words, the CRC made to match: the decoder's own checks catch it
        body = bytearray(data[:-4])
        body[-3] ^= 0x04
        data = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    bad = tmp_path / "bad.tvz"
    bad.write_bytes(data)
    capsys.readouterr()
    assert main(["decompress", str(rgb_run), str(bad), "--out", str(tmp_path / "back.png")]) == 2
    _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tvz", "p.png", "p.tvz"]


@pytest.mark.slow  # about 1 s
def test_one_photo_costs_within_2_percent_of_the_nelbo(rgb_run, tmp_path, capsys):
    """Issue 36: one photo, the whole file (header with its name and size, initial bits) against the
    NELBO of its tiles."""
    rng = np.random.default_rng(2)
    base = np.kron(rng.integers(0, 256, (12, 12, 3)), np.ones((8, 8, 1)))  # flat 8x8 patches, like the crops
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)[:90, :93]
    from PIL import Image

    Image.fromarray(pixels).save(tmp_path / "p.png")
    capsys.readouterr()
    argv = ["compress", str(rgb_run), str(tmp_path / "p.png"), "--out", str(tmp_path / "p.tvz"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 12 * 12 and report["bits_per_dim"] / report["nelbo_bits_per_dim"] < 1.02


def test_a_photo_is_decompressed_over_itself_only_with_overwrite(rgb_run, tmp_path, capsys):
    pixels = _photo(tmp_path / "p.png", (9, 10, 3), 3)
    tvz, back = tmp_path / "p.tvz", tmp_path / "back.png"
    assert main(["compress", str(rgb_run), str(tmp_path / "p.png"), "--out", str(tvz)]) == 0
    back.write_bytes(b"old")
    capsys.readouterr()
    assert main(["decompress", str(rgb_run), str(tvz), "--out", str(back)]) == 2
    assert "--overwrite" in _one_line_error(capsys) and back.read_bytes() == b"old"
    assert main(["decompress", str(rgb_run), str(tvz), "--out", str(back), "--overwrite"]) == 0
    from PIL import Image

    with Image.open(back) as im:
        assert np.array_equal(np.asarray(im), pixels)


def test_coding_runs_on_one_thread_whatever_the_callers(monkeypatch):
    """The networks' kernels must not change between the two sides: both code on one torch thread and
    give the caller's thread count back."""
    vae = random_vae("mlp", "discretized-logistic", (1, 6, 6))
    x = random_images("discretized-logistic", 7, (1, 6, 6))
    seen: list[int] = []
    walk = vae.structure.walk
    monkeypatch.setattr(
        vae.structure, "walk", lambda *a, **k: seen.append(torch.get_num_threads()) or walk(*a, **k)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = compression.compress(vae, x)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(compression.decompress(vae, data), x)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1}


def test_a_version_1_file_is_refused_naming_the_release_that_reads_it():
    """The format changed to version 2 (one stack, a compact header): a version-1 file is one line that
    says which turbovae wrote it, not a CRC or parse error."""
    old = compression.MAGIC + bytes([1]) + bytes(64)
    with pytest.raises(compression.CompressionError, match=r"version 1 .*20b3469.*reads version 2"):
        compression.read_header(old)
    with pytest.raises(compression.CompressionError, match="version 9; this turbovae reads version 2"):
        compression.read_header(compression.MAGIC + bytes([9]) + bytes(64))
