"""Runs you can trust, wave 3 (issue 33): each test is a fault of the audit in
shared/audits/reliability-faults.tsv (its id in the comment) or of the issue, and what must happen
instead. Each failed on the code before its fix."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the run settings and helpers of the earlier waves' fault tests (tests/test_faults.py), shared
from test_faults import ENV, FAST, one_error_line, snapshot

from turbovae.cli import main
from turbovae.config import resolve
from turbovae.engine import checkpoint


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# pytest catches a thread's uncaught exception (threading prints its traceback outside pytest): an error
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_under_tensorboards_writer_thread_is_one_warning_no_traceback(
    tmp_path, capsys, monkeypatch
):
    """J-tb-fills, replayed on a 16 KiB tmpfs (scripts/fault_rerun.py): TensorBoard writes its events in
    a thread of its own; a full disk there printed that thread's traceback before the one warning."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer

    calls = [0]
    write = record_writer.RecordWriter.write

    def filling(self, data):  # runs in TensorBoard's writer thread
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", filling)
    _, warnings = tracked_run(tmp_path, capsys, f"train.tensorboard={tmp_path / 'tb'}")
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


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


# ---- 6. compression: lossless or refused, forged files, memory, overwrites, the checkpoint it used ------


@pytest.fixture(scope="module")
def grey8(tmp_path_factory) -> Path:
    """D8: a discretized-logistic run on 8-bit 8x8 grey images (the digits scaled to 0..240)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("d8")
    np.save(root / "d8.npy", (load_digits().images * 15).astype(np.uint8))
    out = root / "run"
    argv = ["train", *FAST, "--data", str(root / "d8.npy"), "--likelihood", "discretized-logistic",
            "--checkpoint-every", "10", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def save_image(path: Path, pixels: np.ndarray, mode: str | None = None, **kwargs) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    image.save(path, **kwargs)


def png16(path: Path, colour: bool) -> None:
    """A 16-bit PNG (Pillow writes 16-bit grey; colour is built by hand)."""
    import struct
    import zlib

    channels, kind = (3, 2) if colour else (1, 0)
    rows = np.random.default_rng(0).integers(0, 65535, (8, 8 * channels)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", 8, 8, 16, kind, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))  # fmt: skip


def bomb_png(path: Path, side: int = 50_000) -> None:
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


GREY = np.random.default_rng(3).integers(0, 256, (8, 8)).astype(np.uint8)


@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey16", "rgb16", "palette", "jpeg", "bomb", "grey+alpha"])
def test_a_folder_the_codec_cannot_give_back_exactly_is_refused_before_writing(grey8, tmp_path, capsys, kind):
    """F-folder-colour, F-folder-rgba, F-folder-grey16, H-compress-bomb, H-compress-bomb2: colour, RGBA
    and 16-bit PNGs came back 8-bit grey with exit 0; a 50,000^2 header was a traceback, and 13,000^2
    images were read whole before their size was checked. (Images of other sizes than the run's are
    cut into tiles now: tests/test_compression.py.)"""
    folder = tmp_path / "in"
    save_image(folder / "a.png", GREY)  # a good image first: nothing is written for it either
    bad = folder / "b.png"
    rgb = np.stack([GREY, GREY[::-1], GREY.T], -1)
    if kind == "rgb":
        save_image(bad, rgb)
    elif kind == "rgba":
        save_image(bad, np.concatenate([rgb, GREY[..., None]], -1))
    elif kind in ("grey16", "rgb16"):
        png16(bad, colour=kind == "rgb16")
    elif kind == "palette":
        save_image(bad, rgb, "P")
    elif kind == "grey+alpha":
        save_image(bad, np.stack([GREY, GREY], -1))
    elif kind == "jpeg":
        save_image(bad.with_suffix(".jpg"), GREY)
    else:
        bomb_png(bad)
    tvz = tmp_path / "c.tvz"
    one_error_line(capsys, ["compress", str(grey8), str(folder), "--out", str(tvz)], str(folder))
    assert not tvz.exists()


def test_a_folder_comes_back_with_its_names_formats_modes_and_pixels(grey8, tmp_path, capsys):
    """F-folder-stems: a.png + a.bmp (and b.png + b.tif) were both written to a.png: 6 images in, 4 out.
    Every file now comes back under its own name, in its own format and mode, pixel for pixel."""
    from PIL import Image

    folder = tmp_path / "in"
    rng = np.random.default_rng(5)
    for name in ("a.png", "a.bmp", "b.png", "b.tif", "sub/c.tiff", "sub/c.png"):
        save_image(folder / name, rng.integers(0, 256, (8, 8)).astype(np.uint8))
    save_image(folder / "bits.png", (rng.random((8, 8)) > 0.5).astype(np.uint8) * 255, "1")
    tvz, back = tmp_path / "c.tvz", tmp_path / "back"
    assert main(["compress", str(grey8), str(folder), "--out", str(tvz)]) == 0
    assert main(["decompress", str(grey8), str(tvz), "--out", str(back)]) == 0
    ins = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert sorted(p.relative_to(back) for p in back.rglob("*") if p.is_file()) == ins and len(ins) == 7
    for name in ins:
        with Image.open(folder / name) as a, Image.open(back / name) as b:
            assert (a.format, a.mode) == (b.format, b.mode), name
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_binarize_thresholds_as_the_run_was_trained_or_is_refused(finished, grey8, tmp_path, capsys):
    """F-binarize-digits16: digits (0..16) on a run trained on them, with --binarize, were thresholded
    at 128 and stored as zeros. The threshold is half the run's largest training value (8 here)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:40].astype(np.uint8)  # 0..16, as the run saw them
    src, tvz, back = tmp_path / "d.npy", tmp_path / "d.tvz", tmp_path / "back.npy"
    np.save(src, digits)
    assert main(["compress", str(finished), str(src), "--binarize", "--out", str(tvz)]) == 0
    assert main(["decompress", str(finished), str(tvz), "--out", str(back)]) == 0
    ones = np.load(back)
    assert ones.shape == digits.shape and 0.2 < ones.mean() < 0.5
    assert np.array_equal(ones, (digits >= 8).astype(np.uint8))
    grey = tmp_path / "g.npy"  # values the run never saw: refused, not thresholded somewhere else
    np.save(grey, (digits.astype(np.int64) * 15).astype(np.uint8))
    argv = ["compress", str(finished), str(grey), "--binarize", "--out", str(tmp_path / "g.tvz")]
    one_error_line(capsys, argv, "[0, 16]")


def forge(tvz: Path, out: Path, edit) -> Path:
    """A copy of a .tvz whose header fields and metadata ``edit`` changed (a dict in, a dict or raw JSON
    bytes out), the header rewritten and the CRC recomputed. Numbers the binary header cannot hold
    (negative, strings) go into the JSON metadata, where the decoder must refuse them too."""
    import struct
    import zlib

    from turbovae import compression as c

    data = tvz.read_bytes()
    info, _, weights, pos = c._parse(data)
    values = info.pop("values")
    fields = edit(info)
    if not isinstance(fields, dict):
        numbers, blob = info, fields if isinstance(fields, bytes) else json.dumps(fields).encode()
    else:
        numbers = {k: v for k, v in fields.items() if k in c._NUMBERS and isinstance(v, int) and v >= 0}
        rest = {k: v for k, v in fields.items() if k not in numbers and k != "event_shape"}
        blob = json.dumps(rest).encode() if rest else b""
        numbers = {**info, **numbers}
    shape = numbers["event_shape"]
    head = c.MAGIC + bytes([c.VERSION, c._FLAG_BINARY if values == "binary" else 0]) + weights
    fixed = [numbers[k] for k in c._NUMBERS] + [len(shape), *shape, len(blob)]
    body = head + b"".join(c._varint(v) for v in fixed) + blob + data[pos:-4]
    out.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return out


@pytest.fixture(scope="module")
def grey8_tvz(grey8, tmp_path_factory) -> tuple[Path, Path]:
    """(a .tvz of 20 images coded with D8 in steps of at most 4, a folder of the same images as PNGs)."""
    root = tmp_path_factory.mktemp("tvz")
    folder = root / "pngs"
    rng = np.random.default_rng(9)
    for i in range(20):
        save_image(folder / f"{i:02d}.png", rng.integers(0, 256, (8, 8)).astype(np.uint8))
    tvz = root / "f.tvz"
    assert main(["compress", str(grey8), str(folder), "--out", str(tvz), "--batch", "4"]) == 0
    return tvz, folder


FORGERIES = {
    "count_1e12": lambda i: {**i, "count": 10**12},
    "count_1e9": lambda i: {**i, "count": 10**9},
    "count_neg": lambda i: {**i, "count": -5},
    "count_str": lambda i: {**i, "count": "20"},
    "batch_0": lambda i: {**i, "batch": 0},
    "stripped_past_seed": lambda i: {**i, "stripped": i["seed_words"] + 1},
    "latent_bits_99": lambda i: {**i, "latent_bits": 99},
    "names_short": lambda i: {**i, "names": i["names"][:3]},
    "names_int": lambda i: {**i, "names": list(range(len(i["names"])))},
    "names_nul": lambda i: {**i, "names": ["a\0.png", *i["names"][1:]]},
    "names_equal": lambda i: {**i, "names": ["a.png"] * len(i["names"])},
    "names_suffix": lambda i: {**i, "names": [f"{k}.exe" for k in range(len(i["names"]))]},
    "dtype_garbage": lambda i: {**i, "dtype": "zz"},
    "dtype_object": lambda i: {**i, "dtype": "|O"},
    "array_shape": lambda i: {**i, "array_shape": [3, 3]},
    "meta_list": lambda i: [1, 2],
    "meta_nested": lambda i: b"[" * 100_000 + b"]" * 100_000,
    "meta_len": None,  # the metadata length field runs past the file
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_tvz_is_one_line_before_anything_is_allocated(grey8, grey8_tvz, tmp_path, capsys, forgery):
    """F-tvz-forged_*: a count of 10^12 allocated 3.5 GB before a MemoryError; the other forged fields
    were RuntimeError, ValueError, TypeError or RecursionError tracebacks; names all equal wrote 19 of
    20 images over one file; dtype |O wrote a pickled .npy."""
    import resource
    import struct
    import zlib

    tvz, _ = grey8_tvz
    bad = tmp_path / "bad.tvz"
    if forgery == "meta_len":  # a metadata length of 2^31 and no metadata
        from turbovae import compression as c

        data = tvz.read_bytes()
        info, _, weights, pos = c._parse(data)
        shape = info["event_shape"]
        fixed = [info[k] for k in c._NUMBERS] + [len(shape), *shape, 2**31]
        body = c.MAGIC + bytes([c.VERSION, 0]) + weights + b"".join(c._varint(v) for v in fixed)
        bad.write_bytes(body + data[pos:-4] + struct.pack("<I", zlib.crc32(body + data[pos:-4])))
    else:
        forge(tvz, bad, FORGERIES[forgery])
    out = tmp_path / ("out.npy" if forgery in ("dtype_garbage", "dtype_object", "array_shape") else "out")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_error_line(capsys, ["decompress", str(grey8), str(bad), "--out", str(out)], "compressed file")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
    assert not out.exists()


def test_decompress_reads_the_magic_before_the_file(grey8, tmp_path, capsys, monkeypatch):
    """E-2GB-sparse-decompress: a 2 GB file that is no .tvz was read whole before its 4-byte magic was
    checked."""
    big = tmp_path / "big.npz"
    with open(big, "wb") as f:
        f.truncate(2 * 2**30)  # sparse: no disk used
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_error_line(
        capsys, ["decompress", str(grey8), str(big), "--out", str(tmp_path / "x.npy")], "no TVZ header"
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000


def test_a_large_input_is_checked_without_a_float64_copy(grey8):
    """E-2GB-sparse-compress: the input was cast to float64 (8 bytes a value) to be checked; a 2 GB
    uint8 array needed 16 GiB. Reading now holds the uint8 symbols and one chunk at a time."""
    import tracemalloc

    from turbovae.commands.compress import read_images

    vae = turbovae_load(grey8)
    path = grey8.parent / "large.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (500_000, 8, 8), dtype=np.uint8))  # 32 MB
    tracemalloc.start()
    try:
        x, _ = read_images(vae, path, binarize=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.dtype == torch.uint8 and x.shape == (500_000, 1, 8, 8)
    assert peak < 3 * 32_000_000  # the float64 copy alone was 256 MB


def turbovae_load(run: Path, which: str | None = None):
    from turbovae.engine.rundir import load

    return load(run, "cpu", which)


def test_latent_precision_costs_no_tables_and_files_still_decode(grey8, tmp_path, capsys):
    """F-latent-bits-16-user, F-hvae28-compress: the latent tables were lanes x latent dims x 2^bits
    float64 (4.3 GB at 16 bits). The latents are now coded with quantised Gaussians, no tables: 16 bits
    cost no memory and decode."""
    import resource

    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(1).integers(0, 256, (30, 8, 8), dtype=np.uint8))
    tvz, back = tmp_path / "x.tvz", tmp_path / "back.npy"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = ["compress", str(grey8), str(src), "--out", str(tvz), "--latent-bits", "16", "--progress", "off"]
    assert main(argv) == 0
    assert main(["decompress", str(grey8), str(tvz), "--out", str(back)]) == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert np.array_equal(np.load(back), np.load(src))


def test_compress_and_decompress_never_replace_files_without_overwrite(grey8, grey8_tvz, tmp_path, capsys):
    """F-out-is-input, F-out-exists-npy, F-out-exists-tvz, F-out-exists-folder: `compress X.npy --out
    X.npy` replaced its input with the .tvz; an existing .npy, .tvz or same-named PNGs were overwritten."""
    tvz, folder = grey8_tvz
    src = tmp_path / "x.npy"
    np.save(src, np.random.default_rng(1).integers(0, 256, (5, 8, 8), dtype=np.uint8))
    kept = src.read_bytes()
    for extra in ([], ["--overwrite"]):
        one_error_line(capsys, ["compress", str(grey8), str(src), "--out", str(src), *extra], "is the input")
        assert src.read_bytes() == kept
    made = tmp_path / "made.tvz"
    made.write_bytes(b"precious")
    one_error_line(capsys, ["compress", str(grey8), str(src), "--out", str(made)], "--overwrite")
    assert made.read_bytes() == b"precious"
    assert main(["compress", str(grey8), str(src), "--out", str(made), "--overwrite"]) == 0
    existing = tmp_path / "exists.npy"
    existing.write_bytes(b"precious")
    one_error_line(capsys, ["decompress", str(grey8), str(made), "--out", str(existing)], "--overwrite")
    assert existing.read_bytes() == b"precious"
    assert main(["decompress", str(grey8), str(made), "--out", str(existing), "--overwrite"]) == 0
    assert np.array_equal(np.load(existing), np.load(src))
    out = tmp_path / "pngs"
    save_image(out / "03.png", GREY)
    one_error_line(capsys, ["decompress", str(grey8), str(tvz), "--out", str(out)], "03.png", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["03.png"]
    named_npy = tmp_path / "in.npy"  # a .tvz named like an array: never decoded over itself
    named_npy.write_bytes(made.read_bytes())
    argv = ["decompress", str(grey8), str(named_npy), "--out", str(named_npy), "--overwrite"]
    one_error_line(capsys, argv, "would replace the input")
    # decompressing a folder's file into the folder it came from replaces nothing without --overwrite
    one_error_line(capsys, ["decompress", str(grey8), str(tvz), "--out", str(folder)], "--overwrite")


def test_every_command_that_loads_a_run_takes_checkpoint(finished, tmp_path, capsys):
    """F-tvz-sameRunLater (and the issue): eval, sample, encode, export, compress and decompress always
    took the newest checkpoint; `best` (selected on validation) and older steps could not be chosen."""
    run = copy_run(finished, tmp_path, "run")
    kept = sorted(p.stem for p in (run / "checkpoints").glob("*.json"))
    assert kept == ["best", "step-000000020", "step-000000022"]
    for which, name in (("best", "best"), ("step-20", "step-000000020"), ("newest", "step-000000022")):
        out = tmp_path / f"eval-{which}.json"
        assert main(["eval", str(run), "--checkpoint", which, "--iwae-k", "2", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["checkpoint"] == f"{name}.json"
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((3, 8, 8), np.float32))
    assert (
        main(
            ["encode", str(run), "--input", str(x), "--checkpoint", "best", "--out", str(tmp_path / "z.npy")]
        )
        == 0
    )
    assert main(["sample", str(run), "--checkpoint", "step-20", "--out", str(tmp_path / "s.png")]) == 0
    assert (
        main(["export", str(run), "--format", "hub", "--checkpoint", "best", "--out", str(tmp_path / "hub")])
        == 0
    )
    for argv in (
        ["eval", str(run), "--iwae-k", "2", "--out", "-"],
        ["sample", str(run), "--out", str(tmp_path / "t.png")],
    ):
        one_error_line(
            capsys, [*argv, "--checkpoint", "step-7"], "no checkpoint step-7", "best, step-20, step-22"
        )
    one_error_line(
        capsys, ["eval", str(run), "--checkpoint", "worst", "--out", "-"], "newest", "best", "step-N"
    )


def test_a_tvz_finds_its_checkpoint_among_those_the_run_keeps_or_names_it(finished, tmp_path, capsys):
    """F-tvz-sameRunLater: a file compressed, then the run trained on, could no longer be decoded ("not
    this run's checkpoint"), with no way to choose another. decompress now looks for the file's
    checkpoint among the run's (newest, best, step-N), and names it when the run no longer keeps it."""
    run = copy_run(finished, tmp_path, "run")
    x = tmp_path / "x.npy"
    np.save(x, (np.random.default_rng(0).random((10, 8, 8)) > 0.5).astype(np.uint8))
    tvz, back = tmp_path / "x.tvz", tmp_path / "back.npy"
    assert main(["compress", str(run), str(x), "--checkpoint", "step-20", "--out", str(tvz)]) == 0
    assert main(["decompress", str(run), str(tvz), "--out", str(back)]) == 0  # not the newest: found
    assert np.array_equal(np.load(back), np.load(x))
    for suffix in (".json", ".safetensors"):
        (run / "checkpoints" / f"step-000000020{suffix}").unlink()
    one_error_line(capsys, ["decompress", str(run), str(tvz), "--out", str(tmp_path / "b2.npy")],
                   "(step-20)", "no longer keeps", "best, step-22")  # fmt: skip


# ---- 7. sizes checked before anything is allocated ----------------------------------------------------


@pytest.fixture(scope="module")
def hub_folder(finished, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "model"
    assert main(["export", str(finished), "--format", "hub", "--out", str(out)]) == 0
    return out


def edited_hub(hub_folder: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(hub_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


HUB_EDITS = {
    "absurd_shape": lambda c: c.update(event_shape=[1, 100_000, 100_000]),
    "absurd_latent": lambda c: c["config"]["model"].update(latent=10**9),
    "absurd_hidden": lambda c: c["config"]["model"].update(hidden=[10**8]),
    "negative_shape": lambda c: c.update(event_shape=[1, -8, 8]),
    "shape_string": lambda c: c.update(event_shape="8x8"),
    "max_value_nan": lambda c: c.update(max_value=float("nan")),
    "max_value_zero": lambda c: c.update(max_value=0),
    "config_list": lambda c: c.update(config=[1]),
    "no_config": lambda c: c.pop("config"),
    "no_event_shape": lambda c: c.pop("event_shape"),
    "max_value_str": lambda c: c.update(max_value="abc"),
    "data_meta_list": lambda c: c.update(data_meta=[1]),
}


@pytest.mark.parametrize("edit", sorted(HUB_EDITS))
def test_from_pretrained_checks_sizes_before_building(hub_folder, tmp_path, edit):
    """G-from_pretrained-absurd_*: tried to allocate 25 GB to 16 TB; max_value NaN or 0 loaded silently;
    a malformed config was a KeyError or TypeError. One CheckpointError, nothing allocated."""
    import resource

    from turbovae import from_pretrained
    from turbovae.errors import CheckpointError

    folder = edited_hub(hub_folder, tmp_path, HUB_EDITS[edit])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError):
        from_pretrained(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000
    from_pretrained(hub_folder)  # the folder it was copied from loads


def test_from_pretrained_refuses_weights_that_are_not_a_regular_file(hub_folder, tmp_path):
    """G-from_pretrained-weights_devzero: model.safetensors a link to /dev/zero was read until a
    MemoryError at 3.5 GB."""
    from turbovae import from_pretrained
    from turbovae.errors import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(hub_folder, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        from_pretrained(folder)


@pytest.mark.parametrize(
    ("shape", "expected"), [(100_000, "event_shape [1, 100000, 100000]"), (1000, "bytes of weights")]
)
def test_a_forged_event_shape_in_a_checkpoint_is_one_line(finished, tmp_path, capsys, shape, expected):
    """O6-es_big: a checkpoint whose event_shape is [1, 1e5, 1e5], its checksums recomputed, was an
    allocator traceback (16 TB) in eval. A shape within bounds makes a model larger than the weights
    the checkpoint holds: refused before it is built."""
    from turbovae.engine.checkpoint import _canonical

    run = copy_run(finished, tmp_path, "run")
    for path in (run / "checkpoints").glob("*.json"):
        meta = json.loads(path.read_text())
        meta["event_shape"] = [1, shape, shape]
        meta.pop("meta_sha256")
        meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
        path.write_text(json.dumps(meta))
    one_error_line(capsys, ["eval", str(run), "--iwae-k", "2", "--out", "-"], expected)


def test_an_absurd_latent_is_one_line(tmp_path, capsys):
    """O33-latent2p63: --latent 2^63 was a C++ overflow traceback."""
    argv = ["train", *FAST, "--latent", str(2**63), "--out", str(tmp_path / "r")]
    one_error_line(capsys, argv, "model.latent=9223372036854775808", "cannot be built")


@pytest.mark.parametrize("label", [10**9, 2**62])
def test_a_huge_label_value_is_no_huge_table(tmp_path, label):
    """I-train-huge, I-train-int64max: labels 0, 1 and 10^9 made torch.full((10^9 + 1,)), 8 GB; 2^62 an
    overflow. The labels are mapped to class ids by search among the values."""
    from turbovae import conditioning

    labels = torch.tensor([0, label, 1, label, 0])
    assert conditioning.remap(labels, [0, 1, label]).tolist() == [0, 2, 1, 2, 0]
    assert conditioning.remap(torch.tensor([5]), [0, 1, label]).tolist() == [-1]
    rng = np.random.default_rng(0)
    x = (rng.random((120, 8, 8)) > 0.5).astype(np.uint8)
    y = np.array([0, 1, label] * 40, dtype=np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    argv = [
        "train",
        *FAST,
        "--data",
        str(tmp_path / "d.npz"),
        "--condition",
        "label",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["classes"] == 3


def test_nested_class_names_and_binary_label_files_are_one_line(tmp_path, capsys):
    """I-train-classes_nested: X.classes.json of 100,000 nested lists was a RecursionError."""
    x = (np.random.default_rng(0).random((80, 8, 8)) > 0.5).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x.labels.npy", np.arange(80) % 2)
    (tmp_path / "x.classes.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = [
        "train",
        *FAST,
        "--data",
        str(tmp_path / "x.npy"),
        "--condition",
        "label",
        "--out",
        str(tmp_path / "r"),
    ]
    one_error_line(capsys, argv, "x.classes.json", "not a JSON list")


def test_wide_csv_and_binary_files_are_refused_before_they_are_parsed(tmp_path, capsys, monkeypatch):
    """E-100k-columns-csv: a CSV of 100,000 columns did not load in 600 s; E-2GB-sparse-raw.csv/.txt:
    2 GB of NULs as csv: or text: was a MemoryError."""
    from turbovae.data import dataset

    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(20_000)) + "\n" + ",".join(["1"] * 20_000) + "\n")
    one_error_line(
        capsys, ["train", *FAST, "--data", f"csv:{wide}", "--out", str(tmp_path / "a")], "20,000 columns"
    )
    nul = tmp_path / "nul.txt"
    with open(nul, "wb") as f:
        f.truncate(2 * 2**20)
    for data in (f"csv:{nul}", f"text:{nul}"):
        one_error_line(capsys, ["train", *FAST, "--data", data, "--out", str(tmp_path / "b")], "NUL byte")
    big = tmp_path / "big.txt"
    big.write_text("a line of text\n" * 1000)
    monkeypatch.setattr(dataset, "available_memory", lambda: 1000)
    one_error_line(
        capsys, ["train", *FAST, "--data", f"text:{big}", "--out", str(tmp_path / "c")], "of memory to parse"
    )


# ---- 8. tracebacks left ---------------------------------------------------------------------------------


@pytest.mark.parametrize("out", [".", ".."])
def test_export_into_the_working_directory_or_above_is_one_line(finished, tmp_path, capsys, monkeypatch, out):
    """G-out-dot, G-out-dotdot: `export --out .` was ValueError "empty name", `--out ..` OSError EBUSY."""
    work = tmp_path / "cwd" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path / "cwd")
    argv = ["export", str(finished), "--format", "hub", "--out", out, "--overwrite"]
    one_error_line(capsys, argv, "working directory")
    assert snapshot(tmp_path / "cwd") == before and sorted(os.listdir(tmp_path / "cwd")) == ["work"]


@pytest.mark.slow
def test_a_user_error_under_nproc_is_one_line(tmp_path):
    """O36-user-error-nproc: `train --nproc 2` with bad data printed the error line twice, then
    torchrun's ChildFailedError traceback (48 lines, exit 1)."""
    bad = tmp_path / "nan.npz"
    np.savez(bad, x_train=np.full((40, 4), np.nan, np.float32), x_test=np.zeros((5, 4), np.float32))
    cmd = [sys.executable, "-m", "turbovae", "train", "--nproc", "2", "--data", str(bad), "--progress", "off",
           "--out", str(tmp_path / "r")]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("turbovae: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "NaN" in errors[0], lines
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("damage", ["nested", "digits"])
def test_report_skips_a_damaged_metrics_line_with_a_warning(finished, tmp_path, capsys, damage):
    """O39-metrics_nested, O39-metrics_huge_line: a 100,000-deep line in metrics.jsonl was a
    RecursionError in report, a 5,000,000-digit number a ValueError."""
    from turbovae.commands.report import read_metrics

    run = copy_run(finished, tmp_path, "run")
    good = (run / "metrics.jsonl").read_text()
    line = "[" * 100_000 + "]" * 100_000 if damage == "nested" else '{"loss": ' + "9" * 5_000_000 + "}"
    (run / "metrics.jsonl").write_text(line + "\n" + good)
    capsys.readouterr()
    events = read_metrics(run)
    assert len(events) == len(good.splitlines())
    assert "skipped 1 malformed line" in capsys.readouterr().err


def test_a_complex_array_is_refused_not_coded_without_its_imaginary_part(grey8, tmp_path, capsys):
    """F-in-complex-imag: a complex64 array with an imaginary part was coded as its real part (a raw
    ComplexWarning, and the decompressed values differed)."""
    x = tmp_path / "c.npy"
    np.save(x, (np.arange(640).reshape(10, 8, 8) % 200).astype(np.complex64) * (1 + 1j))
    one_error_line(capsys, ["compress", str(grey8), str(x), "--out", str(tmp_path / "c.tvz")], "complex")
    assert not (tmp_path / "c.tvz").exists()


# ---- 9. low: one clear line where a value was silently accepted ------------------------------------------


def test_silent_acceptances_are_one_line(finished, grey8, hub_folder, tmp_path, capsys):
    """O33-beta_inf, I-sample-label-empty, I-sample-label-commas, F-layout-negzero,
    G-from_pretrained-nested_json: --beta inf trained on; `sample --label ''` and `3,,7` were accepted;
    -0.0 came back +0.0 from compress; a config.json nested 100,000 deep was a RecursionError."""
    from turbovae import from_pretrained
    from turbovae.errors import CheckpointError

    one_error_line(
        capsys, ["train", *FAST, "--beta", "inf", "--out", str(tmp_path / "b")], "train.beta must be finite"
    )
    cond = tmp_path / "cond"
    assert main(["train", *FAST, "--condition", "label", "--out", str(cond)]) == 0
    for label in ("", "3,,7"):
        argv = ["sample", str(cond), "--label", label, "--out", str(tmp_path / "s.png")]
        one_error_line(capsys, argv, "empty class")
    negzero = tmp_path / "z.npy"
    np.save(negzero, np.where(np.arange(640).reshape(10, 8, 8) % 7 == 0, -0.0, 3.0))
    one_error_line(capsys, ["compress", str(grey8), str(negzero), "--out", str(tmp_path / "z.tvz")], "-0.0")
    folder = tmp_path / "model"
    shutil.copytree(hub_folder, folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError):
        from_pretrained(folder)


def test_more_low_faults_are_one_clear_line(finished, grey8, grey8_tvz, tmp_path, capsys, monkeypatch):
    """G-export-onnx-cond, G-export-torch-cond: a conditional run's export said to "pass --label or
    --where", which export does not have. H-pack-nospace: "needs 0.00 GiB, but 0.00 GiB free".
    O7-loop_neg: a forged loop.epoch of -5 was accepted. F-kill-decompress-folder: a killed
    decompress left 4 of 1000 images in a folder that looked finished."""
    from turbovae.commands import photos as command  # where decompress writes a folder's images
    from turbovae.data.pack import _size
    from turbovae.engine.checkpoint import _loop_ok

    cond = tmp_path / "cond"
    assert main(["train", *FAST, "--condition", "label", "--out", str(cond)]) == 0
    for fmt in ("onnx", "torch"):
        argv = ["export", str(cond), "--format", fmt, "--out", str(tmp_path / fmt)]
        line = one_error_line(capsys, argv, "conditional run", "--format hub")
        assert "--label" not in line
    assert [_size(n) for n in (512, 3 * 2**20, 5 * 2**30)] == ["512 bytes", "3.0 MiB", "5.00 GiB"]
    assert not _loop_ok({"step": 10, "epoch": -5}) and _loop_ok({"step": 10, "epoch": 2})
    tvz, _ = grey8_tvz
    written = []
    real = command.atomic_write

    def killed(path, data):
        if len(written) == 4:
            raise KeyboardInterrupt  # the process stopped here
        written.append(path)
        real(path, data)

    monkeypatch.setattr(command, "atomic_write", killed)
    out = tmp_path / "back"
    assert main(["decompress", str(grey8), str(tvz), "--out", str(out), "--progress", "off"]) == 130
    assert len(written) == 4 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".back")) == []


def test_a_mirror_that_trickles_is_given_up_keeping_the_partial_file(tmp_path, monkeypatch):
    """O37-drip: a mirror that sent one byte every 2 s was never given up (the only timeout was 60 s
    per read). After TIMEOUT_S, a download slower than MIN_BYTES_PER_S on average stops (TimeoutError,
    an OSError: the next mirror continues the partial file, which is kept)."""
    from turbovae.data import download

    now = [0.0]
    monkeypatch.setattr(download, "_clock", lambda: now[0])

    class Trickle:
        def __init__(self, step: float, size: int) -> None:
            self.step, self.size, self.calls = step, size, 0

        def read1(self, n: int) -> bytes:
            self.calls += 1
            now[0] += self.step
            return b"x" * self.size if self.calls < 1000 else b""

    slow = Trickle(2.0, 1)
    with open(tmp_path / "part", "wb") as out, pytest.raises(TimeoutError, match="given up"):
        download._copy(slow, out, 0, "http://mirror/x", timeout=60)
    assert slow.calls == 31 and (tmp_path / "part").read_bytes() == b"x" * 31
    fast = Trickle(0.1, 20_000)  # 200 kB/s: finishes
    with open(tmp_path / "part2", "wb") as out:
        download._copy(fast, out, 0, "http://mirror/x", timeout=60)
    assert fast.calls == 1000


# ---- 10. absurd counters in a signed checkpoint ---------------------------------------------------------

ABSURD = {
    "batch_in_epoch_1e12": ("batch_in_epoch", 10**12),
    "epoch_1e9": ("epoch", 10**9),
    "lr_scale_nan": ("lr_scale", float("nan")),
    "train_seconds_inf": ("train_seconds", float("inf")),
}


@pytest.mark.parametrize("forgery", sorted(ABSURD))
def test_absurd_counters_in_a_signed_checkpoint_are_one_line(finished, tmp_path, capsys, forgery):
    """Low (audit row 27): a forged loop.batch_in_epoch of 10^12, with its checksum recomputed, was
    accepted (the epoch skipped); step, epoch and the learning rate's scale likewise. Now the position
    must fit the run's epochs of steps, and the numbers be finite: one line naming the checkpoint."""
    from test_faults import remove_checkpoint, rewrite_meta, step_files

    victim = copy_run(finished, tmp_path)
    path = checkpoint.latest(victim)
    key, value = ABSURD[forgery]
    rewrite_meta(path, lambda m: m["loop"].__setitem__(key, value))
    for other in step_files(victim)[:-1]:
        remove_checkpoint(other)
    before = snapshot(victim)
    one_error_line(capsys, ["train", "--resume", str(victim), "--epochs", "2"], path.name)
    assert snapshot(victim) == before


# ---- 11. low: raw warnings, a wrong message, silent truncations -------------------------------------------


def test_images_above_pils_bomb_limit_are_one_warning_line(tmp_path, capsys, monkeypatch):
    """H-pack-bomb2, H-train-bomb2: 144-169 Mpx images printed PIL's raw DecompressionBombWarning (two
    lines each, one a line of PIL's source) in pack and train. Now one turbovae warning line."""
    from PIL import Image

    folder = png_folder(tmp_path / "big", n=3)  # 6x5 = 30 px each, above a limit of 20 (below 2x: no error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    capsys.readouterr()
    assert main(["data", "pack", str(folder), "--out", str(tmp_path / "big.npy")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "decompression-bomb" in line] == err and len(err) == 1, err
    assert "3 image(s)" in err[0] and "6x5" in err[0]


def test_encode_reads_a_one_image_folder(finished, tmp_path):
    """E-encode-folder-1, H-encode-bomb: `encode --input` a folder of one image said 'cannot split 1
    example(s) into train and test'; encoding splits nothing."""
    from PIL import Image

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 17, (8, 8)).astype(np.uint8)).save(folder / "a.png")
    out = tmp_path / "z.npy"
    assert main(["encode", str(finished), "--input", str(folder), "--out", str(out)]) == 0
    assert np.load(out).shape[0] == 1


def test_odd_classes_are_warned_of(tmp_path, capsys):
    """I-train-classes_dups, I-train-unseen_in_train: class names given twice, and a class with test
    examples only, trained without a word (--label NAME reached only the first of two equal names)."""
    from turbovae.data.arrays import classes_path, labels_path

    x = np.random.default_rng(0).integers(0, 2, (200, 4, 4)).astype(np.uint8) * 255
    y = np.arange(200) % 3
    y[180:] = 3  # class 3 only in the last rows, the test split of a .npy
    np.save(tmp_path / "d.npy", x)
    np.save(labels_path(tmp_path / "d.npy"), y)
    classes_path(tmp_path / "d.npy").write_text(json.dumps(["a", "b", "a", "c"]))
    capsys.readouterr()
    argv = [
        "train",
        *FAST[2:],
        "--data",
        str(tmp_path / "d.npy"),
        "--condition",
        "label",
        "data.test_fraction=0.1",
    ]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "class" in line and "warning" in line]
    assert any("given twice" in line and "'a' (0 and 2)" in line for line in err), err
    assert any("no training examples" in line and "c (20 in the test split)" in line for line in err), err


@pytest.mark.slow  # trains a run
def test_fractional_or_out_of_range_class_ids_are_refused(finished, tmp_path, capsys):
    """I-encode-labels_float, I-api-sample-badcond, I-api-sample-floatcond: float labels were truncated
    (0.5 -> class 0) by encode --labels and the API; condition=tensor([-1, 99]) was a RuntimeError."""
    from turbovae import load
    from turbovae.errors import ConfigError

    cond = tmp_path / "cond"
    assert main(["train", *FAST, "--condition", "label", "--out", str(cond)]) == 0
    x = np.zeros((2, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "half.npy", np.array([0.5, 1.0]))
    argv = ["encode", str(cond), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npy")]
    one_error_line(capsys, [*argv, "--labels", str(tmp_path / "half.npy")], "whole numbers", "0.5")
    np.save(tmp_path / "whole.npy", np.array([0.0, 1.0]))  # whole floats are the ids they say
    assert main([*argv, "--labels", str(tmp_path / "whole.npy")]) == 0
    vae = load(cond)
    for bad, message in [
        (torch.tensor([0.5, 1.5]), "integers"),
        (torch.tensor([-1, 3]), "class id -1"),
        (torch.tensor([0, 99]), "class id 99"),
        (-1, "class id -1"),
        (99, "class id 99"),
        (0.5, "0.5"),
    ]:
        with pytest.raises(ConfigError, match=message):
            vae.sample(2, condition=bad)
    for label in ("-1", "99", "0.5"):
        one_error_line(
            capsys, ["sample", str(cond), "--label", label, "--out", str(tmp_path / "s.png")], label
        )


@pytest.mark.slow  # trains a run
def test_resume_accepts_flags_equal_to_the_saved_config(finished, tmp_path, capsys):
    """O27-resume-same-flags: `--resume --precision fp32` was refused although the run was fp32."""
    run = tmp_path / "r"
    assert main(["train", *FAST, "--precision", "fp32", "--checkpoint-every", "10", "--out", str(run)]) == 0
    again = ["train", "--resume", str(run), "--epochs", "2", "--progress", "off"]
    assert main([*again, "--precision", "fp32", "--latent", "2", "train.log_every=5"]) == 0
    one_error_line(capsys, [*again, "--epochs", "3", "--precision", "bf16"], "--precision")
    one_error_line(capsys, [*again, "--epochs", "3", "train.lr=0.5"], "train.lr=0.5")


@pytest.mark.slow  # trains a hierarchical run
def test_torch_export_prints_no_torch_warnings(tmp_path, recwarn):
    """G-export-torch-hvae_dl: torch.export.save's "No complete tensor found in the group!" (with a line
    of torch's source) was printed once per graph of a hierarchical run."""
    run = tmp_path / "hvae"
    assert main(["train", "--data", "digits", "--model", "hvae", "--epochs", "1", "--progress", "off",
                 "eval.iwae_k=2", "train.max_steps=3", "--out", str(run)]) == 0  # fmt: skip
    assert main(["export", str(run), "--format", "torch", "--out", str(tmp_path / "t")]) == 0
    assert [str(w.message) for w in recwarn if "complete tensor" in str(w.message)] == []


@pytest.mark.slow  # MLflow creates its tables (several seconds)
@pytest.mark.parametrize("store", ["sqlite", "databricks"])
def test_mlflow_prints_no_log_lines(tmp_path, capfd, store, monkeypatch):
    """J-mlflow-sqlite-ok, J-mlflow-databricks: MLflow's INFO log lines (creating tables, a new
    experiment) on stderr; and its WARNING about Databricks credentials besides turbovae's warning."""
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) goes here, not the checkout
    uri = f"sqlite:///{tmp_path / 'ml.db'}" if store == "sqlite" else "databricks"
    assert main(["train", *FAST, "--out", str(tmp_path / "r"), f"train.mlflow={uri}"]) == 0
    err = capfd.readouterr().err
    assert not re.search(r"(INFO|WARNING) (mlflow|alembic)", err), err[-2000:]
