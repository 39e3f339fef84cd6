"""``turbovae data pack``: a folder of images as one uint8 ``.npy`` array, written once, then memory-mapped
by every run that reads it (``data/arrays.py``) instead of decoding the images each time.

The array is (N, C, H, W) uint8, its rows in a fixed shuffled order (seed 0), so that the last rows a
``.npy``'s test split takes are a random sample of the images, whatever their folders. A folder with
``train/`` and ``test/`` keeps its split: the training images come first (shuffled among themselves),
then the test images, and ``X.split.json`` records the boundary, which the loader takes as the test split
(the held-out images never become training data). When every image lies in a class
sub-folder (``CLASS/IMAGE.png``, or ``train/CLASS/...`` and ``test/CLASS/...``) and there are at least
two classes, ``X.labels.npy`` ((N,) int64, the sorted class names' indices) and ``X.classes.json`` (the
names) go beside ``X.npy``; ``--condition label`` reads them.

Images are decoded one at a time into a memory-mapped file, so packing never holds the images in
memory. Every file is written under a temporary name in the target folder and renamed at the end: a
failure leaves no partial file under the final name and the previous files, if any, untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import classes_path, labels_path, split_path
from .images import class_of, decode_image, folder_files, scan_images

PACK_SEED = 0


@dataclass
class Packed:
    """What ``pack_images`` wrote: the array, its shape, the labels file and class names (or None), and
    the number of training rows of a folder's own train/ + test/ split (None: no split)."""

    path: Path
    shape: tuple[int, int, int, int]
    labels: Path | None
    classes: list[str] | None
    n_train: int | None = None


def _size(n: int) -> str:
    """``30.7 MB``, ``2.15 GiB``, ``512 bytes``: never "0.00 GiB" for a few megabytes."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} bytes"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove_stale(out: Path) -> None:
    """Delete the temporary files of a pack into ``out`` (or its labels) whose process is gone: a pack
    killed mid-write leaves a full-size ``.X.npy.PID.tmp`` that nothing else would remove."""
    for final in (out, labels_path(out), classes_path(out), split_path(out)):
        for tmp in out.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
            pid = tmp.name[len(final.name) + 2 : -len(".tmp")]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:  # gone: its file is ours to remove
                with contextlib.suppress(OSError):
                    tmp.unlink()
            except OSError:  # alive (another user's): a pack at work
                pass


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of the memory-mapped ``path`` now: a disk that fills while the images are
    decoded into the mapping would otherwise kill the process with SIGBUS; here it is ENOSPC, one line."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a file system without it
                return
            raise


def _labels(files: list[Path], root: Path, split: bool) -> tuple[np.ndarray, list[str]] | None:
    classes = [class_of(file, root, split) for file in files]
    names = sorted({c for c in classes if c is not None})
    if None in classes or len(names) < 2:
        return None
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[c] for c in classes if c is not None], dtype=np.int64), names


def pack_images(
    folder: str | Path,
    out: str | Path,
    *,
    resize: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Packed:
    """Pack every image under ``folder`` into ``out`` (a ``.npy``), as the module docstring says.

    Returns:
        What was written.

    Raises:
        ConfigError: ``out`` is not a ``.npy`` path, or exists and ``overwrite`` is not set.
        DataError: No images, an unreadable or unsupported image, mixed sizes without ``resize``, or too
            little free disk space for the array.
    """
    root, out = Path(folder), Path(out)
    if out.suffix.lower() != ".npy":
        raise ConfigError(f"--out {out}: expected a .npy file (the array is memory-mapped when trained on)")
    if out.is_dir():  # (--overwrite replaces a file, never a folder)
        raise ConfigError(f"--out {out} is a folder; expected a .npy file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    files, n_train = folder_files(root)
    height, width, mode = scan_images(files, resize)
    shape = (len(files), 1 if mode == "L" else 3, height, width)
    nbytes = int(np.prod(shape))
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist")
    free = shutil.disk_usage(out.parent).free
    if nbytes > free:
        raise DataError(f"--out {out}: the array needs {_size(nbytes)}, but {out.parent} has "
                        f"{_size(free)} free")  # fmt: skip
    _remove_stale(out)
    rng = np.random.default_rng(PACK_SEED)
    if n_train:  # train/ then test/, each shuffled on its own: the boundary stays where it was
        order = np.concatenate([rng.permutation(n_train), n_train + rng.permutation(len(files) - n_train)])
    else:
        order = rng.permutation(len(files))
    labelled = _labels([files[i] for i in order], root, n_train > 0)
    written: list[tuple[Path, Path]] = []
    try:
        tmp = _tmp(out)
        written.append((tmp, out))
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp)
        for row, i in enumerate(order):
            array[row] = decode_image(files[i], mode, height, width).transpose(2, 0, 1)
            if progress is not None:
                progress(row + 1)
        array.flush()
        del array
        if labelled is not None:
            written.append((_tmp(labels_path(out)), labels_path(out)))
            with open(written[-1][0], "wb") as f:  # (np.save given a name would add .npy to it)
                np.save(f, labelled[0])
            written.append((_tmp(classes_path(out)), classes_path(out)))
            written[-1][0].write_text(json.dumps(labelled[1]) + "\n")
        if n_train:
            written.append((_tmp(split_path(out)), split_path(out)))
            written[-1][0].write_text(json.dumps({"train": n_train, "test": len(files) - n_train}) + "\n")
        for path, _ in written:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException as e:
        for path, _ in written:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(e, OSError) and e.errno is not None:  # name the file asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    for sidecar in (labels_path(out), classes_path(out)):  # an earlier pack's labels must not stay
        if labelled is None and sidecar.exists():
            sidecar.unlink()
    if not n_train and split_path(out).exists():  # nor its split
        split_path(out).unlink()
    for path, final in reversed(written):  # the labels first, the array last
        os.replace(path, final)
    return Packed(out, shape, labels_path(out) if labelled else None, labelled[1] if labelled else None,
                  n_train or None)  # fmt: skip
