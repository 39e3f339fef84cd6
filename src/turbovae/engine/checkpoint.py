"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically. No pickle.

A checkpoint is two files in ``RUN/checkpoints/``: ``step-NNNNNNNNN.safetensors`` and a JSON file of
the same stem, written second. The JSON records the SHA-256 of the tensors file and carries its own
SHA-256 (``meta_sha256``, over its canonical form without that field), so the pair is bound and a
one-byte edit of either is refused. The JSON is the commit marker: a checkpoint without a matching,
verifiable JSON is ignored, so a crash during a write leaves the previous checkpoint in charge.

Checkpoints written before the JSON checksum (format ``turbovae-checkpoint-1``) still load: their
tensors are verified, their JSON is only type-checked, and a one-line note says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..errors import CheckpointError, clip
from ..files import atomic_write, replace_file  # noqa: F401 - replace_file: re-exported for the engine

FORMAT = "turbovae-checkpoint-2"
OLD_FORMATS = ("turbovae-checkpoint-1",)  # no JSON checksum: loaded with a note
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol ≥ 2; torch.save's zip container
MAX_JSON_BYTES = 256 << 20  # a checkpoint's JSON is kilobytes (a text run's vocabulary: megabytes)
MAX_JSON_DEPTH = 32  # the deepest a turbovae checkpoint nests is about 6
_STEP_NAME = re.compile(r"^step-(\d+)\.json$")
_CHUNK = 1 << 24
_noted: set[str] = set()


def note(message: str, once: bool = False) -> None:
    """A one-line warning on stderr (``once``: once per message and process)."""
    if not (once and message in _noted):
        _noted.add(message)
        print(f"turbovae: warning: {message}", file=sys.stderr)


# ---- writing ------------------------------------------------------------------------------------------

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}  # fmt: skip


def serialize(tensors: dict[str, torch.Tensor]) -> bytes | bytearray:
    """The safetensors file of ``tensors``, built in one buffer: each tensor is copied once, straight from
    its memory (or its device) into the file's bytes, so writing a checkpoint holds one extra copy of the
    state, not two (``safetensors.torch.save`` holds its buffer and a ``bytes`` copy of it)."""
    if sys.byteorder != "little" or any(t.dtype not in _ST_DTYPES for t in tensors.values()):
        return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    # larger elements first, as safetensors orders them: every tensor starts aligned to its element size
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data start 8-byte aligned
    start = 8 + len(head)
    buf = bytearray(start + offset)
    buf[:8] = len(head).to_bytes(8, "little")
    buf[8:start] = head
    for name in names:
        t = tensors[name].detach()
        begin, end = header[name]["data_offsets"]
        if end > begin:
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=start + begin)
            # a view of the tensor's bytes (non-contiguous tensors are made contiguous, one at a time)
            dst.copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return buf


def _canonical(meta: dict[str, Any]) -> bytes:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def save(
    run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` and prune all but the ``keep`` newest. Returns the JSON path."""
    path = save_named(run_dir, f"step-{step:09d}", tensors, {**meta, "step": step})
    _prune(path.parent, keep, step)
    return path


def save_named(run_dir: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/STEM.safetensors`` then ``STEM.json`` (the commit marker), atomically."""
    folder = Path(run_dir) / "checkpoints"
    blob = serialize(tensors)
    meta = {
        **meta,
        "format": FORMAT,
        "tensors": f"{stem}.safetensors",
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    meta = json.loads(json.dumps(meta))  # as it will be read back (tuples become lists, keys strings)
    meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
    try:
        atomic_write(folder / f"{stem}.safetensors", blob)
        del blob
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


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """The step checkpoints' JSON files in ``folder``, by step number (oldest first)."""
    found = []
    for path in folder.glob("step-*.json"):
        if m := _STEP_NAME.match(path.name):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _remove(json_path: Path) -> None:
    for path in (json_path, json_path.with_suffix(".safetensors")):
        with contextlib.suppress(OSError):
            path.unlink()


def _prune(folder: Path, keep: int, newest: int | None = None) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest`` (the one just written). Files of later
    steps are not this run's (a stray or corrupt file that resume refused): they count for nothing and
    go. Tensors whose JSON never came (a process killed between the two files) go once older than every
    kept checkpoint."""
    steps = step_files(folder)
    later = [p for n, p in steps if newest is not None and n > newest]
    kept = [(n, p) for n, p in steps if newest is None or n <= newest]
    for path in later + [p for _, p in kept[:-keep]]:
        _remove(path)
    oldest = kept[-keep:][0][0] if kept else None
    for tensors in folder.glob("step-*.safetensors"):
        m = re.match(r"^step-(\d+)\.safetensors$", tensors.name)
        stem_json = tensors.with_suffix(".json")
        if m and not stem_json.exists() and oldest is not None and int(m.group(1)) < oldest:
            with contextlib.suppress(OSError):
                tensors.unlink()


# ---- reading ------------------------------------------------------------------------------------------


def _pickle_error(path: Path, head: bytes) -> CheckpointError | None:
    """The error for a file that is a pickle (unpickling runs arbitrary code), else None."""
    if any(head.startswith(m) for m in _PICKLE_MAGIC):
        return CheckpointError(
            f"refusing to load {path}: it is a pickle (torch.save) file, and unpickling can run "
            "arbitrary code; turbovae checkpoints are safetensors + JSON and are never unpickled"
        )
    return None


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (an explicit stack: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _loop_ok(v: Any) -> bool:
    counters = ("step", "epoch", "batch_in_epoch", "examples", "global_batch", "skipped", "rollbacks")
    return (
        isinstance(v, dict)
        and all(_is_int(v.get(k, 0)) and 0 <= v.get(k, 0) < 2**53 for k in counters)  # forged -5, 1e12 ...
        and _is_number(v.get("train_seconds", 0.0))
        and 0 <= v.get("train_seconds", 0.0) < math.inf  # forged inf or NaN: neither compares true
        and _is_number(v.get("lr_scale", 1.0))
        and 0 < v.get("lr_scale", 1.0) <= 1  # halved at each roll-back, never above 1
    )


def _optimizer_ok(v: Any) -> bool:
    if not (isinstance(v, dict) and isinstance(v.get("param_groups"), list)):
        return False
    scalars = v.get("scalars")
    return all(isinstance(g, dict) for g in v["param_groups"]) and (
        isinstance(scalars, dict) and all(isinstance(x, dict) for x in scalars.values())
    )


def _rng_ok(v: Any) -> bool:
    py, np_ = (v.get("python"), v.get("numpy")) if isinstance(v, dict) else (None, None)
    return (
        isinstance(py, list)
        and len(py) == 3
        and isinstance(py[1], list)
        and isinstance(np_, list)
        and (len(np_) == 4)
    )


# the keys the loaders read and the types they need: checked where present (the first three always)
_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "format": ("a string", lambda v: isinstance(v, str)),
    "tensors": (
        "a file name ending in .safetensors",
        lambda v: isinstance(v, str) and re.fullmatch(r"[\w.-]+\.safetensors", v) is not None,
    ),
    "tensors_sha256": ("64 hex digits", _is_hex64),
    "meta_sha256": ("64 hex digits", _is_hex64),
    "step": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "loop": ("a mapping of integer counters and numbers", _loop_ok),
    "config": (
        "a mapping of config sections",
        lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
    ),
    "event_shape": (
        "a list of positive integers",
        lambda v: isinstance(v, list) and 0 < len(v) <= 8 and all(_is_int(x) and x > 0 for x in v),
    ),
    "max_value": ("a positive number", lambda v: _is_number(v) and v > 0),
    "data_meta": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "optimizer": ("a mapping with param_groups (a list of mappings) and scalars (a mapping)", _optimizer_ok),
    "rng": (
        "a mapping with python [version, state, gauss] and numpy [name, pos, has_gauss, cached]",
        _rng_ok,
    ),
    "scaler": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "binarize": ("a string", lambda v: isinstance(v, str)),
}
_REQUIRED = ("format", "tensors", "tensors_sha256")


def _open_regular(path: Path) -> BinaryIO:
    """``open(path, "rb")`` of a regular file only: a FIFO in a checkpoint's place would block the read
    forever (opened non-blocking, then refused), a device would feed it without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder)", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_meta(json_path: Path) -> dict[str, Any]:
    """The checkpoint JSON, parsed and type-checked (not yet checksummed)."""
    try:
        with _open_regular(json_path) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"checkpoint {json_path} is unreadable: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(
            f"checkpoint {json_path} is larger than {MAX_JSON_BYTES >> 20} MiB: not a checkpoint"
        )
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"checkpoint {json_path} nests deeper than any checkpoint does") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _pickle_error(json_path, raw[:4]) or CheckpointError(
            f"checkpoint {json_path} is not JSON: {clip(str(e), 100)}"
        ) from None
    if not isinstance(meta, dict) or (meta.get("format") != FORMAT and meta.get("format") not in OLD_FORMATS):
        raise CheckpointError(f"{json_path} is not a turbovae checkpoint (format {FORMAT} expected)")
    if _depth(meta) > MAX_JSON_DEPTH:
        raise CheckpointError(f"checkpoint {json_path} nests deeper than {MAX_JSON_DEPTH} levels")
    for key, (expected, ok) in _SCHEMA.items():
        if (key in meta and not ok(meta[key])) or (key in _REQUIRED and key not in meta):
            raise CheckpointError(f"checkpoint {json_path}: '{key}' must be {expected}")
    m = _STEP_NAME.match(json_path.name)
    if m and meta.get("step") != int(m.group(1)):
        raise CheckpointError(f"checkpoint {json_path} records step {meta.get('step')}, not its file's step")
    return meta


def _check_sum(json_path: Path, meta: dict[str, Any]) -> None:
    if meta["format"] in OLD_FORMATS:
        note(f"checkpoint {json_path} was written before checkpoints carried a JSON checksum: its tensors "
             "are verified, its JSON only type-checked", once=True)  # fmt: skip
    elif "meta_sha256" not in meta:
        raise CheckpointError(f"checkpoint {json_path} has no checksum (meta_sha256)")
    elif hashlib.sha256(_canonical(meta)).hexdigest() != meta["meta_sha256"]:
        raise CheckpointError(f"checkpoint {json_path} is corrupt or edited (its SHA-256 does not match)")


def read_meta(json_path: Path) -> dict[str, Any]:
    """A checkpoint's JSON, type-checked and checksummed (its tensors not read)."""
    meta = _read_meta(Path(json_path))
    _check_sum(Path(json_path), meta)
    return meta


def verify(json_path: Path) -> dict[str, Any]:
    """Check one checkpoint without loading its tensors: the JSON's types and checksum, the tensors
    file's kind (never a pickle), SHA-256 (read in chunks) and safetensors header. Returns the JSON."""
    json_path = Path(json_path)
    meta = _read_meta(json_path)
    tensors_path = json_path.parent / meta["tensors"]
    try:
        with _open_regular(tensors_path) as f:
            head = f.read(16)
            if not _looks_like_safetensors(head, os.fstat(f.fileno()).st_size):
                raise _pickle_error(tensors_path, head[:4]) or CheckpointError(
                    f"checkpoint tensors {tensors_path} are not a safetensors file"
                )
            _check_sum(json_path, meta)
            digest = hashlib.sha256(head)
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint tensors {tensors_path} are unreadable: {e.strerror or e}"
        ) from None
    if digest.hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint tensors {tensors_path} are corrupt (SHA-256 does not match)")
    try:
        with safe_open(str(tensors_path), framework="pt") as st:  # parses and checks the header only
            st.keys()
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(
            f"checkpoint tensors {tensors_path} are not valid safetensors: {clip(str(e), 100)}"
        ) from None
    return meta


def step_of(json_path: Path) -> int | None:
    """The step number in a step checkpoint's file name (None for other names, such as best.json)."""
    m = _STEP_NAME.match(Path(json_path).name)
    return int(m.group(1)) if m else None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) < 10:
        return False
    header = int.from_bytes(head[:8], "little")
    return 8 + header <= size and head[8:9] == b"{"


def load(json_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify one checkpoint: (tensors, meta)."""
    json_path = Path(json_path)
    meta = verify(json_path)
    tensors_path = json_path.parent / meta["tensors"]
    try:
        with safe_open(str(tensors_path), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:
        raise CheckpointError(
            f"checkpoint tensors {tensors_path} are not valid safetensors: {clip(str(e), 100)}"
        ) from None
    return tensors, meta


def choose(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest step checkpoint of ``run_dir`` that verifies (or None), and the newer ones refused,
    each with the reason (all of them when none verifies)."""
    refused: list[tuple[Path, str]] = []
    for _, path in reversed(step_files(Path(run_dir) / "checkpoints")):
        try:
            verify(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        return path, refused
    return None, refused


CHOICES_HELP = "newest (default) | best (lowest validation NELBO) | step-N (a kept step checkpoint)"


def select(run_dir: Path, which: str | None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``which`` names (``newest`` or None: ``choose``'s; ``best``; ``step-N``), verified,
    and the refused ones; a missing or broken named checkpoint is a CheckpointError naming those kept."""
    if which in (None, "newest"):
        return choose(run_dir)
    folder = Path(run_dir) / "checkpoints"
    m = re.fullmatch(r"step-?0*(\d{1,12})", which)
    if which == "best":
        path = folder / "best.json"
    elif m:
        path = folder / f"step-{int(m.group(1)):09d}.json"
    else:
        raise CheckpointError(f"--checkpoint {which[:80]!r}: expected {CHOICES_HELP}")
    if not path.is_file():
        kept = ", ".join(available(run_dir)) or "none"
        raise CheckpointError(f"{run_dir} has no checkpoint {which} (its checkpoints: {kept})")
    verify(path)
    return path, []


def available(run_dir: Path) -> list[str]:
    """The names ``select`` takes for the checkpoints a run keeps: best, then step-N, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    names = ["best"] if (folder / "best.json").is_file() else []
    return names + [f"step-{step}" for step, _ in step_files(folder)]


def refusals(refused: list[tuple[Path, str]]) -> str:
    """``name: reason; name: reason`` for messages (each reason cut short, the run's path left out)."""
    parts = []
    for path, why in refused:
        why = why.replace(f"{path.parent}/", "").replace(str(path.parent), "checkpoints")
        parts.append(f"{path.name} ({clip(why, 160)})")
    return "; ".join(parts)


def latest(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint JSON in ``run_dir`` that verifies, or None. Broken ones are skipped, and
    when an older checkpoint is used because newer ones are broken, one line on stderr says so (unless
    ``quiet``)."""
    path, refused = choose(run_dir)
    if path is not None and refused and not quiet:
        note(f"skipped {len(refused)} newer checkpoint{'s' if len(refused) > 1 else ''} of {run_dir}: "
              f"{refusals(refused)}; using {path.name}")  # fmt: skip
    return path


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
