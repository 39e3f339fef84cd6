"""Runs you can trust, wave 3 (issue 33): each test is a fault of the audit in
shared/audits/reliability-faults.tsv (its id in the comment) or of the issue, and what must happen
instead. Each failed on the code before its fix."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from turbovae.cli import main

FAST = ["--data", "digits", "--hidden", "16", "--latent", "2", "--batch-size", "64", "--epochs", "1",
        "--progress", "off", "eval.iwae_k=2", "train.log_every=5"]  # fmt: skip


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
