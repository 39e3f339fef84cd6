"""The run directory: its rules (never replaced without --overwrite, nor continued without --resume, nor
used by two runs at once), metrics.jsonl, and ``load`` (the trained model of a run directory)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from ..config import Config, from_dict, load_yaml, to_yaml
from ..errors import CheckpointError, ConfigError, clip, shown
from ..vae import VAE
from . import checkpoint
from .setup import build_to_load

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "samples.png",
    "reconstructions.png",
    "samples.txt",
    "reconstructions.txt",
    "interpolations.txt",
    "checkpoints",
)


LOCK_NAME = ".lock"


@dataclass
class _Lock:
    fd: int
    created: list[Path] = field(default_factory=list)  # the folders taking the lock made, deepest first
    provisional: bool = False  # config.yaml written before set-up (check_out_dir): removed if the run fails


_held: dict[Path, _Lock] = {}  # the run directories this process has locked


def _make_dirs(out: Path) -> list[Path]:
    """``mkdir -p out``; the folders it made, deepest first."""
    made, path = [], out
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    out.mkdir(parents=True, exist_ok=True)
    return made


def lock_run(out: Path, resume: bool) -> None:
    """Lock the run directory ``out`` (``out/.lock``, an ``flock``) for this process until ``unlock_run``:
    a second train or resume of it stops at once, naming the process that holds it. The lock dies with
    its process, so a killed run's lock is taken over. Data-parallel runs: rank 0 alone takes it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a run directory is not locked there
        return
    key = out.resolve()
    if key in _held:  # another run of this process (a thread) holds it
        raise CheckpointError(f"run directory {out} is in use by another run of this process")
    if (out.exists() and not out.is_dir()) or (resume and not (out / "config.yaml").is_file()):
        return  # check_out_dir's error follows
    made = _make_dirs(out)
    path = out / LOCK_NAME
    for _ in range(100):  # the file may go between open and flock (its holder removes it on release)
        fd = _open_inside(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            raise CheckpointError(
                f"run directory {out} is in use by {_holder(holder)} (its lock: {path}); wait for that run "
                "to end or stop it, or use another --out"
            ) from None
        except OSError as e:  # a filesystem without locks (ENOLCK, EOPNOTSUPP): run unlocked, and say so
            os.close(fd)
            print(f"turbovae: warning: cannot lock {path} ({e.strerror}); two runs in {out} would clash",
                  file=sys.stderr)  # fmt: skip
            return
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                break
        os.close(fd)
    else:
        raise CheckpointError(f"cannot lock {path}: it keeps being replaced")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held[key] = _Lock(fd, made)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_inside(path: Path, flags: int) -> int:
    """``os.open(path, flags)`` of a run's own file, never through a symbolic link (``O_NOFOLLOW``: a
    link would let the write land outside the run directory) and only a regular file (a FIFO or device
    would block or take the bytes): a CheckpointError naming it otherwise. Non-blocking at open only."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o666)
    except OSError as e:
        if path.is_symlink():  # ELOOP (Linux), EMLINK (FreeBSD) or EFTYPE (macOS): refuse, naming the link
            raise link_error(path) from None
        raise OSError(e.errno, e.strerror, str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(
            f"{path} is not a regular file (a FIFO, device or folder); turbovae writes its own files in a "
            "run directory: remove it, or use another --out"
        )
    os.set_blocking(fd, True)
    return fd


def link_error(path: Path) -> CheckpointError:
    """The error for a run's own file or folder, written in place, that is a symbolic link."""
    try:
        target = f" (to {shown(os.readlink(path), 120)})"
    except OSError:
        target = ""
    return CheckpointError(
        f"{path} is a symbolic link{target}; turbovae writes only inside the run directory, never through "
        "a link: remove the link (or replace it by the file itself), or use another --out"
    )


# the run's files and folders that are written into, appended to or pruned in place (not replaced by a
# rename, which replaces a link rather than following it): none may be a symbolic link
IN_PLACE = (LOCK_NAME, "metrics.jsonl", "checkpoints", "checkpoints/refused")


def check_links(out: Path) -> None:
    """A CheckpointError naming the first of the run's files or folders written in place (IN_PLACE) that
    is a symbolic link: appending through it, or writing and pruning checkpoints in it, would change
    files outside the run directory ``out``."""
    for name in IN_PLACE:
        if (out / name).is_symlink():
            raise link_error(out / name)


def _holder(fields: list[str]) -> str:
    if not fields:
        return "another process"
    pid, host = fields[0], fields[1] if len(fields) > 1 else ""
    where = f" on {shown(host, 40)}" if host and host != socket.gethostname() else ""
    return f"process {shown(pid, 20) if not pid.isdigit() else pid}{where}"


def unlock_run(out: Path) -> None:
    """Release the lock ``lock_run`` took, removing the lock file first (while still holding it: a process
    that opened it meanwhile sees it replaced and opens the new one), so a finished, failed or refused
    run leaves no file behind. The folders taking the lock created are removed again where empty (a run
    that failed before its first file)."""
    lock = _held.pop(out.resolve(), None)
    if lock is None:
        return
    with contextlib.suppress(OSError):
        if lock.provisional and not (out / "metrics.jsonl").exists():  # failed before its start
            (out / "config.yaml").unlink()
        (out / LOCK_NAME).unlink()
        for folder in lock.created:
            folder.rmdir()  # stops (OSError) at the first folder that is not empty
    os.close(lock.fd)


def check_out_dir(out: Path, overwrite: bool, resume: bool, cfg: Config | None = None) -> None:
    """An existing run is never replaced without --overwrite, nor continued without --resume.

    A new run in an empty (or new) directory writes ``cfg`` to config.yaml at once, before its data are
    loaded: a run killed at any moment after this can be continued with --resume (from the start, with
    the same seed). A run that fails before its start removes it again (``unlock_run``)."""
    if resume:
        if not (out / "config.yaml").is_file():
            if out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
                raise CheckpointError(
                    f"cannot resume {out}: it holds no run yet (the run that made it stopped while loading "
                    f"its data, before it wrote config.yaml); start it again with train --out {out}"
                )
            raise CheckpointError(
                f"cannot resume {out}: no config.yaml there (is it a turbovae run directory?)"
            )
        check_links(out)
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace it, "
            f"--resume {out} to continue it, or --out for a new directory"
        )
    lock = _held.get(out.resolve())
    if cfg is not None and lock is not None and not any(p.name != LOCK_NAME for p in out.iterdir()):
        checkpoint.replace_file(out / "config.yaml", to_yaml(cfg).encode())
        lock.provisional = True


def _clear_run(out: Path) -> None:
    """Remove a previous run's files (only those turbovae writes) before an --overwrite run starts."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():  # a link is removed, never what it points to
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as written. ``path`` None: a log that writes
    nothing (the ranks other than 0 of a data-parallel run)."""

    def __init__(self, path: Path | None) -> None:
        self.file: TextIO | None = None
        if path is not None:  # appended to in place: never through a link (_open_inside)
            fd = _open_inside(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self.file = open(fd, "a", buffering=1)  # noqa: SIM115 - close()

    def echo(self, message: str) -> None:
        """A warning on stderr, once per job (from the rank that writes the log)."""
        if self.file is not None:
            print(f"turbovae: warning: {message}", file=sys.stderr)

    def write(self, event: str, **values: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, **values}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def saved_data_meta(out: Path, state_json: Path | None = None) -> dict[str, Any] | None:
    """The Dataset.meta the run's checkpoints recorded (the same in all): a resumed run encodes its
    data with the transforms it was trained with, not refitted ones. ``state_json``: the checkpoint
    chosen (else the newest valid one)."""
    path = state_json or checkpoint.latest(out, quiet=True)
    if path is None:
        return None
    meta = checkpoint.read_meta(path).get("data_meta")
    return meta if isinstance(meta, dict) else None


RESUMABLE_LIMITS = ("train.time_limit", "train.max_steps")  # a limited run continues once one is raised
RESUMABLE = ("train.epochs", *RESUMABLE_LIMITS)  # what a resumed run may change


def _flat(nested: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in nested.items() for k, v in values.items()}


def resume_point(out: Path, cfg: Config) -> Path | None:
    """The checkpoint ``train --resume`` continues from (None: a run stopped before its first one
    starts again), checked before anything is touched: a CheckpointError if every checkpoint is refused
    (each with its reason) or if ``cfg`` differs from the checkpoint's config outside RESUMABLE."""
    chosen, refused = checkpoint.choose(out)
    folder = out / "checkpoints"
    if chosen is None and refused:
        raise CheckpointError(
            f"cannot resume {out}: none of its {len(refused)} step checkpoints is usable, and nothing was "
            f"changed: {checkpoint.refusals(refused)}"
        )
    if chosen is None:
        if (out / "summary.json").is_file():  # a finished run without its checkpoints: not a killed one
            raise CheckpointError(
                f"cannot resume {out}: it has summary.json but no step checkpoint to continue from; "
                "nothing was changed (start over with --overwrite)"
            )
        if (folder / "best.json").is_file():  # killed after an epoch's best.*, before a step checkpoint
            checkpoint.note(
                f"resuming {out} from the start: it was stopped before its first step checkpoint (its "
                "best.* are kept until the run, with the same seed, writes them again)"
            )
        return None
    if refused:
        checkpoint.note(
            f"resuming {out} from {chosen.name}: skipped {checkpoint.refusals(refused)} (moved to "
            f"{folder / 'refused'})"
        )
    saved = checkpoint.read_meta(chosen).get("config")
    try:
        before = _flat(from_dict(saved or {}).to_dict())
    except ConfigError as e:
        raise CheckpointError(f"cannot resume {out}: the config in {chosen.name} is not valid: {e}") from None
    now = _flat(cfg.to_dict())
    changed = [k for k in now if k not in RESUMABLE and now[k] != before.get(k)]
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise CheckpointError(
            f"cannot resume {out}: its checkpoint {chosen.name} does not fit config.yaml: {key} is "
            f"{shown(before.get(key))} in the checkpoint, {shown(now[key])} in config.yaml{more}; a resumed "
            f"run may change only {' and '.join(RESUMABLE)} (undo an edit of config.yaml, or train a new run "
            "with --out)"
        )
    return chosen


def _check_model_and_data(cfg_path: Path, state_json: Path, saved: Any, cfg: Config) -> None:
    """A CheckpointError when config.yaml's model or data sections differ from the checkpoint's config:
    an edited ``data.name`` would evaluate (``eval``), encode or sample with other data or another
    model under the run's name, as an edited config is refused by --resume."""
    if not isinstance(saved, dict):  # (checked by the checkpoint's schema where present)
        return
    try:
        before = _flat(from_dict(saved).to_dict())
    except ConfigError:
        return  # a config from another version: nothing to compare it with
    now = _flat(cfg.to_dict())
    compared = [k for k in now if k.startswith(("data.", "model.")) and k != "data.dir"]  # (dir: a cache)
    changed = [k for k in compared if now[k] != before.get(k)]
    if changed:
        key = changed[0]
        raise CheckpointError(
            f"{cfg_path} does not fit the run's checkpoint {state_json.name}: {key} is "
            f"{shown(before.get(key))} in the checkpoint, {shown(now[key])} in config.yaml; undo the edit "
            "of config.yaml (the model and its data are the checkpoint's)"
        )


def prepare_dir(
    out: Path, cfg: Config, overwrite: bool, resume: bool, start: Path | None = None
) -> Path | None:
    """Prepare the run directory; on resume, the checkpoint to continue from (``start``, from
    ``resume_point``; None: from the start). The checkpoints newer than ``start`` (refused) are moved to
    checkpoints/refused/: they neither count toward train.keep_checkpoints nor shadow the run's own."""
    if resume:
        checkpoint.clean_temporary(out)  # left by a process killed while writing
        if start is not None:
            aside = out / "checkpoints" / "refused"
            for n, path in checkpoint.step_files(out / "checkpoints"):
                if n > (checkpoint.step_of(start) or 0):
                    aside.mkdir(exist_ok=True)
                    for p in (path, path.with_suffix(".safetensors")):
                        if p.exists():
                            os.replace(p, aside / p.name)
        return start
    if overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    # at once (the loop writes it again later): a run killed from here on can be continued with --resume
    checkpoint.replace_file(out / "config.yaml", to_yaml(cfg).encode())
    return None


def json_text(value: Any) -> str:
    """JSON for the run's files: non-finite numbers written as null (JSON has no NaN)."""
    return json.dumps(_finite(value), indent=1, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """``json_text(value)`` written atomically (a full disk leaves the previous file, never an empty one)."""
    checkpoint.replace_file(path, json_text(value).encode())


def data_in_run(spec: str, run_dir: Path) -> str:
    """``spec`` (data.name) with a relative path that names a file inside the run directory made to
    point there, whatever the working directory: a run that holds its own data (the DataFrame API keeps
    a table's rows as ``table.csv``, ``data.name: csv:table.csv``) is read from itself. Other specs
    (a built-in name, a path outside the run) are returned as they are."""
    prefix, sep, rest = spec.partition(":")
    scheme = bool(sep) and len(prefix) > 1 and "/" not in prefix and "\\" not in prefix  # csv:, text: ...
    text = rest if scheme else spec
    if not text or Path(text).is_absolute() or not (run_dir / text).is_file():
        return spec
    return f"{prefix}:{run_dir / text}" if scheme else str(run_dir / text)


def load(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint_name: str | None = None) -> VAE:
    """The trained model of a run directory (newest valid checkpoint, or the one ``checkpoint_name``
    names: ``newest``, ``best``, ``step-N``), in eval mode; ``vae.checkpoint_path`` is its JSON.

    The returned VAE has ``encode(x)``, ``decode(z)``, ``sample(n)``, and carries ``config`` (the run's
    Config) and ``max_value`` (inputs are ``stored_values / max_value``).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a turbovae run directory (no config.yaml)")
    try:
        nested = load_yaml(cfg_path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not UTF-8 text (a bad byte at offset {e.start})") from None
    except (yaml.YAMLError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not valid YAML: {clip(str(e).splitlines()[0])}") from None
    if not isinstance(nested, dict):
        raise CheckpointError(f"{cfg_path} must hold a mapping of config sections")
    cfg = from_dict(nested)
    state_json, refused = checkpoint.select(run_dir, checkpoint_name)
    if state_json is None:
        why = f": {checkpoint.refusals(refused)}" if refused else ""
        raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}{why}")
    if refused:
        checkpoint.note(f"using {state_json.name} of {run_dir}: skipped newer {checkpoint.refusals(refused)}")
    tensors, meta = checkpoint.load(state_json)
    _check_model_and_data(cfg_path, state_json, meta.get("config"), cfg)
    cfg.data.name = data_in_run(cfg.data.name, run_dir)
    if "event_shape" not in meta:
        raise CheckpointError(f"checkpoint {state_json} does not record the data shape (event_shape)")
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    vae = build_to_load(cfg, meta["event_shape"], meta.get("data_meta"), stored, str(state_json))
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    # the weight average (train.ema's, or a schedule-free optimiser's x; saved only by runs that have
    # one) is the model the run evaluated
    weights.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {state_json} does not fit its config: {str(e).splitlines()[0]}"
        ) from None
    vae.config = cfg
    vae.max_value = float(meta.get("max_value", 1.0))
    vae.checkpoint_path = state_json
    vae.checkpoint_sha256 = str(meta.get("tensors_sha256", ""))
    return vae.to(device).eval()
