"""Data bigger than memory: a lone ``.npy`` is memory-mapped, not loaded (data/arrays.py), gathered per
batch (data/batches.py), and trains as the same array held in memory does; ``turbovae data pack``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import turbovae.data.batches as batches
from turbovae.cli import main
from turbovae.data import load_dataset
from turbovae.data.batches import binarize, gather, mean_value, value_range
from turbovae.engine import checkpoint

SRC = Path(__file__).resolve().parent.parent / "src"
FAST = ["--hidden", "16", "--latent", "2", "--batch-size", "32", "--progress", "off", "eval.iwae_k=2",
        "train.compile=off", "train.log_every=5"]  # fmt: skip


def grey_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 1, 8, 8) uint8 with some structure (a bright square somewhere), all different."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, 8, 8)) * 60).astype(np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 5, size=2)
        x[i, 0, r : r + 4, c : c + 4] += 180
    return x


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (a view of the file, not a copy)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= t.data_ptr() < high:
                return True
    return False


def test_npy_is_mapped_and_its_split_is_its_last_rows(tmp_path: Path) -> None:
    x = grey_images(200)
    np.save(tmp_path / "x.npy", x)
    ds = load_dataset(str(tmp_path / "x.npy"), test_fraction=0.1)
    assert ds.mapped and ds.max_value == 255 and ds.x_train.dtype == torch.uint8
    assert mapped_from(ds.x_train, tmp_path / "x.npy") and mapped_from(ds.x_test, tmp_path / "x.npy")
    assert torch.equal(ds.x_train, torch.from_numpy(x[:180]))
    assert torch.equal(ds.x_test, torch.from_numpy(x[180:]))
    # NHWC is mapped too, as a channels-first view
    np.save(tmp_path / "nhwc.npy", x.transpose(0, 2, 3, 1).copy())
    nhwc = load_dataset(str(tmp_path / "nhwc.npy"))
    assert nhwc.mapped and torch.equal(nhwc.x_train, torch.from_numpy(x[:180]))
    # dtypes that need converting are read into memory, split as before
    np.save(tmp_path / "b.npy", x > 100)
    assert not load_dataset(str(tmp_path / "b.npy")).mapped
    np.save(tmp_path / "f.npy", np.array([[0.5, np.nan]] * 10, dtype=np.float32))
    with pytest.raises(Exception, match=r"1\d? NaN/Inf value\(s\), first at index \(0, 1\)"):
        load_dataset(str(tmp_path / "f.npy"))


def test_mapped_npy_trains_exactly_as_the_array_in_memory(tmp_path: Path) -> None:
    x = grey_images(600)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x_train=x[:540], x_test=x[540:])  # the .npy's split, in memory
    runs = {}
    for kind in ("npy", "npz"):
        out = tmp_path / f"run-{kind}"
        argv = ["train", "--data", str(tmp_path / f"x.{kind}"), "--out", str(out), *FAST, "--epochs", "2"]
        assert main([*argv, "data.validation=0"]) == 0
        runs[kind] = summary(out)
    assert runs["npy"]["test_nelbo"] == runs["npz"]["test_nelbo"]
    assert runs["npy"]["test_nll_iwae"] == runs["npz"]["test_nll_iwae"]
    # with a validation split: the last training rows (mapped data), 10% of 540
    out = tmp_path / "run-val"
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(out), *FAST, "--epochs", "1"]) == 0
    assert summary(out)["n_val"] == 54 and summary(out)["n_train"] == 486


def test_gather_value_range_and_binarize_in_chunks_match_the_whole(monkeypatch) -> None:
    x = torch.from_numpy(grey_images(300))
    rows = torch.randperm(300)[:64]
    got = gather(x, rows, torch.device("cpu"))
    assert torch.equal(got, x[rows]) and got.is_contiguous()
    whole = (value_range(x, 255.0), binarize(x, 255.0, seed=2))
    monkeypatch.setattr(batches, "CHUNK_BYTES", 64 * 7)  # 7 rows a chunk
    assert len(batches._chunks(x)) == 43
    assert value_range([x[:100], x[100:]], 255.0) == whole[0]
    assert torch.equal(binarize(x, 255.0, seed=2), whole[1])
    f = torch.rand(50, 3)
    f[33, 1] = float("nan")
    low, high, _ = value_range(f, 1.0)
    assert np.isnan(low) and np.isnan(high)
    assert value_range(torch.tensor([[0, 16], [16, 0]], dtype=torch.uint8), 16.0) == (0.0, 1.0, True)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32])
def test_value_range_and_mean_value_match_the_plain_float64_computation(monkeypatch, dtype) -> None:
    """The counting (uint8) and exact-integer (numpy int64) passes against plain float64 arithmetic,
    chunked and whole, on grey, binary and constant data."""
    gen = torch.Generator().manual_seed(0)
    grey = torch.randint(3, 250, (300, 1, 4, 4), generator=gen).to(dtype)
    binary = (torch.rand(300, 6, generator=gen) > 0.5).to(dtype) * 255
    zeros = torch.zeros(40, 3, dtype=dtype)
    for chunk_bytes in (batches.CHUNK_BYTES, 64 * 7):
        monkeypatch.setattr(batches, "CHUNK_BYTES", chunk_bytes)
        for x, is_binary in ((grey, False), (binary, True), (zeros, True)):
            d = x.double() / 255
            assert value_range(x, 255.0) == (d.min().item(), d.max().item(), is_binary)
            assert torch.equal(mean_value(x, 255.0), x.double().sum(0) / len(x) / 255)
        assert value_range([grey, binary], 255.0)[2] is False


def test_static_binarisation_of_mapped_data_is_refused(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", grey_images(100))
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(out), *FAST, "--binarize", "static"]
    assert main(argv) == 2
    (line,) = errors(capsys)
    assert "static" in line and "data.binarize=dynamic" in line and not out.exists()


def test_mapped_run_resumes_with_the_same_data_order(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", grey_images(400))
    common = ["--data", str(tmp_path / "x.npy"), *FAST, "--checkpoint-every", "4"]
    common.append("train.keep_checkpoints=20")
    straight = tmp_path / "straight"
    assert main(["train", *common, "--epochs", "2", "--out", str(straight)]) == 0
    # a run stopped mid-epoch: step 12's checkpoint (of 10 steps an epoch) is the newest one left
    cut = tmp_path / "cut"
    assert main(["train", *common, "--epochs", "2", "--out", str(cut)]) == 0
    for path in (cut / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1].split(".")[0]) > 12:
            path.unlink()
    (cut / "summary.json").unlink()
    assert main(["train", "--resume", str(cut), "--progress", "off"]) == 0
    a, _ = checkpoint.load(checkpoint.latest(straight))
    b, _ = checkpoint.load(checkpoint.latest(cut))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert summary(cut)["test_nelbo"] == summary(straight)["test_nelbo"]


RSS_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from turbovae.cli import main

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    peak, done = [anon()], []
    def poll():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.005)
    # a first, small run imports and sets up what any run needs: the baseline is what is left after it
    warm = [a if a != sys.argv[3] else sys.argv[3] + ".small.npy" for a in sys.argv[1:]]
    warm[warm.index("--out") + 1] += "-small"
    assert main(warm) == 0
    base = peak[0] = anon()
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    rc = main(sys.argv[1:])
    done.append(1)
    t.join()
    print("RSS", rc, base, peak[0])
""")


@pytest.mark.slow  # writes a 320 MB file and trains on it in a subprocess
def test_training_on_a_mapped_file_does_not_load_it(tmp_path: Path) -> None:
    rows, dims = 400_000, 784  # 314 MB of uint8
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, dims))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 50_000):
        big[start : start + 50_000] = rng.integers(0, 256, size=(50_000, dims), dtype=np.uint8)
    big.flush()
    np.save(tmp_path / "big.npy.small.npy", np.asarray(big[:2000]))
    del big
    size = path.stat().st_size
    argv = ["train", "--data", str(path), "--out", str(tmp_path / "run"), "--hidden", "32", "--latent", "4",
            "--batch-size", "256", "--progress", "off", "data.test_fraction=0.02", "eval.iwae_k=0",
            "eval.every_epoch=false", "train.time_limit=2", "train.compile=off"]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *argv], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS")]
    _, rc, base, peak = line.split()
    assert rc == "0"
    growth = int(peak) - int(base)
    # a loaded training split alone would be 0.98 x 314 MB; the mapped run holds batches, the validation
    # and test rows' fixed binarisation (5,000 and 8,000 x 784 bytes) and a set-up chunk at a time
    assert growth < size / 4, f"RssAnon grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    assert summary(tmp_path / "run")["steps"] > 0


def make_folder(root: Path, classes: dict[str, int], seed: int = 0) -> dict[bytes, str]:
    """PNGs root/CLASS/i.png, each different; their pixels' bytes -> class."""
    rng = np.random.default_rng(seed)
    seen = {}
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            image = (rng.random((6, 5)) * 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
            seen[image.tobytes()] = name
    return seen


def test_pack_round_trip_and_training(tmp_path: Path, capsys) -> None:
    seen = make_folder(tmp_path / "imgs", {"cat": 40, "dog": 30, "emu": 30})
    out = tmp_path / "packed.npy"
    assert main(["data", "pack", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    assert "100 images of 1x6x5" in capsys.readouterr().out
    x = np.load(out)
    labels = np.load(tmp_path / "packed.labels.npy")
    names = json.loads((tmp_path / "packed.classes.json").read_text())
    assert x.shape == (100, 1, 6, 5) and x.dtype == np.uint8 and names == ["cat", "dog", "emu"]
    assert {row.tobytes(): names[y] for row, y in zip(x[:, 0], labels, strict=True)} == seen
    assert [names[y] for y in labels[:10]] != ["cat"] * 10  # shuffled, not in folder order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "packed.classes.json", "packed.labels.npy",
                                                          "packed.npy"]  # fmt: skip
    ds = load_dataset(str(out))
    assert ds.mapped and ds.meta["class_names"] == names and ds.y_test is not None
    assert torch.equal(ds.y_test, torch.from_numpy(labels[90:]))
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--out", str(run), *FAST, "--epochs", "1",
                 "--batch-size", "16", "--condition", "label"]) == 0  # fmt: skip
    assert summary(run)["steps"] > 0
    # packed again without classes (images loose in the folder): the old labels go
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.fromarray(np.full((6, 5), i * 9, dtype=np.uint8)).save(loose / f"{i}.png")
    assert main(["data", "pack", str(loose), "--out", str(out), "--overwrite"]) == 0
    assert np.load(out).shape == (4, 1, 6, 5) and not (tmp_path / "packed.labels.npy").exists()


def test_pack_errors_are_one_line_and_leave_files_alone(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    out = tmp_path / "x.npy"
    out.write_bytes(b"earlier")

    def fails(*argv: str, match: str) -> None:
        assert main(["data", "pack", *argv]) == 2
        (line,) = errors(capsys)
        assert match in line, line
        assert out.read_bytes() == b"earlier"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    fails(str(tmp_path / "imgs"), "--out", str(out), match="--overwrite")
    fails(str(tmp_path / "missing"), "--out", str(tmp_path / "y.npy"), match="not a folder")
    (tmp_path / "empty").mkdir()
    fails(str(tmp_path / "empty"), "--out", str(tmp_path / "y.npy"), match="no images found")
    fails(str(tmp_path / "imgs"), "--out", str(tmp_path / "y.npz"), match="expected a .npy")
    fails(str(tmp_path / "imgs"), "--out", str(tmp_path / "no" / "y.npy"), match="does not exist")
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / "big.png")
    fails(str(tmp_path / "imgs"), "--out", str(out), "--overwrite", match="--resize")
    # an image whose header reads but whose pixels do not: the failure comes mid-way, while writing
    (tmp_path / "imgs" / "a" / "big.png").unlink()
    good = (tmp_path / "imgs" / "b" / "0.png").read_bytes()
    (tmp_path / "imgs" / "b" / "zz.png").write_bytes(good[: len(good) // 2 + 10])
    fails(str(tmp_path / "imgs"), "--out", str(out), "--overwrite", match="cannot decode image")
    assert not (tmp_path / "x.labels.npy").exists()


@pytest.mark.slow  # torchrun, two processes
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_two_ranks_on_a_mapped_file_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", grey_images(400))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["train", "--data", str(tmp_path / "x.npy"), *FAST, "--epochs", "2", "train.precision=fp32"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "turbovae", *args, "--batch-size", "16", "--out", str(tmp_path / "two")]  # fmt: skip
    one = [sys.executable, "-m", "turbovae", *args, "--batch-size", "32", "--lr", repr(1e-3 * 2**0.5),
           "--out", str(tmp_path / "one")]  # fmt: skip
    for cmd in (two, one):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = checkpoint.load(checkpoint.latest(tmp_path / "two"))
    b, meta = checkpoint.load(checkpoint.latest(tmp_path / "one"))
    assert meta["loop"]["step"] == 2 * (324 // 32)
    for key in (k for k in a if k.startswith(("model.", "loop.perm", "rng.data"))):
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
