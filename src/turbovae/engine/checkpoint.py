"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically. No pickle.

A checkpoint is two files in ``RUN/checkpoints/``: ``step-NNNNNNNNN.safetensors`` and a JSON file of
the same stem, written second, that records the SHA-256 of the tensors. The JSON is the commit
marker: a checkpoint without a matching, verifiable JSON is ignored, so a crash during a write leaves
the previous checkpoint in charge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CheckpointError

FORMAT = "turbovae-checkpoint-1"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2; torch.save's zip container


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(
    run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` and prune all but the ``keep`` newest. Returns the JSON path."""
    path = save_named(run_dir, f"step-{step:09d}", tensors, {**meta, "step": step})
    _prune(path.parent, keep)
    return path


def save_named(run_dir: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/STEM.safetensors`` then ``STEM.json`` (the commit marker), atomically."""
    folder = Path(run_dir) / "checkpoints"
    blob = st_save({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()})
    meta = {
        **meta,
        "format": FORMAT,
        "tensors": f"{stem}.safetensors",
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    try:
        atomic_write(folder / f"{stem}.safetensors", blob)
        atomic_write(folder / f"{stem}.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {folder / stem}: {e.strerror or e}; "
            "the previous checkpoint is intact"
        ) from None
    return folder / f"{stem}.json"


def clean_temporary(run_dir: Path) -> None:
    """Delete half-written temporary files left by a process killed during a checkpoint write."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _prune(folder: Path, keep: int) -> None:
    for old in sorted(folder.glob("step-*.json"))[:-keep]:
        for path in (old, old.with_suffix(".safetensors")):
            with contextlib.suppress(OSError):
                path.unlink()


def _pickle_error(path: Path, head: bytes) -> CheckpointError | None:
    """The error for a file that is a pickle (unpickling runs arbitrary code), else None."""
    if any(head.startswith(m) for m in _PICKLE_MAGIC):
        return CheckpointError(
            f"refusing to load {path}: it is a pickle (torch.save) file, and unpickling can run "
            "arbitrary code; turbovae checkpoints are safetensors + JSON and are never unpickled"
        )
    return None


def _is_safetensors(blob: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(blob) < 10:
        return False
    header = int.from_bytes(blob[:8], "little")
    return 8 + header <= len(blob) and blob[8:9] == b"{"


def load(json_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify one checkpoint: (tensors, meta)."""
    json_path = Path(json_path)
    try:
        raw = json_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {json_path} is unreadable: {e.strerror or e}") from None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _pickle_error(json_path, raw[:4]) or CheckpointError(
            f"checkpoint {json_path} is not JSON: {e}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a turbovae checkpoint (format {FORMAT} expected)")
    tensors_path = json_path.parent / Path(str(meta.get("tensors", ""))).name  # never outside the folder
    try:
        blob = tensors_path.read_bytes()
    except OSError as e:
        raise CheckpointError(
            f"checkpoint tensors {tensors_path} are unreadable: {e.strerror or e}"
        ) from None
    if not _is_safetensors(blob):
        raise _pickle_error(tensors_path, blob[:4]) or CheckpointError(
            f"checkpoint tensors {tensors_path} are not a safetensors file"
        )
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint tensors {tensors_path} are corrupt (SHA-256 does not match)")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"checkpoint tensors {tensors_path} are not valid safetensors: {e}") from None
    return tensors, meta


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint JSON in ``run_dir`` that verifies, or None. Broken ones are skipped."""
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*.json"), reverse=True):
        try:
            load(path)
        except CheckpointError:
            continue
        return path
    return None


# ---- state of the objects a checkpoint restores --------------------------------------------------


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into tensors and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    # a tensor learning rate (the schedule's, on the device) is stored as its value
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    kept: list[tuple[int, str, torch.Tensor, Any]] = []
    for i, (group, current) in enumerate(zip(groups, opt.param_groups, strict=True)):
        for key, value in current.items():  # JSON turned tuples (Adam's betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
            if isinstance(value, torch.Tensor):  # keep the tensor (a compiled step holds it), load its value
                kept.append((i, key, value, group.get(key, value.item())))
    opt.load_state_dict({"state": state, "param_groups": groups})
    for i, key, tensor, saved in kept:
        with torch.no_grad():
            tensor.fill_(float(saved))
        opt.param_groups[i][key] = tensor
