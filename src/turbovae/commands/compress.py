"""``turbovae compress`` and ``turbovae decompress``: a trained run as a lossless image codec
(bits-back ANS, see turbovae/compression.py and docs/compression.md).

This module is the ``compress`` command (``add_parser``, ``run``); ``DECOMPRESS`` is the
``decompress`` command, an object with the same two functions.

Inputs and outputs: a ``.npy`` file (one array), a ``.npz`` file (its ``x`` array, or its only array)
or a folder of PNG/JPEG images (sorted by path, recursively; written back as PNG under the same
names). Arrays are (N, *event), (N, H, W), (N, H, W, C) or (N, D) with the run's event shape;
their values must be the stored values the run's likelihood has a mass on: bytes 0..255 for an 8-bit
likelihood, 0/1 (or 0/255) for a bernoulli run. The layout, dtype and names are kept in the file, so
decompressing gives back the same array (or images) bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import compression
from ..data.arrays import _read
from ..engine.rundir import load
from ..errors import ConfigError, DataError
from ..evaluation.likelihood import nelbo
from ..files import atomic_write
from ..likelihoods import Bernoulli
from ..vae import VAE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---- reading ----------------------------------------------------------------------------------------


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_folder(vae: VAE, root: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image

    files = _image_files(root)
    if not files:
        raise DataError(f"{root}: no PNG/JPEG images in this folder")
    channels = vae.event_shape[0] if len(vae.event_shape) == 3 else 0
    if channels not in (1, 3):
        raise DataError(f"{root}: a folder of images, but this run's model takes {vae.event_shape}")
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("L" if channels == 1 else "RGB")))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable image ({e})") from None
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{root}: images of different sizes {sorted(shapes)[:2]}; the run takes one size")
    names = [str(p.relative_to(root).with_suffix(".png")) for p in files]
    return np.stack(images), {"source": "folder", "names": names}


def _read_array(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    arrays = _read(path)
    if len(arrays) == 1:
        ((key, x),) = arrays.items()
    elif "x" in arrays:
        key, x = "x", arrays["x"]
    else:
        raise DataError(
            f"{path}: holds arrays {', '.join(sorted(arrays))}; expected one array, or one named x"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.ndim < 2:
        raise DataError(f"{path}: has shape {x.shape} and dtype {x.dtype}, expected numeric (N, ...) images")
    return x, {"source": path.suffix.lower()[1:], "key": key}


def _to_event(x: np.ndarray, event: tuple[int, ...], where: str) -> tuple[np.ndarray, bool]:
    """(x as (N, *event), whether it was channels-last)."""
    if tuple(x.shape[1:]) == event:
        return x, False
    if x.ndim == 4 and len(event) == 3 and tuple(x.shape[1:]) == (event[1], event[2], event[0]):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), True
    if math.prod(x.shape[1:]) == math.prod(event) and (x.ndim == 2 or x.shape[-2:] == event[-2:]):
        return x.reshape(len(x), *event), False
    raise DataError(f"{where}: images of shape {tuple(x.shape[1:])}, but the run's model takes {event}")


def read_images(vae: VAE, path: str | Path, binarize: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The images of ``path`` as the symbols the run codes (uint8 (N, *event): bytes, or bits), and the
    layout to write them back in."""
    path = Path(path)
    if path.is_dir():
        x, meta = _read_folder(vae, path)
    elif path.suffix.lower() in (".npy", ".npz"):
        x, meta = _read_array(path)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file or a folder of PNG/JPEG images")
    if len(x) == 0:
        raise DataError(f"{path}: holds no images")
    meta.update(array_shape=list(x.shape), dtype=x.dtype.str)
    x, meta["channels_last"] = _to_event(x, tuple(vae.event_shape), str(path))
    values = x.astype(np.float64)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        raise DataError(f"{path}: the values must be whole numbers (stored image values), got fractions")
    low, high = float(values.min()), float(values.max())
    binary = type(vae.likelihood) is Bernoulli
    if binary:
        distinct = set(np.unique(values).tolist())
        if distinct <= {0.0, 1.0}:
            scale = 1
        elif distinct <= {0.0, 255.0}:
            scale = 255
        elif binarize:
            if low < 0 or high > 255:
                raise DataError(f"{path}: --binarize needs values in [0, 255], got [{low:g}, {high:g}]")
            values, scale = (values >= (128 if high > 1 else 0.5)).astype(np.float64), 1
            meta["binarized"] = True
        else:
            raise DataError(
                f"{path}: this run's likelihood is bernoulli, which codes binary images (values 0/1 or "
                f"0/255), but the images have values in [{low:g}, {high:g}]: pass --binarize to threshold "
                "them at half (the file then holds the binarised images)"
            )
        meta["scale"] = scale
        symbols = values / scale
    else:
        if low < 0 or high > 255:
            raise DataError(
                f"{path}: this run's likelihood codes 8-bit images (values 0..255), got [{low:g}, {high:g}]"
            )
        symbols = values
    return torch.from_numpy(symbols.astype(np.uint8)), meta


# ---- writing ----------------------------------------------------------------------------------------


def write_images(x: torch.Tensor, info: dict[str, Any], out: Path) -> None:
    """Write decoded symbols (N, *event) uint8 back in the layout ``info`` recorded."""
    values = x.numpy()
    if info.get("values") == "binary":
        values = values * np.uint8(info.get("scale", 1))
    if out.suffix.lower() in (".npy", ".npz"):
        if info.get("source") == "folder":  # images: (N, H, W) grey or (N, H, W, C)
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
        return
    from PIL import Image

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder (use FILE.npy or FILE.npz for arrays)")
    if values.ndim != 4 or values.shape[1] not in (1, 3):
        raise ConfigError(f"images of shape {values.shape[1:]} cannot be written as PNG: use --out FILE.npy")
    width = len(str(len(values) - 1))
    names = info.get("names") or [f"{i:0{max(width, 6)}d}.png" for i in range(len(values))]
    for name, image in zip(names, values, strict=True):
        target = out / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"compressed file names an image outside the output folder: {name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        atomic_write(target, buf.getvalue())


# ---- the commands -----------------------------------------------------------------------------------


def _nelbo_bits_per_dim(vae: VAE, x: torch.Tensor, binary: bool) -> float:
    xf = x.float() if binary else x.float() / 255.0
    gen = torch.Generator().manual_seed(0)
    nats = nelbo(vae, xf, lambda raw: raw, batch_size=256, generator=gen)["nelbo"]
    return nats / (math.prod(vae.event_shape) * math.log(2.0))


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="compress images losslessly with a trained run (bits-back ANS)",
        description="Compress images losslessly with the run's model: bits-back coding with ANS "
        "(BB-ANS). The rate approaches the model's NELBO in bits/dim. Runs on the CPU.",
    )
    c.add_argument("run_dir")
    c.add_argument("input", help="FILE.npy, FILE.npz or IMAGE_FOLDER/ of the kind the run was trained on")
    c.add_argument("--out", required=True, help="the compressed file, FILE.tvz")
    c.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    c.add_argument(
        "--lanes",
        type=int,
        default=compression.DEFAULT_LANES,
        help="independent chains coded side by side: the networks' batch, each with its own initial bits "
        f"(default {compression.DEFAULT_LANES})",
    )
    c.add_argument(
        "--latent-bits",
        type=int,
        default=compression.DEFAULT_LATENT_BITS,
        help=f"2^B buckets of equal prior mass per latent dim (default {compression.DEFAULT_LATENT_BITS})",
    )
    c.add_argument(
        "--binarize",
        action="store_true",
        help="bernoulli runs: threshold grey images at half (the file holds the binarised images)",
    )


def run(args: argparse.Namespace) -> int:
    vae = load(args.run_dir, "cpu")
    compression.check_model(vae)
    ckpt = compression.checkpoint_sha256(args.run_dir)
    x, meta = read_images(vae, args.input, args.binarize)
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    data = compression.compress(
        vae, x, lanes=args.lanes, latent_bits=args.latent_bits, checkpoint=ckpt, meta=meta, stats=stats
    )
    seconds = time.perf_counter() - start
    atomic_write(Path(args.out), data)
    dims = len(x) * math.prod(vae.event_shape)
    report = {
        "images": len(x),
        "bytes": len(data),
        "bits_per_dim": 8 * len(data) / dims,
        "net_bits_per_dim": stats["net_bits"] / dims,
        "initial_bits": stats["initial_bits"],
        "header_bytes": stats["header_bytes"],
        "nelbo_bits_per_dim": _nelbo_bits_per_dim(vae, x, meta.get("scale") is not None),
        "seconds": seconds,
        "images_per_second": len(x) / seconds,
        "lanes": stats["lanes"],
        "latent_bits": stats["latent_bits"],
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
        "bit for bit, as the array or the images they were read from.",
    )
    d.add_argument("run_dir")
    d.add_argument("file", help="FILE.tvz")
    d.add_argument("--out", required=True, help="FILE.npy, FILE.npz or a folder for PNG images")
    d.add_argument("--json", action="store_true", help="print one JSON object with the figures")


def _run_decompress(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    info, _, _ = compression.read_header(data)  # a corrupt file is refused before the model is loaded
    vae = load(args.run_dir, "cpu")
    start = time.perf_counter()
    x = compression.decompress(vae, data, checkpoint=compression.checkpoint_sha256(args.run_dir))
    seconds = time.perf_counter() - start
    write_images(x, info, Path(args.out))
    report = {"images": len(x), "bytes": len(data), "seconds": seconds,
              "images_per_second": len(x) / seconds, "out": str(args.out)}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{len(x)} images -> {args.out}, {seconds:.1f} s", file=sys.stderr)
    return 0


# a module object like the other commands' (cli.COMMANDS maps names to modules)
DECOMPRESS = types.ModuleType(f"{__name__}.decompress", "``turbovae decompress``")
DECOMPRESS.__dict__.update(add_parser=_add_decompress_parser, run=_run_decompress)
