"""The command line end to end: artifacts, eval/sample, reproducibility, resume, and bad input."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import turbovae
from turbovae import evaluation as evaluate
from turbovae import runtime
from turbovae.cli import main
from turbovae.config import load_preset, resolve
from turbovae.engine.optim import lr_at
from turbovae.engine.setup import setup

FAST = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "--progress", "off",
        "train.log_every=5", "eval.iwae_k=5"]  # fmt: skip
# digits: 1,617 training images, of which 162 (10%) are held out for validation
N_TRAIN = 1617 - 162
SUMMARY_KEYS = {"test_nelbo", "test_bpd", "train_seconds", "total_seconds", "samples_per_second", "epochs",
                "steps", "params", "device", "precision", "data", "model"}  # fmt: skip


def train(out: Path, *extra: str) -> int:
    return main(["train", *FAST, "--out", str(out), *extra])


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    from turbovae.engine import checkpoint

    path = checkpoint.latest(run)
    assert path is not None
    return checkpoint.load(path)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert train(out, "--epochs", "3") == 0
    return out


def test_train_leaves_every_artifact(run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.png", "reconstructions.png"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step-*.safetensors"))
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["data"] == "digits" and summary["model"] == "mlp" and summary["epochs"] == 3
    assert summary["steps"] == 3 * (N_TRAIN // 64)
    assert math.isfinite(summary["test_nelbo"]) and 0 < summary["test_bpd"] < 1.5
    assert summary["total_seconds"] >= summary["train_seconds"] > 0
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and {"train", "eval", "checkpoint"} <= set(events)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["hidden"] == [32] and resolved["data"]["binarize"] == "auto"
    for name in ("samples.png", "reconstructions.png"):
        with Image.open(run / name) as im:
            im.verify()


def test_eval_json(run, capsys):
    assert main(["eval", str(run), "--iwae-k", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"nelbo", "nll_iwae", "k", "bpd", "n"} <= set(result)
    assert result["k"] == 20 and result["n"] == 180
    assert result["nll_iwae"] < result["nelbo"] + 1.0  # the IWAE bound is tighter, up to noise
    assert math.isclose(result["bpd_iwae"], result["nll_iwae"] / (64 * math.log(2)))
    assert math.isclose(result["bpd"], result["nelbo"] / (64 * math.log(2)))
    assert main(["eval", str(run), "--iwae-k", "2", "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == N_TRAIN


def test_sample_png_and_npy(run, tmp_path, capsys):
    assert main(["sample", str(run), "--n", "10", "--out", str(tmp_path / "s.png")]) == 0
    with Image.open(tmp_path / "s.png") as im:
        # 10 images of 8×8 in rows of 8 with 1-pixel borders: 73×19 pixels, scaled ×4 to reach 256 wide
        assert im.size == (292, 76) and im.mode == "L"
        pixels = np.asarray(im)
    assert (pixels[40:72, 76:] == 64).all()  # the second row holds 2 images; the rest is background
    assert (pixels[4:36, 4:36] != 64).any() and (pixels[40:72, 40:72] != 64).any()
    assert main(["sample", str(run), "--n", "10", "--out", str(tmp_path / "s.npy"), "--draw"]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (10, 1, 8, 8) and set(np.unique(x)) <= {0.0, 1.0}


def test_sample_temperature(run, tmp_path, capsys):
    """T = 0 gives the prior's mode (every row the same decoded z = 0); T = 1 is the default draw; a
    negative T is one line and exit 2, with nothing written."""
    vae = turbovae.load(run)
    mode = vae.sample(6, generator=torch.Generator().manual_seed(0), temperature=0.0)
    assert torch.allclose(mode, vae.decode(torch.zeros(1, 4)).expand_as(mode))
    one = vae.sample(6, generator=torch.Generator().manual_seed(3), temperature=1.0)
    default = vae.sample(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, default) and one.std(0).mean() > 0.01
    # a colder draw from the same noise stays nearer the mode
    cold = vae.sample(6, generator=torch.Generator().manual_seed(3), temperature=0.3)
    assert (cold - mode).abs().mean() < (one - mode).abs().mean()
    assert main(["sample", str(run), "--n", "4", "--temperature", "0", "--out", str(tmp_path / "t.npy")]) == 0
    x = np.load(tmp_path / "t.npy")
    assert np.allclose(x, x[:1])
    assert (
        main(["sample", str(run), "--n", "4", "--temperature", "-1", "--out", str(tmp_path / "u.npy")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temperature" in err[0] and not (tmp_path / "u.npy").exists()


def test_time_limit_stops_mid_run_then_evaluates_and_writes(tmp_path):
    """train.time_limit: the run stops at the first log interval past the limit (here long before its
    5,000 epochs), then evaluates, writes the summary and a checkpoint that loads, as at a normal end."""
    out = tmp_path / "limited"
    assert train(out, "--epochs", "5000", "train.time_limit=0.5", "eval.every_epoch=false") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_seconds"] >= 0.5
    assert 0 < summary["time_limited_epochs"] < 5000 and summary["epochs"] < 5000
    # the limit is checked at log intervals (every 5 steps) and at epoch ends (every 22 steps)
    steps_per_epoch = N_TRAIN // 64
    boundary = summary["steps"] % 5 == 0 or summary["steps"] % steps_per_epoch == 0
    assert math.isfinite(summary["test_nelbo"]) and boundary
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [e for e in events if e["event"] == "time_limit"]
    assert stop["step"] == summary["steps"] and events[-1]["event"] == "end"
    assert turbovae.load(out).sample(2).shape == (2, 1, 8, 8)
    assert train(tmp_path / "bad", "train.time_limit=-1") == 2


def test_max_steps_stops_mid_epoch_spans_the_schedule_and_resumes_when_raised(tmp_path):
    """train.max_steps: the run stops after exactly that many steps (here mid-epoch, between log
    intervals), the warm-up + cosine schedule ends there, then it evaluates and writes as at a normal
    end; resumed with a higher limit it goes on from that step."""
    out = tmp_path / "stepped"
    common = ["train.schedule=warmup-cosine", "train.warmup_steps=4", "eval.every_epoch=false"]
    assert train(out, "--epochs", "5", "train.max_steps=32", *common) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps_per_epoch = N_TRAIN // 64
    assert summary["steps"] == 32 and summary["step_limited_epochs"] == pytest.approx(32 / steps_per_epoch)
    assert summary["epochs"] == 32 // steps_per_epoch and "time_limited_epochs" not in summary
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [e for e in events if e["event"] == "max_steps"]
    assert stop["step"] == 32 and events[-1]["event"] == "end"
    train_events = [e for e in events if e["event"] == "train"]
    assert train_events[-1]["step"] == 32  # a log at the limit, though the log interval is 5 steps
    cfg = resolve(base=load_preset(str(out / "config.yaml")))
    assert train_events[-1]["lr"] == pytest.approx(lr_at(cfg, 31, 32))  # the schedule's last step
    # near the schedule's floor (lr x final_lr), not a third of the way down a 5-epoch schedule
    assert (
        lr_at(cfg, 31, 32)
        < 1.5 * cfg.train.lr * cfg.train.final_lr
        < 0.1 * lr_at(cfg, 31, 5 * steps_per_epoch)
    )
    assert math.isfinite(summary["test_nelbo"])
    assert main(["train", "--resume", str(out), "--progress", "off", "train.max_steps=40"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert train(tmp_path / "bad", "train.max_steps=-1") == 2


def test_a_time_limited_run_stopped_at_an_epoch_end_resumes_once_the_limit_is_raised(tmp_path, capsys):
    """With log_every = the 22 steps of an epoch the limit is only checked at epoch ends: the run stops
    after whole epochs, counts them as done and evaluates them; resumed under the same limit (which
    counts all its training seconds) it takes no step; a raised limit gives it more, a cleared one
    lets it run to its end."""
    out = tmp_path / "limited"
    assert train(out, "--epochs", "3", "train.time_limit=1e-6", "train.log_every=22") == 0

    def summary() -> dict:
        return json.loads((out / "summary.json").read_text())

    def evals() -> list[int]:
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [e["epoch"] for e in events if e["event"] == "eval"]

    first = summary()
    assert first["epochs"] == 1 and first["time_limited_epochs"] == 1.0 and first["steps"] == 22
    assert evals() == [1]  # the epoch the limit ended was evaluated like any other
    resume = ["train", "--resume", str(out), "--progress", "off"]
    assert main(resume) == 0
    same = summary()
    assert (same["steps"], same["epochs"], same["time_limited_epochs"]) == (22, 1, 1.0)
    assert same["train_seconds"] == first["train_seconds"]
    capsys.readouterr()
    assert main([*resume, "train.lr=0.1"]) == 2  # other settings stay as saved
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr=0.1" in err[0] and "train.time_limit" in err[0]
    assert main([*resume, f"train.time_limit={first['train_seconds'] + 1e-3}"]) == 0  # one epoch more
    raised = summary()
    assert (raised["steps"], raised["epochs"], raised["time_limited_epochs"]) == (44, 2, 2.0)
    assert main([*resume, "train.time_limit=0"]) == 0
    done = summary()
    assert done["epochs"] == 3 and done["steps"] == 66 and "time_limited_epochs" not in done
    assert evals() == [1, 2, 3]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["time_limit"] == 0


def test_load_reproduces_the_summary(run):
    vae = turbovae.load(run)
    assert vae.encode(torch.rand(3, 1, 8, 8)).mean.shape == (3, 4)
    assert vae.decode(torch.zeros(2, 4)).shape == (2, 1, 8, 8)
    assert vae.sample(5).shape == (5, 1, 8, 8)
    s = setup(vae.config, torch.device("cpu"))
    # same weights, same evaluation noise → the exact number the run wrote
    ev = evaluate.nelbo(
        vae, s.x_test, s.prepare_test, generator=runtime.generator(torch.device("cpu"), 54321)
    )
    assert ev["nelbo"] == json.loads((run / "summary.json").read_text())["test_nelbo"]


def test_a_seed_reproduces_a_run_exactly(tmp_path):
    assert train(tmp_path / "a", "--epochs", "2", "--seed", "3") == 0
    assert train(tmp_path / "b", "--epochs", "2", "--seed", "3") == 0
    assert train(tmp_path / "c", "--epochs", "2", "--seed", "4") == 0
    a, b, c = (final_tensors(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.net.encoder.0.weight"], c["model.net.encoder.0.weight"])


def test_resume_continues_exactly(tmp_path):
    assert train(tmp_path / "full", "--epochs", "4", "--checkpoint-every", "10") == 0
    assert train(tmp_path / "part", "--epochs", "2", "--checkpoint-every", "10") == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "4", "--progress", "off"]) == 0
    full, part = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "part")
    model_keys = [k for k in full if k.startswith(("model.", "optim."))]
    assert model_keys and all(torch.equal(full[k], part[k]) for k in model_keys)
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["steps"] == 4 * (N_TRAIN // 64)


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (extra argv, a piece of the expected message)."""
    garbage = tmp / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip file")
    nan = np.random.default_rng(0).random((100, 10)).astype(np.float32)
    nan[7, 3] = np.nan
    idx_dir = tmp / "idx"
    idx_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (idx_dir / f"{name}.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    return {
        "missing path": (["--data", str(tmp / "nope.npz")], "nope.npz"),
        "corrupt npz": (["--data", str(garbage)], "garbage.npz"),
        "truncated idx": (["--data", "fashion-mnist", f"data.dir={idx_dir}"], "idx"),
        "nan in data": (
            ["--data", str(write_npz(tmp / "nan.npz", x=nan)), "--likelihood", "gaussian"],
            "NaN",
        ),
        "wrong shape": (["--data", str(write_npz(tmp / "5d.npz", x=np.zeros((4, 2, 2, 2, 2))))], "shape"),
        "conv on vectors": (
            [
                "--data",
                str(write_npz(tmp / "v.npz", x=np.random.rand(300, 10))),
                "--model",
                "conv",
                "--likelihood",
                "gaussian",
            ],
            "needs images",
        ),
        "unknown model": (["--model", "mpl"], "did you mean 'mlp'"),
        "option of another model": (["--model", "conv"], "model.hidden is not an option of model 'conv'"),
        "unknown likelihood": (["--likelihood", "gausian"], "did you mean 'gaussian'"),
        "unknown key": (["train.lrr=1"], "did you mean 'lr'"),
        "negative lr": (["--lr", "-1"], "train.lr must be > 0"),
        "zero latent": (["--latent", "0"], "model.latent must be > 0"),
        "bernoulli on grey": (["--binarize", "none", "--likelihood", "bernoulli"], "needs binary data"),
        "batch too large": (["--batch-size", "5000"], "fewer than train.batch_size"),
        "bad config file": (["--config", str(tmp / "missing.yaml")], "missing.yaml"),
    }


def test_bad_input_ends_with_one_line_and_exit_2_and_leaves_earlier_runs(run, tmp_path, capsys):
    before = snapshot(run)
    for name, (extra, expected) in bad_inputs(tmp_path).items():
        capsys.readouterr()
        # FAST's --hidden is an option of the MLP, which another model refuses ("option of another model")
        base = [a for a in FAST if a not in ("--hidden", "32")] if name == "conv on vectors" else FAST
        code = main(["train", *base, "--out", str(run), "--overwrite", *extra])
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("turbovae: error:"), f"{name}: {err!r}"
        assert expected in lines[0], f"{name}: {lines[0]!r}"
        assert snapshot(run) == before, f"{name} changed the earlier run"


def test_an_existing_run_is_not_overwritten(run, capsys):
    before = snapshot(run)
    assert train(run, "--epochs", "1") == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(run) == before


def test_overwrite_replaces_a_run(tmp_path):
    assert train(tmp_path / "r", "--epochs", "1") == 0
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert train(tmp_path / "r", "--epochs", "2", "--overwrite") == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs"] == 2
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only turbovae's own files go
    assert len(list((tmp_path / "r" / "checkpoints").glob("step-*.json"))) <= 2
    assert (tmp_path / "r" / "checkpoints" / "best.json").is_file()


def test_the_installed_command_reports_errors_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "turbovae", "train", "--data", str(tmp_path / "x.npz")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "x.npz" in proc.stderr


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's Fashion-MNIST absent"
)
@pytest.mark.slow  # real Fashion-MNIST
def test_fashion_mnist_smoke(tmp_path):
    out = tmp_path / "fmnist"
    argv = ["train", "--data", "fashion-mnist", "--epochs", "1", "--hidden", "128", "--latent", "16"]
    assert main([*argv, "--progress", "off", "--out", str(out), "eval.iwae_k=2", "train.log_every=100"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_train"], summary["n_test"], summary["binarize"]) == (55000, 10000, "dynamic")
    assert 60 < summary["test_nelbo"] < 400  # nats per image on dynamically binarised Fashion-MNIST
