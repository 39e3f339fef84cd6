"""``turbovae compress`` and ``turbovae decompress``: a trained run as a lossless image codec
(bits-back ANS, see turbovae/compression.py and docs/compression.md).

This module is the ``compress`` command (``add_parser``, ``run``); ``DECOMPRESS`` is the
``decompress`` command, an object with the same two functions.

Inputs and outputs: a ``.npy`` file (one array), a ``.npz`` file (its ``x`` array, or its only array),
an image (PNG, BMP, TIFF) or a folder of them (sorted by path, recursively), of any size: cut into
tiles of the run's size and written back, each in its own format, under the same names
(commands/photos.py, streamed a file at a time). Arrays are (N, *event), (N, H, W), (N, H, W, C) or
(N, D) with the run's event shape; their values must be the stored values the run's likelihood has a
mass on: bytes 0..255 for an 8-bit likelihood, 0/1 (or 0/255) for a bernoulli run. The layout, dtype
and names are kept in the file, so decompressing gives back the same array (or images) bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import stat
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import compression
from ..data.arrays import _read
from ..engine import checkpoint
from ..engine.rundir import load
from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.likelihood import nelbo
from ..files import atomic_write
from ..likelihoods import Bernoulli
from ..progress import Progress
from ..vae import VAE
from . import photos
from .options import checkpoint_option
from .photos import LOSSLESS_FORMATS

_CHUNK = 2**22  # elements of an input array checked and converted at a time


# ---- reading ----------------------------------------------------------------------------------------


def _check_fits(need: int, what: str) -> None:
    free = compression._available_bytes()
    if free is not None and need > free:
        raise DataError(
            f"{what} need {need / 2**30:,.1f} GiB of memory to compress, but {free / 2**30:,.1f} GiB are "
            "available: compress them in parts"
        )


def _read_array(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    arrays = _read(path, mmap=path.suffix.lower() == ".npy")  # a large .npy is read as it is checked
    if len(arrays) == 1:
        ((key, x),) = arrays.items()
    elif "x" in arrays:
        key, x = "x", arrays["x"]
    else:
        raise DataError(
            f"{path}: holds arrays {', '.join(sorted(arrays))}; expected one array, or one named x"
        )
    if x.dtype.kind not in "biuf" or x.ndim < 2:
        what = "complex values are not stored image values" if x.dtype.kind == "c" else "expected numeric"
        raise DataError(f"{path}: has shape {x.shape} and dtype {x.dtype}; {what} (N, ...) images")
    return x, {"source": path.suffix.lower()[1:], "key": key}


def _value_summary(x: np.ndarray, where: str) -> tuple[float, float, bool, bool]:
    """(lowest, highest, all 0/1, all 0/255) of whole-number values, a chunk at a time (no float64 copy
    of the whole input); fractions, NaN and infinities are refused."""
    low, high, bits, bytes255 = math.inf, -math.inf, True, True
    flat = x.reshape(-1)
    for i in range(0, len(flat), _CHUNK):
        c = np.asarray(flat[i : i + _CHUNK])
        if c.dtype.kind == "f" and (not np.isfinite(c).all() or not np.array_equal(c, np.round(c))):
            raise DataError(f"{where}: the values must be whole numbers (stored image values), got fractions")
        if c.dtype.kind == "f" and np.signbit(c[c == 0]).any():
            raise DataError(
                f"{where}: holds -0.0, whose sign the codec would not keep (it would come back 0.0); "
                "add 0.0 to the array first (x + 0.0 turns -0.0 into 0.0)"
            )
        if c.size:
            low, high = min(low, float(c.min())), max(high, float(c.max()))
            if bits or bytes255:
                zero = c == 0
                bits = bits and bool((zero | (c == 1)).all())
                bytes255 = bytes255 and bool((zero | (c == 255)).all())
    return low, high, bits, bytes255


def _symbols(x: np.ndarray, convert: Any) -> np.ndarray:
    """``convert`` applied a chunk at a time, into one uint8 array of x's shape."""
    out = np.empty(x.shape, dtype=np.uint8)
    flat, dest = x.reshape(-1), out.reshape(-1)
    for i in range(0, len(flat), _CHUNK):
        dest[i : i + _CHUNK] = convert(np.asarray(flat[i : i + _CHUNK]))
    return out


def _to_event(x: np.ndarray, event: tuple[int, ...], where: str) -> tuple[np.ndarray, bool]:
    """(x as (N, *event), whether it was channels-last)."""
    if tuple(x.shape[1:]) == event:
        return x, False
    if x.ndim == 4 and len(event) == 3 and tuple(x.shape[1:]) == (event[1], event[2], event[0]):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), True
    if math.prod(x.shape[1:]) == math.prod(event) and (x.ndim == 2 or x.shape[-2:] == event[-2:]):
        return x.reshape(len(x), *event), False
    raise DataError(f"{where}: images of shape {tuple(x.shape[1:])}, but the run's model takes {event}")


def binarize_threshold(vae: VAE, where: str) -> float:
    """The value from which --binarize makes a 1: half the largest value of the data the run was trained
    on (``max_value``; training drew x ~ Bernoulli(value / max_value), whose likelier outcome this is).
    A run that was not binarised (trained on 0/1 data) is refused."""
    cfg = getattr(vae, "config", None)
    mode = getattr(getattr(cfg, "data", None), "binarize", "auto")
    if mode == "none" or vae.max_value <= 1:
        raise DataError(
            f"{where}: --binarize thresholds images as the run binarised its training data, but this run "
            "was trained on binary (0/1) data: give it 0/1 (or 0/255) images"
        )
    return vae.max_value / 2


def read_photos(vae: VAE, path: Path) -> tuple[photos.TileSource, dict[str, Any]]:
    """The tiles of an image file or of a folder of images, of any size (read as they are coded)."""
    event = tuple(vae.event_shape)
    if len(event) != 3 or event[0] not in (1, 3):
        raise DataError(f"{path}: images, but this run's model takes {event}: compress arrays (.npy, .npz)")
    files = photos.image_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no PNG, BMP or TIFF images in this folder")
    source = photos.TileSource(files, event, type(vae.likelihood) is Bernoulli)
    return source, source.meta(path if path.is_dir() else None)


def read_images(vae: VAE, path: str | Path, binarize: bool) -> tuple[Any, dict[str, Any]]:
    """The images of ``path`` as the symbols the run codes (uint8 (N, *event): bytes, or bits; for image
    files, a ``TileSource`` of their tiles), and the layout to write them back in."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in photos.IMAGE_SUFFIXES:
        if not path.exists():
            raise DataError(f"{path}: no such file")
        return read_photos(vae, path)
    if path.suffix.lower() in (".npy", ".npz"):
        x, meta = _read_array(path)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file, a PNG/BMP/TIFF image or a folder of them")
    if len(x) == 0:
        raise DataError(f"{path}: holds no images")
    event = tuple(vae.event_shape)
    _to_event(x[:0], event, str(path))  # the shape is refused before the values are read
    _check_fits(len(x) * math.prod(event) * 2, f"{len(x)} images of {event}")
    meta.update(array_shape=list(x.shape), dtype=x.dtype.str)
    low, high, bits, bytes255 = _value_summary(x, str(path))
    binary = type(vae.likelihood) is Bernoulli
    if binary:
        if bits:
            scale = 1
        elif bytes255:
            scale = 255
        elif binarize:
            threshold = binarize_threshold(vae, str(path))
            if low < 0 or high > vae.max_value:
                raise DataError(
                    f"{path}: --binarize thresholds at half of the run's largest training value "
                    f"{vae.max_value:g}, the values are in [{low:g}, {high:g}], not [0, {vae.max_value:g}]"
                )
            meta["binarized"] = True
            meta["scale"] = 1
            symbols = _symbols(x, lambda c: c >= threshold)
            x = None  # type: ignore[assignment]
        else:
            raise DataError(
                f"{path}: this run's likelihood is bernoulli, which codes binary images (values 0/1 or "
                f"0/255), but the images have values in [{low:g}, {high:g}]: pass --binarize to threshold "
                f"them at half of the run's largest training value {vae.max_value:g} (the file then holds "
                "the binarised images)"
            )
        if x is not None:
            meta["scale"] = scale
            symbols = _symbols(x, lambda c: c // scale if scale > 1 else c)
    else:
        if low < 0 or high > 255:
            raise DataError(
                f"{path}: this run's likelihood codes 8-bit images (values 0..255), got [{low:g}, {high:g}]"
            )
        symbols = _symbols(x, lambda c: c)
    del x
    symbols, meta["channels_last"] = _to_event(symbols, event, str(path))
    return torch.from_numpy(symbols), meta


# ---- writing ----------------------------------------------------------------------------------------


def _targets(info: dict[str, Any], count: int, out: Path) -> list[Path]:
    """The files a folder's images are written to (names checked by ``compression.check_info``)."""
    width = len(str(count - 1))
    names = info.get("names") or [f"{i:0{max(width, 6)}d}.png" for i in range(count)]
    if info.get("source") == "image" and out.suffix.lower() in LOSSLESS_FORMATS:
        return [out]
    for name in names:
        if Path(name).suffix.lower() not in LOSSLESS_FORMATS:
            raise compression.CompressionError(
                f"compressed file is corrupt: the image name {name[:80]!r} is not a .png, .bmp or .tif file"
            )
    return [out / name for name in names]


def check_out(info: dict[str, Any], out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before anything is decoded or written, an --out that would replace a file without
    --overwrite, or that is one of ``inputs`` (the compressed file, the run's files) with it."""
    targets = [out] if out.suffix.lower() in (".npy", ".npz") else _targets(info, int(info["count"]), out)
    if targets != [out] and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder (use FILE.npy or FILE.npz for arrays)")
    if targets == [out] and out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; name a FILE.npy or FILE.npz (or IMAGE.png for one image)"
        )
    protected = {p.resolve() for p in inputs if p.exists()}
    for target in targets:
        if target.resolve() in protected:
            raise ConfigError(f"--out {out} would replace the input {target}; write somewhere else")
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ConfigError(f"--out: {existing[0]}{more} already exists; pass --overwrite to replace it")


def write_images(x: torch.Tensor, info: dict[str, Any], out: Path) -> None:
    """Write decoded symbols (N, *event) uint8 back as the array ``info`` recorded (FILE.npy/.npz)."""
    values = x.numpy()
    if info.get("values") == "binary":
        values = values * np.uint8(info.get("scale", 1))
    if info.get("source") in ("folder", "image"):  # images of the tile's size: (N, H, W) grey or (N, H, W, C)
        if any(list(size) != list(values.shape[2:]) for size in info.get("sizes", [])):
            raise DataError("the images have other sizes than the run's tiles: decompress them to a folder")
        arr = values[:, 0] if values.shape[1] == 1 else values.transpose(0, 2, 3, 1)
    else:
        shape = info.get("array_shape", list(values.shape))
        if info.get("channels_last"):
            values = values.transpose(0, 2, 3, 1)
        arr = values.reshape(shape).astype(np.dtype(info.get("dtype", "|u1")))
    buf = io.BytesIO()
    if out.suffix.lower() == ".npy":
        np.save(buf, arr)
    else:
        arrays: dict[str, Any] = {str(info.get("key", "x")): arr}
        np.savez_compressed(buf, **arrays)
    atomic_write(out, buf.getvalue())


def image_layout(info: dict[str, Any]) -> dict[str, Any]:
    """The file's images as names and sizes (arrays of images: one image a tile, numbered names)."""
    event = info["event_shape"]
    if len(event) != 3 or event[0] not in (1, 3):
        raise ConfigError(f"images of shape {tuple(event)} cannot be written as PNG: use --out FILE.npy")
    if info.get("source") in ("folder", "image"):
        photos.check_layout(info)
        return info
    count = int(info["count"])
    names = [p.name for p in _targets(info, count, Path())]
    return {**info, "sizes": [list(event[1:])] * count, "names": names}


# ---- the commands -----------------------------------------------------------------------------------


def _nelbo_bits_per_dim(vae: VAE, x: Any, binary: bool) -> float:
    """The model's NELBO on the images (a tensor, or a TileSource read again a chunk at a time)."""
    gen = torch.Generator().manual_seed(0)
    nats, chunk = 0.0, 4096
    for start in range(0, len(x), chunk):
        part = x[start : min(len(x), start + chunk)]
        xf = part.float() if binary else part.float() / 255.0
        nats += nelbo(vae, xf, lambda raw: raw, batch_size=256, generator=gen)["nelbo"] * len(part)
    return nats / (len(x) * math.prod(vae.event_shape) * math.log(2.0))


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="compress images losslessly with a trained run (bits-back ANS)",
        description="Compress images losslessly with the run's model: bits-back coding with ANS "
        "(BB-ANS). The rate approaches the model's NELBO in bits/dim. Runs on the CPU.",
    )
    c.add_argument("run_dir")
    c.add_argument("input", help="FILE.npy or FILE.npz of the run's image size, or an IMAGE (PNG, BMP, TIFF) "
                   "or a FOLDER of images of any size, coded in tiles of the run's size")  # fmt: skip
    c.add_argument("--out", required=True, help="the compressed file, FILE.tvz")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    checkpoint_option(c)
    c.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    c.add_argument("--progress", choices=("auto", "off"), default="auto", help="progress lines")
    c.add_argument(
        "--batch",
        type=int,
        default=compression.DEFAULT_BATCH,
        help="the most images coded in one step, the networks' batch (default "
        f"{compression.DEFAULT_BATCH}); the steps grow 1, 2, 4, ... up to it on one ANS stack",
    )
    c.add_argument(
        "--latent-bits",
        type=int,
        default=compression.DEFAULT_LATENT_BITS,
        help=f"2^B bins over [-8, 8] per latent dim (default {compression.DEFAULT_LATENT_BITS})",
    )
    c.add_argument(
        "--binarize",
        action="store_true",
        help="bernoulli runs trained on binarised data: threshold the images at half the run's largest "
        "training value (the file holds the binarised images)",
    )


def _progress(args: argparse.Namespace, total: int, desc: str) -> Progress:
    return Progress(total=total, desc=desc, unit="images", enabled=args.progress != "off")


def _counter(bar: Progress, bytes_per_image: int) -> Any:
    start = time.perf_counter()

    def update(n: int) -> None:
        rate = (bar.n + n) / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(images_per_s=f"{rate:,.1f}", mb_per_s=f"{rate * bytes_per_image / 1e6:,.2f}")
        bar.update(n)

    return update


def _checkpoint_name(path: Path | None) -> str | None:
    if path is None:
        return None
    step = checkpoint.step_of(path)
    return f"step-{step}" if step is not None else path.stem


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    source = Path(args.input)
    if out.exists() or out.is_symlink():
        if source.exists() and out.resolve() == source.resolve():
            raise ConfigError(f"--out {out} is the input: write the compressed file somewhere else")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; name a FILE.tvz")
        if not args.overwrite:
            raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    vae = load(args.run_dir, "cpu", args.checkpoint)
    compression.check_model(vae)
    ckpt = bytes.fromhex(vae.checkpoint_sha256) if vae.checkpoint_sha256 else None
    x, meta = read_images(vae, args.input, args.binarize)
    meta["checkpoint"] = _checkpoint_name(vae.checkpoint_path)
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    with _progress(args, len(x), "compress") as bar:
        data = compression.compress(
            vae, x, batch=args.batch, latent_bits=args.latent_bits, checkpoint=ckpt, meta=meta, stats=stats,
            progress=_counter(bar, math.prod(vae.event_shape)),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    atomic_write(out, data)
    dims = len(x) * math.prod(vae.event_shape)
    report = {
        "images": len(x),
        "files": len(meta.get("names", [])) or None,
        "bytes": len(data),
        "bits_per_dim": 8 * len(data) / dims,
        "net_bits_per_dim": stats["net_bits"] / dims,
        "initial_bits": stats["initial_bits"],
        "header_bytes": stats["header_bytes"],
        "nelbo_bits_per_dim": _nelbo_bits_per_dim(vae, x, compression.is_binary(vae)),
        "seconds": seconds,
        "images_per_second": len(x) / seconds,
        "batch": stats["batch"],
        "latent_bits": stats["latent_bits"],
        "checkpoint": meta["checkpoint"],
        "out": str(args.out),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['images']} images -> {args.out}: {report['bytes']} bytes, "
            f"{report['bits_per_dim']:.4f} bits/dim ({report['net_bits_per_dim']:.4f} without the "
            f"{report['initial_bits']} initial bits and the header; the model's NELBO "
            f"{report['nelbo_bits_per_dim']:.4f}), {seconds:.1f} s, "
            f"{report['images_per_second']:.0f} images/s",
            file=sys.stderr,
        )
    return 0


def _add_decompress_parser(sub: Any) -> None:
    d = sub.add_parser(
        "decompress",
        help="decompress a .tvz file written by turbovae compress (with the same run)",
        description="Decode a file written by `turbovae compress` with the same run: the images come back "
        "bit for bit, as the array or the images they were read from. The run's checkpoint the file was "
        "made with is found among those the run keeps (newest, best, step-N).",
    )
    d.add_argument("run_dir")
    d.add_argument("file", help="FILE.tvz")
    d.add_argument("--out", required=True, help="FILE.npy, FILE.npz, a folder for the images, or IMAGE.png "
                   "for a file made from one image")  # fmt: skip
    d.add_argument("--overwrite", action="store_true", help="replace files that exist under --out")
    checkpoint_option(d)
    d.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    d.add_argument("--progress", choices=("auto", "off"), default="auto", help="progress lines")


def _read_tvz(path: Path) -> bytes:
    """The bytes of a .tvz file, its magic read first (a large file of another kind is not read)."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DataError(f"{path}: not a regular file")
            if f.read(len(compression.MAGIC)) != compression.MAGIC:
                raise compression.CompressionError(
                    f"{path}: not a turbovae compressed file (.tvz): no TVZ header"
                )
            return compression.MAGIC + f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None


def _checkpoint_of(run_dir: Path, sha: bytes, recorded: Any) -> str | None:
    """The checkpoint of ``run_dir`` whose tensors have SHA-256 ``sha`` (newest first, then best, then
    the other kept steps), as ``--checkpoint`` names it; a WrongModelError naming the file's checkpoint
    when the run no longer keeps it."""
    newest, _ = checkpoint.choose(run_dir)
    folder = run_dir / "checkpoints"
    candidates = [newest, folder / "best.json", *(p for _, p in reversed(checkpoint.step_files(folder)))]
    for path in candidates:
        if path is None or not path.is_file():
            continue
        try:
            meta = checkpoint.read_meta(path)
        except CheckpointError:
            continue
        if str(meta.get("tensors_sha256", "")).startswith(sha.hex()):
            return "newest" if path == newest else _checkpoint_name(path)
    named = f" ({recorded[:40]})" if isinstance(recorded, str) else ""
    kept = ", ".join(checkpoint.available(run_dir)) or "none"
    raise compression.WrongModelError(
        f"the file was compressed with checkpoint {sha.hex()[:12]}…{named}, which {run_dir} no longer keeps "
        f"(its checkpoints: {kept}): decompress it with a copy of the run that has it"
    )


def _decode(args: argparse.Namespace, vae: VAE, data: bytes, info: dict[str, Any], out: Path) -> int:
    """Decode into ``out`` (images streamed to their files, or one array); the number of images."""
    ckpt = bytes.fromhex(vae.checkpoint_sha256) if vae.checkpoint_sha256 else None
    with _progress(args, int(info["count"]), "decompress") as bar:
        update = _counter(bar, math.prod(vae.event_shape))
        if out.suffix.lower() in (".npy", ".npz"):
            x = compression.decompress(vae, data, checkpoint=ckpt, progress=update)
            assert x is not None
            write_images(x, info, out)
            return len(x)
        sink = photos.TileSink(info, out, _targets(info, len(info["names"]), out))
        try:
            compression.decompress(vae, data, checkpoint=ckpt, progress=update, sink=sink)
            sink.finish()
        finally:
            sink.discard()
        return len(info["names"])


def _run_decompress(args: argparse.Namespace) -> int:
    path, out, run_dir = Path(args.file), Path(args.out), Path(args.run_dir)
    data = _read_tvz(path)
    info, sha, _ = compression.read_header(data)  # a corrupt file is refused before the model is loaded
    if out.suffix.lower() not in (".npy", ".npz"):
        info = image_layout(info)
    check_out(info, out, args.overwrite, inputs=(path, run_dir))
    which = args.checkpoint
    if which is None and any(sha):
        which = _checkpoint_of(run_dir, sha, info.get("checkpoint"))
    vae = load(run_dir, "cpu", which)
    start = time.perf_counter()
    count = _decode(args, vae, data, info, out)
    seconds = time.perf_counter() - start
    report = {"images": count, "bytes": len(data), "seconds": seconds, "checkpoint": which or "newest",
              "images_per_second": count / seconds, "out": str(args.out)}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{count} images -> {args.out}, {seconds:.1f} s, {count / seconds:.0f} images/s",
              file=sys.stderr)  # fmt: skip
    return 0


# a module object like the other commands' (cli.COMMANDS maps names to modules)
DECOMPRESS = types.ModuleType(f"{__name__}.decompress", "``turbovae decompress``")
DECOMPRESS.__dict__.update(add_parser=_add_decompress_parser, run=_run_decompress)
