"""Files written atomically: a temporary file in the same folder, fsynced, then renamed over the target.

A plain helper at the bottom of the package, so that every layer may write files this way: checkpoints
(``engine/checkpoint.py``), pictures (``viz/``), reports and commands' outputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask sets it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced,
    given the permissions the umask allows (as ``open`` would), then renamed over ``path``. A failed
    write (disk full) leaves the previous file, never a truncated one.

    Raises OSError with ``filename`` = ``path`` (not the temporary file's name)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp creates 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write one file atomically (``replace_file``): the name the checkpoint writer calls."""
    replace_file(path, data)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
