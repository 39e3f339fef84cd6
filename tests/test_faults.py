"""Runs you can trust (issue 17, run directories): each test is one fault a hostile user tried, and what
must happen instead of what did. Each failed on the code before the fix."""

import builtins
import contextlib
import csv
import errno
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from turbovae.cli import main
from turbovae.data import download, load_dataset
from turbovae.engine import checkpoint
from turbovae.errors import CheckpointError, DataError

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
    assert len(step_files(out)) == 2
    return out


def copy_run(run: Path, tmp_path: Path, name: str = "victim") -> Path:
    victim = tmp_path / name
    shutil.copytree(run, victim)
    return victim


def step_files(run: Path) -> list[Path]:
    """The step checkpoints' JSON files of a run, oldest first."""
    return sorted((run / "checkpoints").glob("step-*.json"))


def remove_checkpoint(json_path: Path) -> None:
    json_path.unlink()
    json_path.with_suffix(".safetensors").unlink()


def rewrite_meta(json_path: Path, edit) -> None:
    """Edit a checkpoint's JSON and sign it again, as docs/faults.md says (SHA-256 of the canonical JSON
    without meta_sha256): a file whose checksum matches but whose content is wrong."""
    meta = json.loads(json_path.read_text())
    edit(meta)
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    meta["meta_sha256"] = hashlib.sha256(canonical).hexdigest()
    json_path.write_text(json.dumps(meta))


# ---- 1. two runs, one directory -------------------------------------------------------------------------

SLOW = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import turbovae.engine.loop as t

    original = t.make_step

    hold = Path(sys.argv.pop(1))  # while this file exists, no step after the sixth returns

    def make_step(*args, **kwargs):
        step = original(*args, **kwargs)
        count = [0]

        def slow(*a):
            count[0] += 1
            time.sleep(0.1)
            while count[0] > 6 and hold.exists():
                time.sleep(0.1)
            return step(*a)

        return slow

    t.make_step = make_step
    from turbovae.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow  # two training processes, one held until killed
def test_a_second_run_or_resume_of_a_locked_directory_stops_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    hold = tmp_path / "hold"  # the first run cannot finish while the test runs its second ones
    hold.touch()
    argv = [*FAST, "--epochs", "3", "--checkpoint-every", "5"]
    first = subprocess.Popen([sys.executable, str(script), str(hold), "train", *argv, "--out", str(out)],
                             stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not step_files(out) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        config = (out / "config.yaml").read_bytes()
        for second in (["train", *argv, "--latent", "3", "--out", str(out), "--overwrite"],
                       ["train", "--resume", str(out)]):  # fmt: skip
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "turbovae", *second], capture_output=True, text=True,
                                  env=ENV)  # fmt: skip
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert len(lines) == 1 and "in use by process" in lines[0] and str(first.pid) in lines[0], lines
            assert time.time() - t0 < 60
            assert first.poll() is None  # the first run goes on
        assert (out / "config.yaml").read_bytes() == config  # and its files are its own
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    # the lock died with its process: the run is resumed
    proc = subprocess.run([sys.executable, "-m", "turbovae", "train", "--resume", str(out), "--epochs", "1"],
                          capture_output=True, text=True, env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    assert not (out / ".lock").exists()  # released and removed
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("beta: 1.0", "beta: 2.0"))
    one_error_line(capsys, ["train", "--resume", str(out)], "train.beta")  # fails inside fit
    (out / "config.yaml").write_text(config)
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0  # the failed one let go of the lock
    # a run that fails before writing anything leaves no directory behind, nor a lock file in a folder
    one_error_line(
        capsys, ["train", *FAST, "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "a" / "b")]
    )
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    one_error_line(capsys, ["train", *FAST, "--out", str(tmp_path / "mine")], "already exists")
    one_error_line(capsys, ["train", "--resume", str(tmp_path / "mine")], "cannot resume")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---- 2. --resume silently starting over -----------------------------------------------------------------


def test_resume_with_every_checkpoint_corrupt_exits_2_says_why_and_changes_nothing(
    finished, tmp_path, capsys
):
    victim = copy_run(finished, tmp_path)
    names = [p.name for p in step_files(victim)]
    for path in step_files(victim):
        blob = bytearray(path.with_suffix(".safetensors").read_bytes())
        blob[-1] ^= 0xFF
        path.with_suffix(".safetensors").write_bytes(bytes(blob))
    before = snapshot(victim)
    line = one_error_line(capsys, ["train", "--resume", str(victim), "--epochs", "3"], *names)
    assert line.count("SHA-256 does not match") == 2 and "nothing was changed" in line
    assert snapshot(victim) == before  # best.* included


def test_resume_with_a_pickle_as_the_only_checkpoint_says_it_is_a_pickle(finished, tmp_path, capsys):
    victim = copy_run(finished, tmp_path)
    older, newest = step_files(victim)
    remove_checkpoint(older)
    newest.with_suffix(".safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    before = snapshot(victim)
    one_error_line(capsys, ["train", "--resume", str(victim), "--epochs", "3"], "pickle", newest.name)
    assert snapshot(victim) == before


def test_an_older_checkpoint_used_in_place_of_a_broken_newest_is_said_in_one_line(finished, tmp_path, capsys):
    victim = copy_run(finished, tmp_path)
    older, newest = step_files(victim)
    newest.with_suffix(".safetensors").write_bytes(b"garbage")
    for argv in (["eval", str(victim), "--iwae-k", "2", "--out", "-"],
                 ["sample", str(victim), "--out", str(tmp_path / "s.png")]):  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if newest.name in line]
        assert len(notes) == 1 and "using " + older.name in notes[0], notes
    assert main(["train", "--resume", str(victim), "--epochs", "2"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if newest.name in line]
    assert len(notes) == 1 and older.name in notes[0], notes
    assert (victim / "checkpoints" / "refused" / newest.name).is_file()  # moved aside, not deleted


# ---- 3. an edited config.yaml ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("train", "beta", 0.5), "train.beta"),
        (("train", "lr", 0.1), "train.lr"),
        (("data", "name", "other.npz"), "data.name"),  # other data of the same shape
    ],
)
def test_resume_refuses_an_edited_config_naming_the_key(finished, tmp_path, capsys, edit, key):
    import yaml

    victim = copy_run(finished, tmp_path)
    cfg = yaml.safe_load((victim / "config.yaml").read_text())
    section, name, value = edit
    if value == "other.npz":
        rng = np.random.default_rng(0)
        value = str(tmp_path / value)
        np.savez(
            value,
            x_train=rng.random((200, 64), dtype=np.float32),
            x_test=rng.random((40, 64), dtype=np.float32),
        )
    cfg[section][name] = value
    cfg["train"]["epochs"] = 2  # allowed
    (victim / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = snapshot(victim)
    one_error_line(capsys, ["train", "--resume", str(victim)], key, "may change only")
    assert snapshot(victim) == before


def test_resume_allows_the_epochs_and_the_time_limit_to_change_in_config_yaml(finished, tmp_path):
    victim = copy_run(finished, tmp_path)
    text = (victim / "config.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (victim / "config.yaml").write_text(text.replace("time_limit: 0.0", "time_limit: 100.0"))
    assert main(["train", "--resume", str(victim)]) == 0


# ---- 4. checkpoint JSON: checksum, schema, fallback ------------------------------------------------------


def test_a_one_byte_edit_of_the_checkpoint_json_is_refused(finished, tmp_path):
    victim = copy_run(finished, tmp_path)
    path = checkpoint.latest(victim)
    text = path.read_text()
    lr = json.loads(text)["optimizer"]["param_groups"][0]["lr"]
    assert f'"lr": {lr}' in text
    path.write_text(text.replace(f'"lr": {lr}', f'"lr": {lr * 10}', 1))
    with pytest.raises(CheckpointError, match="corrupt or edited"):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.__setitem__("event_shape", None),
        lambda m: m.__setitem__("event_shape", "64"),
        lambda m: m.__setitem__("loop", [1, 2]),
        lambda m: m.__setitem__("optimizer", None),
        lambda m: m.__setitem__("tensors", "../../x.safetensors"),
        lambda m: m.__setitem__("step", "7"),
        lambda m: m["rng"].__setitem__("python", [3, None, None]),
    ],
)
def test_wrong_types_in_a_signed_checkpoint_json_are_refused_cleanly(finished, tmp_path, capsys, edit):
    victim = copy_run(finished, tmp_path)
    path = checkpoint.latest(victim)
    rewrite_meta(path, edit)
    for other in step_files(victim)[:-1]:
        remove_checkpoint(other)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    one_error_line(capsys, ["train", "--resume", str(victim), "--epochs", "2"], path.name)


@pytest.mark.parametrize("text", ["null", "[1, 2]", '"x"', "[" * 200_000 + "]" * 200_000, "{" * 100 + "}"])
def test_a_checkpoint_json_that_is_not_a_mapping_or_nests_deeply_is_refused(tmp_path, text):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step-000000001.json").write_text(text)
    with pytest.raises(CheckpointError):
        checkpoint.load(folder / "step-000000001.json")
    assert checkpoint.latest(tmp_path) is None


def test_one_stray_newest_json_does_not_break_a_valid_run(finished, tmp_path, capsys):
    victim = copy_run(finished, tmp_path)
    (victim / "checkpoints" / "step-999999999.json").write_text("[1, 2]")
    assert main(["eval", str(victim), "--iwae-k", "2", "--out", "-"]) == 0
    assert main(["train", "--resume", str(victim), "--epochs", "2"]) == 0
    assert "step-999999999.json" in capsys.readouterr().err


def test_a_checkpoint_written_before_checksums_loads_with_a_note(finished, tmp_path, capsys):
    victim = copy_run(finished, tmp_path)
    path = checkpoint.latest(victim)
    meta = json.loads(path.read_text())
    meta.pop("meta_sha256", None)
    meta["format"] = "turbovae-checkpoint-1"
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    checkpoint.load(path)
    assert "before checkpoints carried a JSON checksum" in capsys.readouterr().err


# ---- 5. YAML alias bomb, values in messages, non-UTF-8 files ---------------------------------------------


def alias_bomb(levels: int) -> str:
    """A "billion laughs" value under data.name: level i is a list of 9 aliases of level i - 1."""
    parts = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"data:\n  name: [{', '.join(parts)}]\n"


def test_a_yaml_alias_bomb_is_refused_within_a_second(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))  # 9**7 = 4.8 million values (the audit's had 9**9)
    t0 = time.perf_counter()
    line = one_error_line(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")], "aliases")
    assert time.perf_counter() - t0 < 1 and len(line) < 300


def test_error_messages_show_at_most_a_short_piece_of_a_value(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: [" + ", ".join(['"' + "x" * 50 + '"'] * 2000) + "]\n")
    line = one_error_line(
        capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")], "model.hidden"
    )
    assert len(line) < 300
    line = one_error_line(capsys, ["train", "--data", "digits", "train.optimizer=" + "y" * 100_000,
                                   "--out", str(tmp_path / "o")], "train.optimizer")  # fmt: skip
    assert len(line) < 400


def test_files_that_are_not_utf8_give_one_line(finished, tmp_path, capsys):
    bad = b"train:\n  lr: \xff\xfe\n"
    (tmp_path / "c.yaml").write_bytes(bad)
    one_error_line(
        capsys, ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")], "UTF-8"
    )
    victim = copy_run(finished, tmp_path)
    (victim / "config.yaml").write_bytes(bad)
    one_error_line(capsys, ["eval", str(victim)], "UTF-8", "config.yaml")
    one_error_line(capsys, ["train", "--resume", str(victim)], "UTF-8", "config.yaml")
    for name in ("metrics.jsonl", "summary.json"):
        victim = copy_run(finished, tmp_path, name)
        (victim / name).write_bytes(b'{"event": "\xff"}\n')
        one_error_line(capsys, ["report", str(victim)], "UTF-8", name)


# ---- 6. file-system errors: one line, exit 2; atomic writes --------------------------------------------


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


@contextlib.contextmanager
def full_disk_for(*names: str):
    """Writes to files whose name contains one of ``names`` fail with ENOSPC (also through a file
    descriptor, as atomic writes open their temporary file)."""
    real_open = io.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if any(c in mode for c in "wax+") and any(n in str(name) for n in names):
            return _FullDisk(f)
        return f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "open", fake_open)
        mp.setattr(builtins, "open", fake_open)
        yield


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_full_disk_at_the_end_of_a_run_gives_one_line_and_keeps_the_earlier_files(
    finished, tmp_path, capsys
):
    victim = copy_run(finished, tmp_path)
    before = {n: (victim / n).read_bytes() for n in ("summary.json", "samples.png", "reconstructions.png")}
    with full_disk_for("summary.json", "samples.png", "reconstructions.png"):
        one_error_line(
            capsys, ["train", "--resume", str(victim), "--epochs", "2"], "No space left", "samples.png"
        )
    for name, data in before.items():
        assert (victim / name).read_bytes() == data, name  # not a 0-byte file
    assert not list(victim.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_full_disk_while_writing_the_report_keeps_the_earlier_report(finished, tmp_path, capsys):
    victim = copy_run(finished, tmp_path)
    (victim / "report.html").write_text("<html>earlier</html>")
    with full_disk_for("report.html"):
        one_error_line(capsys, ["report", str(victim), "--device", "cpu"], "No space left", "report.html")
    assert (victim / "report.html").read_text() == "<html>earlier</html>"


def test_permission_denied_on_the_output_directory_gives_one_line(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name == "out":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    one_error_line(capsys, ["train", *FAST, "--out", str(tmp_path / "out")], "Permission denied", "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_gives_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_error_line(capsys, ["train", *FAST, "--out", str(ro / "run")], "Permission denied")
    finally:
        ro.chmod(0o755)


# ---- 7. memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", [["--latent", "1000000000"], ["--hidden", "100000000"], ["--latent", "100000000"]]
)
def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys, flag):
    t0 = time.perf_counter()
    one_error_line(
        capsys, ["train", "--data", "digits", *flag, "--out", str(tmp_path / "o")], "GiB", "parameters"
    )
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "o").exists()


MEASURE_SAVE = textwrap.dedent(
    """
    import resource, sys, torch
    from pathlib import Path
    from turbovae.engine import checkpoint
    state = {"model.w": torch.randn(50_000_000), "optim.m": torch.randn(25_000_000)}  # 300 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checkpoint.save(Path(sys.argv[1]), 1, state, {"loop": {"step": 1}})
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_checkpoint_is_written_with_at_most_one_extra_copy_of_the_state(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MEASURE_SAVE, str(tmp_path)], capture_output=True, text=True,
                          env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state_bytes = 75_000_000 * 4
    assert int(proc.stdout.split()[-1]) < 1.3 * state_bytes  # before: a clone and two serialised copies
    tensors, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert tensors["model.w"].numel() == 50_000_000


def test_the_safetensors_written_are_read_by_safetensors_itself(tmp_path):
    from safetensors.torch import load as st_load

    state = {"a": torch.randn(5, 3).t(), "b": torch.arange(7, dtype=torch.uint8), "c": torch.tensor(2.5),
             "d": torch.zeros(0), "e": torch.tensor([True, False]), "f": torch.ones(3, dtype=torch.bfloat16),
             "g": torch.arange(4, dtype=torch.int64)}  # fmt: skip
    loaded = st_load(bytes(checkpoint.serialize(state)))
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


# ---- 8. smaller ------------------------------------------------------------------------------------------


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"model.w": torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))}


def test_invalid_high_numbered_step_files_do_not_count_toward_keep_and_go(tmp_path):
    checkpoint.save(tmp_path, 1, tensors(1), {}, keep=2)
    checkpoint.save(tmp_path, 2, tensors(2), {}, keep=2)
    folder = tmp_path / "checkpoints"
    (folder / "step-000999999.json").write_text("not a checkpoint")
    (folder / "step-000999999.safetensors").write_bytes(b"junk")
    checkpoint.save(tmp_path, 3, tensors(3), {}, keep=2)
    assert [p.name for p in step_files(tmp_path)] == ["step-000000002.json", "step-000000003.json"]
    assert not (folder / "step-000999999.safetensors").exists()


def test_checkpoint_and_run_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path, 1, tensors(), {})
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.with_suffix(".safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = checkpoint.save(tmp_path, 2, tensors(), {})
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_summary_json_holds_null_not_nan(tmp_path, monkeypatch):
    from turbovae.engine import finish

    nan = float("nan")
    monkeypatch.setattr(finish.evaluation, "iwae_nll", lambda *a, **k: {"nll": nan, "stderr": nan, "k": 2})
    out = tmp_path / "run"
    assert main(["train", *FAST, "eval.every_epoch=false", "--out", str(out)]) == 0

    def refuse(name):
        raise ValueError(f"bare {name} in summary.json")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["test_nll_iwae"] is None and summary["test_nll_iwae_stderr"] is None


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey: (H, W); RGB: (H, W, 3)), written by hand: Pillow writes no 16-bit colour."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3)], ids=["grey", "rgb"])
def test_16_bit_pngs_grey_or_colour_follow_one_rule_refused(tmp_path, shape):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        _png16(folder / f"{i:02d}.png", rng.integers(0, 65536, shape))
    with Image.open(folder / "00.png") as im:  # Pillow reads it
        im.load()
    with pytest.raises(DataError, match="16-bit"):
        load_dataset(str(folder))


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``body`` with Range support; records the requests' Range headers."""

    body = b""
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        data = self.body[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TURBOVAE_MIRROR", f"http://127.0.0.1:{server.server_port}")
    _RangeHandler.ranges = []
    yield _RangeHandler
    server.shutdown()


def test_a_killed_downloads_partial_file_is_continued_not_left(tmp_path, monkeypatch, mirror):
    body = os.urandom(300_000)
    mirror.body = body
    name = download.FILES[0]
    monkeypatch.setitem(
        download.SHA256, "mnist", {f: hashlib.sha256(body).hexdigest() for f in download.FILES}
    )
    (tmp_path / f".{name}.part").write_bytes(body[:100_000])  # left by a killed download
    (tmp_path / f".{name}.k9x2.part").write_bytes(body[:5])  # the random name of earlier versions
    download._download_file("mnist", tmp_path / name, timeout=10)
    assert (tmp_path / name).read_bytes() == body
    assert mirror.ranges == ["bytes=100000-"]
    assert not list(tmp_path.glob("*.part"))


def test_downloads_have_a_size_cap(tmp_path, monkeypatch, mirror):
    mirror.body = os.urandom(200_000)
    monkeypatch.setattr(download, "MAX_BYTES", 50_000)
    with pytest.raises(DataError, match="more than the 50,000 bytes"):
        download._download_file("mnist", tmp_path / download.FILES[0], timeout=10)
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / download.FILES[0]).exists()


# ---- 9. small tables ------------------------------------------------------------------------------------


def test_a_table_smaller_than_the_batch_trains_with_one_batch_of_all_its_rows(tmp_path, capsys):
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    path = tmp_path / "diabetes.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*d.feature_names, "target"])
        w.writerows([*row, t] for row, t in zip(d.data.tolist(), d.target.tolist(), strict=True))
    out = tmp_path / "run"
    capsys.readouterr()
    # the tabular preset (batch 500) is chosen for csv data
    assert main(["train", "--data", f"csv:{path}", "--epochs", "2", "--progress", "off", "eval.iwae_k=2",
                 "--out", str(out)]) == 0  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if "one batch" in line]
    assert len(notes) == 1 and "500" in notes[0], notes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2  # one step per epoch
    import yaml

    assert (
        yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == summary["n_train"] < 442
    )
    # other data keep the clear error
    one_error_line(capsys, ["train", *FAST, "--batch-size", "5000", "--out", str(tmp_path / "o")],
                   "fewer than train.batch_size")  # fmt: skip
