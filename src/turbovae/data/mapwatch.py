"""A memory-mapped training file must not change under a run.

A memory-mapped ``.npy`` (``data/arrays.py``) is read as training goes: rewritten in place, the run
would go on with the new bytes; truncated, the next read of a page past its new end kills the process
with SIGBUS. The file is watched through a descriptor opened when it is mapped (so a file replaced by a
rename, or deleted, is no change: the mapping keeps the old one):

- before every batch gathered from it (``gather``), its size and modification time (one ``fstat``, a
  microsecond): a truncated file stops the run before a read can fault;
- at every epoch's end (``check(x, full=True)``), also a checksum of its first 64 KiB (the header and
  the first rows) and of 64 pages spread over the rest (256 KiB read with ``pread``, never through the
  mapping): a rewrite that kept the modification time is found there, unless it changed no sampled page.

A change is a DataError: one line naming the file and what changed; the run stops, its checkpoints are
kept, and ``--resume`` continues it once the file is restored.
"""

from __future__ import annotations

import contextlib
import os
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError

HEAD_BYTES = 64 << 10  # the .npy header and the first rows
PAGES = 64  # sampled pages over the rest of the file
PAGE = 4096


@dataclass
class _Watch:
    path: Path
    fd: int
    size: int
    mtime_ns: int
    digest: int


_watches: dict[int, _Watch] = {}  # by the data pointer of the mapped tensor's storage


def _key(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


def _digest(fd: int, size: int) -> int:
    crc = zlib.crc32(os.pread(fd, min(size, HEAD_BYTES), 0))
    if size > HEAD_BYTES:
        span = size - HEAD_BYTES
        for i in range(PAGES):
            crc = zlib.crc32(os.pread(fd, PAGE, HEAD_BYTES + span * i // PAGES), crc)
    return crc


def watch(path: Path, owner: object, x: torch.Tensor) -> None:
    """Watch ``path``, the file mapped under ``x`` (and every view of it), for as long as ``owner`` (the
    mapped array ``x`` was made from) lives."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # unreadable now that it was mapped: nothing to watch it with
        return
    st = os.fstat(fd)
    key = _key(x)
    _watches[key] = _Watch(Path(path), fd, st.st_size, st.st_mtime_ns, _digest(fd, st.st_size))
    weakref.finalize(owner, _forget, key, fd)


def _forget(key: int, fd: int) -> None:
    watched = _watches.get(key)
    if watched is not None and watched.fd == fd:
        del _watches[key]
    with contextlib.suppress(OSError):
        os.close(fd)


def check(x: torch.Tensor, full: bool = False) -> None:
    """A DataError if the file mapped under ``x`` changed since it was mapped (size or modification time;
    ``full``: also the checksum of its header and sampled pages). Nothing for tensors not mapped."""
    if not _watches:
        return
    w = _watches.get(_key(x))
    if w is None:
        return
    st = os.fstat(w.fd)
    if st.st_size != w.size:
        what = f"its size went from {w.size:,} to {st.st_size:,} bytes"
    elif st.st_mtime_ns != w.mtime_ns:
        what = "it was written to (its modification time changed)"
    elif full and _digest(w.fd, w.size) != w.digest:
        what = "its bytes differ (a checksum of its header and sampled pages)"
    else:
        return
    raise DataError(
        f"{w.path} changed on disk during training ({what}): a memory-mapped file is read as training "
        "goes, so the run stopped rather than go on with other data; its checkpoints are kept: restore "
        "the file and continue with turbovae train --resume, or train on a copy of the file"
    )
