"""Runs you can trust, wave 3 (issue 33): each test is a fault of the audit in
shared/audits/reliability-faults.tsv (its id in the comment) or of the issue, and what must happen
instead. Each failed on the code before its fix."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from turbovae.cli import main
from turbovae.config import resolve
from turbovae.engine import checkpoint

FAST = ["--data", "digits", "--hidden", "16", "--latent", "2", "--batch-size", "64", "--epochs", "1",
        "--progress", "off", "eval.iwae_k=2", "train.log_every=5"]  # fmt: skip
SRC = Path(__file__).resolve().parent.parent / "src"
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "PYTHONWARNINGS": "ignore"}  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def one_error_line(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err[-2000:])
    errors = [line for line in lines if line.startswith("turbovae: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert all(e in errors[0] for e in expected), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run: two step checkpoints (checkpoint every 10 steps, 25 steps) and best.*."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FAST, "--checkpoint-every", "10", "--out", str(out)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path, name: str = "victim") -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


# ---- 1. nothing turbovae writes lands outside the run directory -----------------------------------------


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "new-run"])
def test_a_symlinked_lock_is_refused_and_its_target_untouched(finished, tmp_path, capsys, fresh):
    """S-lock_symlink, S-lock_symlink_newrun: the lock was opened through the link, truncating the file
    outside the run and writing a process id into it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if fresh:
        run = tmp_path / "new"
        run.mkdir()
        argv = ["train", *FAST, "--out", str(run)]
    else:
        run = copy_run(finished, tmp_path, "run")
        argv = ["train", "--resume", str(run), "--epochs", "2"]
    (run / ".lock").symlink_to("../victim")
    before = snapshot(run)
    one_error_line(capsys, argv, f"{run / '.lock'} is a symbolic link", "../victim")
    assert victim.read_text() == "precious\n"
    assert snapshot(run) == before and (run / ".lock").is_symlink()


def test_a_fifo_as_the_lock_is_one_line(finished, tmp_path, capsys):
    """S-lock_fifo: flock on a FIFO was an OSError traceback (EINVAL)."""
    run = copy_run(finished, tmp_path)
    os.mkfifo(run / ".lock")
    one_error_line(capsys, ["train", "--resume", str(run), "--epochs", "2"], "is not a regular file")


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints", "checkpoints/refused"])
def test_resume_refuses_a_run_file_or_folder_that_links_outside(finished, tmp_path, capsys, name):
    """S-metrics_symlink, S-checkpoints_symlink, S-refused_symlink: metrics.jsonl was appended to through
    the link, checkpoints written into the linked folder and its step-* files pruned."""
    run = copy_run(finished, tmp_path, "run")
    outside = tmp_path / "outside"
    moved = run / name
    if moved.exists():
        shutil.move(moved, outside)
    else:
        outside.mkdir()
    moved.symlink_to(outside)
    (outside / "precious.txt" if outside.is_dir() else tmp_path / "unused").write_text("x")
    before = snapshot(tmp_path / "outside") if outside.is_dir() else outside.read_bytes()
    one_error_line(capsys, ["train", "--resume", str(run), "--epochs", "2"], f"{moved} is a symbolic link")
    after = snapshot(tmp_path / "outside") if outside.is_dir() else outside.read_bytes()
    assert after == before


def test_overwrite_removes_a_linked_checkpoints_folder_not_what_it_points_to(finished, tmp_path, capsys):
    """S-checkpoints_symlink_overwrite: rmtree on the link was an OSError traceback."""
    run = copy_run(finished, tmp_path, "run")
    outside = tmp_path / "outside"
    shutil.move(run / "checkpoints", outside)
    (run / "checkpoints").symlink_to(outside)
    before = snapshot(outside)
    assert main(["train", *FAST, "--overwrite", "--out", str(run)]) == 0
    assert snapshot(outside) == before
    assert not (run / "checkpoints").is_symlink() and list((run / "checkpoints").glob("step-*.json"))
    assert json.loads((run / "summary.json").read_text())["steps"] > 0


def test_report_refuses_a_figures_folder_that_links_outside(finished, tmp_path, capsys):
    """S-figures_symlink (low): the report's pictures were written into the linked folder."""
    run = copy_run(finished, tmp_path, "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    (run / "figures").symlink_to(outside)
    one_error_line(capsys, ["report", str(run)], f"{run / 'figures'} is a symbolic link")
    assert [p.name for p in outside.iterdir()] == ["precious.txt"]


def test_a_fifo_in_a_checkpoints_place_is_skipped_not_waited_on(finished, tmp_path):
    """S-json_fifo_eval: a FIFO as checkpoints/step-000000099.json made `eval` hang (killed at 60 s)."""
    run = copy_run(finished, tmp_path)
    os.mkfifo(run / "checkpoints" / "step-000000099.json")
    argv = [sys.executable, "-m", "turbovae", "eval", str(run), "--iwae-k", "2", "--out", "-"]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped newer step-000000099.json" in proc.stderr and "not a regular file" in proc.stderr


def test_eval_refuses_a_config_yaml_whose_data_or_model_was_edited(finished, tmp_path, capsys):
    """O18-edited-dataname-eval: `eval` on a run whose config.yaml names other data evaluated those and
    wrote the run's eval.json (resume refuses the same edit)."""
    run = copy_run(finished, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("name: digits", "name: words", 1))
    before = snapshot(run)
    one_error_line(capsys, ["eval", str(run), "--iwae-k", "2"], "data.name is 'digits' in the checkpoint",
                   "'words' in config.yaml")  # fmt: skip
    assert snapshot(run) == before


# ---- 2. --resume continues a run killed at any moment ----------------------------------------------------


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest(run)
    assert path is not None
    return checkpoint.load(path)[0]


def test_resume_of_a_run_killed_after_best_before_its_first_step_checkpoint_starts_over_exactly(
    tmp_path, capsys
):
    """Issue 33, high 5: a run killed after an epoch wrote best.* but before its first step checkpoint
    (train.checkpoint_every longer than an epoch) could not be resumed: "start over with --overwrite".
    The directory such a kill leaves is made here from a finished run (its step checkpoints and
    summary.json removed); resume starts it again with its seed and ends where the run ended."""
    run = tmp_path / "run"
    # 2 epochs of 22 steps: one step checkpoint, at the end
    argv = [*FAST, "--epochs", "2", "--checkpoint-every", "100"]
    assert main(["train", *argv, "--out", str(run)]) == 0
    reference = final_tensors(run)
    best = (run / "checkpoints" / "best.safetensors").read_bytes()  # (its JSON holds timings)
    for path in (run / "checkpoints").glob("step-*"):
        path.unlink()
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "from the start" in capsys.readouterr().err
    resumed = final_tensors(run)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert (run / "checkpoints" / "best.safetensors").read_bytes() == best
    assert json.loads((run / "summary.json").read_text())["steps"] == 44


def test_resume_still_refuses_a_finished_run_without_step_checkpoints(finished, tmp_path, capsys):
    """A finished run (summary.json) whose step checkpoints were deleted is not a killed run: starting
    it over would replace its results."""
    run = copy_run(finished, tmp_path)
    for path in (run / "checkpoints").glob("step-*"):
        path.unlink()
    before = snapshot(run)
    one_error_line(capsys, ["train", "--resume", str(run)], "summary.json but no step checkpoint")
    assert snapshot(run) == before


KILL_IN_SETUP = """
import os, signal, sys
import turbovae.engine.loop as t

def setup(*args, **kwargs):  # SIGKILL while the data are being loaded, as a preemption would
    os.kill(os.getpid(), signal.SIGKILL)

t.setup = setup
from turbovae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_of_a_run_killed_while_loading_its_data_starts_it_over_exactly(tmp_path):
    """Issue 33, high 5, the earliest moment: a run killed before it wrote anything but its lock left
    nothing --resume could continue ("no config.yaml there")."""
    argv = [*FAST, "--seed", "3"]
    assert main(["train", *argv, "--out", str(tmp_path / "reference")]) == 0
    run = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_SETUP)
    killed = subprocess.run([sys.executable, str(script), "train", *argv, "--out", str(run)], env=ENV,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    assert main(["train", "--resume", str(run)]) == 0
    reference, resumed = final_tensors(tmp_path / "reference"), final_tensors(run)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_run_that_fails_while_loading_its_data_leaves_no_config_behind(tmp_path, capsys):
    """The config.yaml written before the data are loaded goes again when the run fails there (a typo
    leaves no run directory, as before)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "run", empty):
        one_error_line(capsys, ["train", *FAST, "--data", str(tmp_path / "missing.npz"), "--out", str(out)])
    assert not (tmp_path / "new").exists() and list(empty.iterdir()) == []


# ---- 3. a memory-mapped training file changed under the run ----------------------------------------------

MAPPED = ["--hidden", "16", "--latent", "2", "--batch-size", "32", "--epochs", "3", "--progress", "off",
          "eval.iwae_k=2", "train.compile=off", "train.log_every=5"]  # fmt: skip


def grey_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 1, 8, 8)) * 255).astype(np.uint8)


def rewrite_in_place(path: Path, keep_mtime: bool = False) -> None:
    """Every data byte replaced through the same inode (the mapping sees it), as ``r+b`` would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(128)  # the .npy header of a small array is 128 bytes
        data = f.read()
        f.seek(128)
        f.write(bytes(255 - b for b in data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES = {
    "in-place": rewrite_in_place,
    "np-save-over": lambda p: np.save(p, 255 - np.load(p)),
    "in-place-same-mtime": lambda p: rewrite_in_place(p, keep_mtime=True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_mapped_file_rewritten_during_training_stops_the_run_keeping_its_checkpoints(
    tmp_path, capsys, monkeypatch, change
):
    """H-mm-rewrite_inplace, H-mm-np_save_over (high): the run went on with the new bytes (test NELBO
    0.0001 against 356). It stops with one line at the next batch (size or modification time) or at the
    epoch's end (a checksum of sampled pages: the rewrite that kept the modification time); the
    checkpoints of the epochs before are kept, and the run resumes once the file is restored, ending as
    an uninterrupted run does."""
    import turbovae.engine.loop as loop

    path = tmp_path / "x.npy"
    np.save(path, grey_images(600))
    original = path.read_bytes()
    assert main(["train", "--data", str(path), *MAPPED, "--out", str(tmp_path / "reference")]) == 0
    steps_per_epoch = json.loads((tmp_path / "reference" / "summary.json").read_text())["steps"] // 3
    gather, calls = loop.gather, [0]

    def changing(x, rows, device):
        calls[0] += 1
        if calls[0] == steps_per_epoch + 3:  # in the second epoch
            CHANGES[change](path)
        return gather(x, rows, device)

    monkeypatch.setattr(loop, "gather", changing)
    run = tmp_path / "run"
    one_error_line(capsys, ["train", "--data", str(path), *MAPPED, "--out", str(run)],
                   f"{path} changed on disk during training", "checkpoints are kept")  # fmt: skip
    assert [p.name for p in (run / "checkpoints").glob("step-*.json")] == [f"step-{steps_per_epoch:09d}.json"]
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(loop, "gather", gather)
    path.write_bytes(original)
    assert main(["train", "--resume", str(run)]) == 0
    reference, resumed = final_tensors(tmp_path / "reference"), final_tensors(run)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


TRUNCATE = """
import os, sys
import turbovae.engine.loop as t

gather, calls = t.gather, [0]

def truncating(x, rows, device):
    calls[0] += 1
    if calls[0] == 20:
        os.truncate(sys.argv[1], 1000)
    return gather(x, rows, device)

t.gather = truncating
from turbovae.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_mapped_file_truncated_during_training_is_one_line_not_sigbus(tmp_path):
    """H-mm-truncate: the next read of a page past the new end killed the run with SIGBUS, no message."""
    path = tmp_path / "x.npy"
    np.save(path, grey_images(600))
    script = tmp_path / "truncate.py"
    script.write_text(TRUNCATE)
    argv = [sys.executable, str(script), str(path), "train", "--data", str(path), *MAPPED, "--out",
            str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"turbovae: error: {path} changed on disk") and "to 1,000 bytes" in lines[-1]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*.json"))


# ---- 4. tracking never kills or corrupts a run -------------------------------------------------------------

TRACKED = [*FAST, "eval.iwae_k=0"]


def tracked_run(tmp_path, capsys, *overrides: str) -> tuple[Path, list[str]]:
    """A run with tracking ``overrides`` that must end as any run does; its warning lines."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *TRACKED, "--out", str(out), *overrides]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 22
    return out, [line for line in err.splitlines() if line.startswith("turbovae: warning: train.")]


@pytest.mark.parametrize("uri", ["folder", "::::", "ftp://127.0.0.1:9/x", "file-under"])
def test_an_mlflow_store_that_fails_is_one_warning_and_the_run_goes_on(tmp_path, capsys, monkeypatch, uri):
    """J-mlflow-ok, J-mlflow-small_fs, J-mlflow-garbage, J-mlflow-ftp, J-mlflow-under_file: every MLflow
    failure was a traceback and killed the run (a plain folder, which MLflow 3 refuses as a store;
    garbage URIs; a path under a file); a failed start left config.yaml and metrics.jsonl behind."""
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    paths = {"folder": tmp_path / "mlruns", "file-under": tmp_path / "a-file" / "mlruns"}
    target = str(paths.get(uri, uri))
    _, warnings = tracked_run(tmp_path, capsys, f"train.mlflow={target}")
    if warnings:  # (an MLflow that still takes a plain folder tracks into it: that is fine too)
        assert len(warnings) == 1 and "train.mlflow failed, and the run goes on without it" in warnings[0]
    else:
        assert uri == "folder"


def test_a_tensorboard_folder_that_is_a_file_is_one_warning(tmp_path, capsys):
    """J-tb-file, J-tb-devnull: FileExistsError traceback."""
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").write_text("x")
    _, warnings = tracked_run(tmp_path, capsys, f"train.tensorboard={tmp_path / 'tb'}")
    assert len(warnings) == 1 and "train.tensorboard failed" in warnings[0]


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    """J-tb-fills, J-mlflow-fills, J-mlflow-sqlite-fills: a full disk under TensorBoard's or MLflow's
    store killed training."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = [0]
    add_scalar = SummaryWriter.add_scalar

    def filling(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(28, "No space left on device")
        return add_scalar(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", filling)
    out, warnings = tracked_run(tmp_path, capsys, f"train.tensorboard={tmp_path / 'tb'}")
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end"


def test_mlflow_http_retries_are_bounded(tmp_path, monkeypatch):
    """J-mlflow-closed_port, J-mlflow-server500: MLflow retried for 255 s before the traceback. Its
    retries and timeout are lowered unless the user set them."""
    from turbovae.engine import tracking

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    cfg = resolve(overrides=["train.mlflow=http://127.0.0.1:9"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # no network: stop at the import
    tracking.Tracker(cfg, tmp_path / "run")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's own setting stays


# ---- 5. data pack: a killed pack, a disk that fills ------------------------------------------------------


def png_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((6, 5)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def test_a_killed_packs_temporary_file_is_removed_by_the_next_pack(tmp_path):
    """H-pack-kill: SIGKILL mid-pack left a full-size .X.npy.PID.tmp that no later pack removed."""
    folder, out = png_folder(tmp_path / "imgs"), tmp_path / "x.npy"
    ended = [sys.executable, "-c", "import os; print(os.getpid())"]  # a process id that has ended
    gone = subprocess.run(ended, capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".x.npy.{gone}.tmp"
    stale.write_bytes(b"\0" * 10_000)
    alive = tmp_path / ".x.npy.1.tmp"  # process 1 lives: another pack at work
    alive.write_bytes(b"x")
    assert main(["data", "pack", str(folder), "--out", str(out)]) == 0
    assert not stale.exists() and alive.exists()
    assert np.load(out).shape == (12, 1, 6, 5)


def test_a_disk_that_fills_during_a_pack_is_one_line_not_sigbus(tmp_path, capsys, monkeypatch):
    """H-pack-fills: a disk filled by another process while the images were decoded into the mapped
    file killed the pack with SIGBUS. Its blocks are now allocated before the first write, where a full
    disk is ENOSPC: one line, no temporary file left."""
    folder, out = png_folder(tmp_path / "imgs"), tmp_path / "x.npy"
    reserved: list[int] = []

    def full(fd, offset, length):
        reserved.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    one_error_line(
        capsys, ["data", "pack", str(folder), "--out", str(out)], "No space left on device", str(out)
    )
    assert reserved and reserved[0] >= 12 * 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_pack_over_a_folder_named_like_its_out_is_one_line_naming_it(tmp_path, capsys):
    """H-pack-out-is-dir: `--out X.npy --overwrite` where X.npy is a folder named the temporary file."""
    folder, out = png_folder(tmp_path / "imgs"), tmp_path / "x.npy"
    out.mkdir()
    one_error_line(
        capsys, ["data", "pack", str(folder), "--out", str(out), "--overwrite"], f"--out {out} is a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "x.npy"] and not list(out.iterdir())
