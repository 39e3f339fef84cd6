"""Data sources: IDX, arrays, image folders, built-ins and downloads (local server only)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import socket
import struct
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits

import turbovae.engine.loop as loop
from turbovae.cli import main
from turbovae.config import resolve
from turbovae.data import DATASETS, Dataset, download, load_dataset
from turbovae.data.arrays import load_arrays, split_indices
from turbovae.data.idx import read_idx
from turbovae.engine.setup import setup, validation_split
from turbovae.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    back = read_idx(write_idx(tmp_path / "a.idx", array, compress))
    assert back.dtype == np.uint8 and back.flags.writeable
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\x00\x01", "trailing bytes"),
        (lambda b: b"\x01\x02" + b[2:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "0x0d"),
        (lambda b: b[:6], "header is truncated"),
    ],
)
def test_idx_rejects_bad_files(tmp_path: Path, mutate, match: str) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8))))
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_truncated_message_gives_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3), dtype=np.uint8))[:-1]))
    with pytest.raises(DataError, match=r"17 bytes, expected 18 for shape \(2, 3\)"):
        read_idx(path)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((8, 8), dtype=np.uint8)))[:-10])
    with pytest.raises(DataError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# -------------------------------------------------------------------------------------------- arrays


def test_npz_keras_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "k.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (10, 6, 5), dtype=np.uint8),
        y_train=np.arange(10),
        x_test=rng.integers(0, 256, (4, 6, 5), dtype=np.uint8),
        y_test=np.arange(4),
    )
    ds = load_dataset(str(path))
    assert ds.name == "k" and ds.x_train.shape == (10, 1, 6, 5) and ds.x_test.shape == (4, 1, 6, 5)
    assert ds.x_train.dtype == torch.uint8 and ds.max_value == 255
    assert ds.y_train is not None and ds.y_train.dtype == torch.int64


def test_npz_train_test_layout(tmp_path: Path) -> None:
    path = tmp_path / "tt.npz"
    np.savez(path, train=np.zeros((6, 3), dtype=np.float64), test=np.ones((2, 3), dtype=np.float64))
    ds = load_arrays(path)
    assert ds.x_train.dtype == torch.float32 and ds.event_shape == (3,) and ds.y_train is None


def test_npz_x_y_split_is_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "xy.npz"
    np.savez(path, x=np.arange(40, dtype=np.int64).reshape(20, 2), y=np.arange(20))
    a = load_arrays(path, test_fraction=0.25, split_seed=3)
    b = load_arrays(path, test_fraction=0.25, split_seed=3)
    assert a.x_test.shape == (5, 2) and a.x_train.shape == (15, 2) and a.x_train.dtype == torch.uint8
    assert torch.equal(a.x_test, b.x_test) and a.y_train is not None and a.y_test is not None
    assert set(a.y_train.tolist()).isdisjoint(a.y_test.tolist())
    assert sorted(a.y_train.tolist() + a.y_test.tolist()) == list(range(20))


def test_npz_single_array_and_npy(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", images=np.zeros((10, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "one.npy", np.zeros((10, 3, 8, 8), dtype=bool))
    nhwc = load_dataset(str(tmp_path / "one.npz"))
    assert nhwc.x_train.shape == (9, 3, 8, 8) and nhwc.x_test.shape == (1, 3, 8, 8)
    npy = load_dataset(str(tmp_path / "one.npy"))
    assert npy.x_train.shape == (9, 3, 8, 8) and npy.max_value == 1 and npy.x_train.dtype == torch.uint8


def test_npz_missing_keys_lists_found_and_expected(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, x_train=np.zeros((3, 2)), y_train=np.zeros(3, dtype=int))
    with pytest.raises(DataError, match=r"found arrays \['x_train', 'y_train'\], expected x_train \+ x_test"):
        load_arrays(path)


def test_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickle") as info:
        load_arrays(path)
    assert str(path) in str(info.value)


def test_nan_is_reported(tmp_path: Path) -> None:
    x = np.zeros((5, 4), dtype=np.float32)
    x[2, 1] = np.nan
    x[3, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x_train=x, x_test=np.zeros((2, 4)))
    with pytest.raises(DataError, match=r"x_train has 2 NaN/Inf value\(s\), first at index \(2, 1\)"):
        load_arrays(tmp_path / "nan.npz")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x_train": np.zeros((0, 4)), "x_test": np.zeros((2, 4))}, "empty"),
        ({"x": np.zeros((0,))}, "empty"),
        ({"x_train": np.zeros((3, 4)), "x_test": np.zeros((2, 5))}, r"\(4,\) but x_test have \(5,\)"),
        ({"x": np.zeros((4, 2, 2, 2, 2))}, "has shape"),
        ({"x": np.full((4, 2), 300)}, r"integer values in \[300, 300\]"),
        ({"x_train": np.zeros((3, 2)), "x_test": np.zeros((2, 2)), "y_train": np.zeros(3, int)}, "y_test"),
        ({"x": np.zeros((4, 2)), "y": np.zeros((4, 10))}, "y has shape"),
    ],
)
def test_bad_arrays(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_arrays(path)
    assert str(path) in str(info.value)


def test_corrupt_npz(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((10, 10)))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="not a valid") as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------- image folders


def save_png(path: Path, mode: str, size: tuple[int, int], value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_image_folder_greyscale(tmp_path: Path) -> None:
    for i in range(10):
        save_png(tmp_path / "imgs" / f"sub{i % 2}" / f"{i}.png", "L", (6, 4), value=i)
    ds = load_dataset(str(tmp_path / "imgs"), test_fraction=0.2)
    assert ds.x_train.shape == (8, 1, 4, 6) and ds.x_test.shape == (2, 1, 4, 6)
    assert ds.x_train.dtype == torch.uint8 and ds.max_value == 255 and ds.name == "imgs"


def test_image_folder_rgb_when_any_image_is_colour(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", "L", (5, 5))
    save_png(tmp_path / "b.png", "RGB", (5, 5))
    save_png(tmp_path / "c.png", "RGB", (5, 5))
    ds = load_dataset(str(tmp_path))
    assert ds.event_shape == (3, 5, 5)
    all_pixels = torch.cat([ds.x_train, ds.x_test])
    assert any(bool((img[0] == img[1]).all()) for img in all_pixels)  # the grey one stays grey


def test_image_folder_mixed_sizes(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", "L", (5, 5))
    save_png(tmp_path / "b.png", "L", (7, 6))
    with pytest.raises(DataError, match=r"a.png is 5x5 but .*b.png is 6x7.*--resize"):
        load_dataset(str(tmp_path))
    ds = load_dataset(str(tmp_path), resize=(4, 3))
    assert ds.event_shape == (1, 4, 3)


def test_image_folder_corrupt_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path))
    save_png(tmp_path / "a.png", "L", (5, 5))
    save_png(tmp_path / "b.png", "L", (5, 5))
    bad = tmp_path / "b.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"b\.png"):
        load_dataset(str(tmp_path))
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"b\.png"):
        load_dataset(str(tmp_path))


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    for i in range(3):
        save_png(tmp_path / "train" / f"{i}.png", "RGB", (4, 4))
    save_png(tmp_path / "test" / "x.jpg", "RGB", (4, 4))
    ds = load_dataset(str(tmp_path))
    assert ds.x_train.shape == (3, 3, 4, 4) and ds.x_test.shape == (1, 3, 4, 4)


# ------------------------------------------------------------------------------- names and built-ins


def test_digits() -> None:
    a = load_dataset("digits")
    assert a.x_train.shape == (1617, 1, 8, 8) and a.x_test.shape == (180, 1, 8, 8)
    assert a.x_train.dtype == torch.uint8 and a.max_value == 16 and int(a.x_train.max()) == 16
    assert a.y_train is not None and a.y_test is not None and a.y_train.dtype == torch.int64
    b = load_dataset("digits")
    c = load_dataset("digits", split_seed=1)
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    # Train and test together are exactly the 1,797 sklearn images (as a multiset): a partition.
    rows = Counter(map(tuple, torch.cat([a.x_train, a.x_test]).flatten(1).tolist()))
    assert rows == Counter(map(tuple, load_digits().images.astype(np.uint8).reshape(1797, -1).tolist()))
    train, test = split_indices(1797, 0.1, 0)
    assert len(test) == 180 and not set(train) & set(test) and len(train) + len(test) == 1797
    assert load_dataset("digits", resize=(16, 16)).event_shape == (1, 16, 16)


def _epochs_seen(monkeypatch, tmp_path: Path, mode: str) -> tuple[list[Counter], dict]:
    """Train 2 epochs on digits with data.binarize=mode through the CLI, recording every batch the
    training step receives. Batches of 485 = (1617 - 162 held out for validation) / 3: each epoch shows every
    training image once.
    Returns the images of each epoch (a multiset of rows) and summary.json."""
    real, seen = loop.make_step, []

    def recording(*args, **kwargs):
        step = real(*args, **kwargs)

        def record(x, eps, *rest):
            seen.append(x.detach().cpu().flatten(1).clone())
            return step(x, eps, *rest)

        return record

    monkeypatch.setattr(loop, "make_step", recording)
    out = tmp_path / mode
    argv = ["train", "--data", "digits", "--binarize", mode, "--hidden", "32", "--latent", "4",
            "--epochs", "2", "--batch-size", "485", "--out", str(out), "--progress", "off", "eval.iwae_k=0",
            "train.compile=off", "eval.every_epoch=false"]  # fmt: skip
    assert main(argv) == 0
    assert len(seen) == 6
    epochs = [Counter(map(tuple, torch.cat(seen[e * 3 : (e + 1) * 3]).tolist())) for e in range(2)]
    return epochs, json.loads((out / "summary.json").read_text())


def test_static_binarisation_is_one_fixed_draw_dynamic_a_new_one_each_epoch(monkeypatch, tmp_path):
    s = setup(resolve("digits-mlp", overrides=["data.binarize=static"]), torch.device("cpu"))
    assert s.binarize_mode == "static" and s.train_max == 1.0
    assert set(s.x_train.unique().tolist()) == {0, 1} and s.x_train.shape == (1455, 1, 8, 8)
    grey = load_dataset("digits").x_train[validation_split(1617, 0.1)[0]]  # the training examples
    # a Bernoulli draw of the grey values (a pixel of value v/16 is 1 with probability v/16), not a threshold
    for v in (4, 8, 12):
        assert abs(s.x_train[grey == v].float().mean() - v / 16) < 0.05, v
    again = setup(resolve("digits-mlp", overrides=["data.binarize=static"]), torch.device("cpu"))
    assert torch.equal(s.x_train, again.x_train)  # the same draw every time

    static, summary = _epochs_seen(monkeypatch, tmp_path, "static")
    assert summary["binarize"] == "static"
    assert static[0] == static[1]  # the model sees the same binary images in both epochs
    assert static[0] == Counter(map(tuple, s.x_train.float().flatten(1).tolist()))  # setup's draw
    dynamic, summary = _epochs_seen(monkeypatch, tmp_path, "dynamic")
    assert summary["binarize"] == "dynamic"
    assert all(set(v for row in epoch for v in row) == {0.0, 1.0} for epoch in dynamic)
    assert dynamic[0] != dynamic[1]  # a fresh draw each epoch
    assert len(set(dynamic[0]) & set(static[0])) < 0.5 * len(static[0])


def test_unknown_name_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_dataset("digit")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("some/dir")
    with pytest.raises(ConfigError, match="resize"):
        load_dataset("digits", resize=(0, 4))
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)
    assert set(DATASETS) == {"digits", "fashion-mnist", "mnist", "words"}


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TURBOVAE_DATA", raising=False)
    monkeypatch.setattr(download, "MIRRORS", {})  # any download attempt would fail loudly
    ds = load_dataset("fashion-mnist")  # found through the default search order
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.max_value == 255
    assert ds.y_train is not None and ds.y_test is not None
    assert set(ds.y_train.unique().tolist()) == set(range(10)) == set(ds.y_test.unique().tolist())


# -------------------------------------------------------------------------------------------- download


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A local HTTP server serving <root>/fashion-mnist/<files>; yields the cache dir."""
    root = tmp_path / "served" / "fashion-mnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(6, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(4, dtype=np.uint8),
    }
    sums = {
        name: hashlib.sha256(write_idx(root / name, a).read_bytes()).hexdigest() for name, a in arrays.items()
    }

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TURBOVAE_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TURBOVAE_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(download, "SYSTEM_DIRS", {})
    monkeypatch.setitem(download.SHA256, "fashion-mnist", sums)
    try:
        yield tmp_path / "cache" / "turbovae" / "fashion-mnist"
    finally:
        server.shutdown()
        server.server_close()


def test_download_success(mirror: Path) -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert sorted(p.name for p in mirror.iterdir()) == sorted(download.FILES)
    assert (
        download.locate("fashion-mnist", allow_download=False)["t10k-images-idx3-ubyte.gz"].parent == mirror
    )


def test_download_checksum_mismatch_leaves_nothing(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sums = dict(download.SHA256["fashion-mnist"])
    sums["train-images-idx3-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(download.SHA256, "fashion-mnist", sums)
    with pytest.raises(DataError, match=r"SHA-256 .* does not match"):
        load_dataset("fashion-mnist")
    assert list(mirror.iterdir()) == []


def test_download_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TURBOVAE_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TURBOVAE_DATA", raising=False)
    with pytest.raises(DataError, match=r"place .* in") as info:
        load_dataset("mnist")
    assert "\n" not in str(info.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_local_raw_files_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, shape in [("train-images-idx3-ubyte", (3, 2, 2)), ("t10k-images-idx3-ubyte", (2, 2, 2))]:
        write_idx(tmp_path / name, np.zeros(shape), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "MIRRORS", {})
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.x_train.shape == (3, 1, 2, 2) and ds.x_test.shape == (2, 1, 2, 2)


# -------------------------------------------------------------------------------------------- property

_PREFIXES = [
    b"",
    b"\x00\x00\x08\x01",
    b"\x00\x00\x08\x03",
    b"\x1f\x8b\x08",
    b"PK\x03\x04",
    b"\x93NUMPY\x01\x00",
]


def _npz_bytes(x: np.ndarray) -> bytes:
    with tempfile.TemporaryFile() as f:
        np.savez(f, x=x)
        f.seek(0)
        return f.read()


_VALID_NPZ = _npz_bytes(np.arange(12, dtype=np.uint8).reshape(4, 3))


@settings(max_examples=50, deadline=None, database=None)
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=300),
    gzip_it=st.booleans(),
    cut=st.integers(0, len(_VALID_NPZ)),
    flip=st.integers(0, len(_VALID_NPZ) - 1),
)
def test_random_bytes_give_result_or_data_error(
    prefix: bytes, body: bytes, gzip_it: bool, cut: int, flip: int
) -> None:
    data = prefix + body
    # Also damage a real .npz: truncation and a flipped byte exercise the zip and .npy parsers.
    damaged = bytearray(_VALID_NPZ[:cut] if cut < len(_VALID_NPZ) else _VALID_NPZ)
    if damaged:
        damaged[flip % len(damaged)] ^= 0xFF
    with tempfile.TemporaryDirectory() as d:
        idx = Path(d) / "x-idx3-ubyte"
        idx.write_bytes(gzip.compress(data) if gzip_it else data)
        try:
            assert read_idx(idx).dtype == np.uint8
        except DataError as e:
            assert str(idx) in str(e) and "\n" not in str(e)
        for i, content in enumerate((data, bytes(damaged))):
            npz = Path(d) / f"x{i}.npz"
            npz.write_bytes(content)
            try:
                assert isinstance(load_arrays(npz), Dataset)
            except DataError as e:
                assert str(npz) in str(e) and "\n" not in str(e)


def test_zip_with_non_array_member(tmp_path: Path) -> None:
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(DataError, match=r"not a \.npy array"):
        load_arrays(path)
