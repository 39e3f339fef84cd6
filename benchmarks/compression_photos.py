"""turbovae's codec on real colour photos against PNG, lossless WebP and lossless JPEG XL.

The colour photos scikit-image ships in its wheel are real data available offline. Random 8×8 crops
of some of them train the ``photo-colour`` preset (a conv VAE, discretised logistic mixture with
the RGB coupling); the others, whole, are compressed with ``turbovae compress`` (tiles of 8×8, the
edge tiles padded), decompressed and compared pixel for pixel, and coded with PNG (Pillow,
``optimize=True``, level 9), lossless WebP (Pillow, method 6, quality 100) and lossless JPEG XL
(``imagecodecs``, effort 9; skipped with a note when it is not installed) on the same pixels. bits/dim
(bits per colour value of the original image) and seconds, one torch thread.

    pip install scikit-image imagecodecs
    python benchmarks/compression_photos.py --train-seconds 240 --json photos.json

Most of the time goes to training (``--train-seconds``); ``--run DIR`` reuses a trained run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TRAIN = ["astronaut.png", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg",
         "retina.jpg", "ihc.png", "rocket.jpg"]  # fmt: skip
HELD_OUT = ["chelsea.png", "coffee.png"]
SRC = Path(__file__).resolve().parent.parent / "src"


def photo(name: str) -> np.ndarray:
    try:
        import skimage
    except ImportError:
        raise SystemExit("the photos are scikit-image's: pip install scikit-image") from None

    with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
        return np.asarray(im.convert("RGB"))


def crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = [photo(name) for name in TRAIN]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = images[i % len(images)]
        y, x = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
        out[i] = im[y : y + size, x : x + size]
    return out


def cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "turbovae", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"turbovae {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def timed(encode: Any, decode: Any) -> tuple[int, float, float]:
    start = time.perf_counter()
    data = encode()
    enc = time.perf_counter() - start
    start = time.perf_counter()
    decode(data)
    return len(data), enc, time.perf_counter() - start


def standard_codecs(pixels: np.ndarray) -> dict[str, tuple[int, float, float]]:
    """(bytes, seconds to encode, seconds to decode) of PNG, WebP and JPEG XL, all lossless."""

    def pillow(fmt: str, **kw: Any) -> Any:
        def encode() -> bytes:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt, **kw)
            return buf.getvalue()

        def decode(data: bytes) -> None:
            with Image.open(io.BytesIO(data)) as im:
                assert np.array_equal(np.asarray(im.convert("RGB")), pixels)

        return timed(encode, decode)

    out = {"png": pillow("PNG", optimize=True, compress_level=9),
           "webp_lossless": pillow("WEBP", lossless=True, quality=100, method=6)}  # fmt: skip
    try:
        import imagecodecs
    except ImportError:
        print("note: imagecodecs is not installed (pip install imagecodecs): no JPEG XL row", file=sys.stderr)
        return out

    def jxl_decode(data: bytes) -> None:
        assert np.array_equal(imagecodecs.jpegxl_decode(data), pixels)

    out["jpegxl_lossless"] = timed(
        lambda: imagecodecs.jpegxl_encode(pixels, lossless=True, effort=9), jxl_decode
    )
    return out


def turbovae_row(run: Path, pixels: np.ndarray, work: Path) -> tuple[int, float, float, dict[str, Any]]:
    src, tvz, back = work / "in.png", work / "in.tvz", work / "back.png"
    Image.fromarray(pixels).save(src)
    start = time.perf_counter()
    report = json.loads(cli("compress", str(run), str(src), "--out", str(tvz), "--json", "--overwrite",
                            "--progress", "off"))  # fmt: skip
    enc = time.perf_counter() - start
    start = time.perf_counter()
    cli("decompress", str(run), str(tvz), "--out", str(back), "--overwrite", "--progress", "off")
    dec = time.perf_counter() - start
    with Image.open(back) as im:
        report["exact"] = bool(np.array_equal(np.asarray(im), pixels))
    return tvz.stat().st_size, enc, dec, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="photo-bench", help="folder for the crops, the run and the files")
    p.add_argument("--run", help="a trained photo-colour run to reuse (no training)")
    p.add_argument("--crops", type=int, default=60_000, help="8x8 training crops")
    p.add_argument("--train-seconds", type=float, default=240.0)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else work / "run"
    if not args.run:
        np.save(work / "crops.npy", crops(args.crops, 8))
        limit = f"train.time_limit={args.train_seconds}"
        cli("train", "--config", "photo-colour", "--data", str(work / "crops.npy"), "--out", str(run),
            "--overwrite", "--progress", "off", "train.threads=1", limit)  # fmt: skip
    results: dict[str, Any] = {
        "torch_threads": 1,
        "load_average": os.getloadavg()[0],
        "run": str(run),
        "photos": [],
    }
    for name in HELD_OUT:
        pixels = photo(name)
        dims = pixels.size
        size, enc, dec, report = turbovae_row(run, pixels, work)
        rows = {"turbovae": (size, enc, dec), **standard_codecs(pixels)}
        entry = {"photo": name, "shape": list(pixels.shape), "exact": report["exact"],
                 "nelbo_bits_per_dim": report["nelbo_bits_per_dim"],  # of the tiles, padding included
                 "file_over_nelbo": report["bits_per_dim"] / report["nelbo_bits_per_dim"],
                 "tiles": report["images"], "header_bytes": report["header_bytes"],
                 "initial_bits": report["initial_bits"],
                 "codecs": {k: {"bits_per_dim": 8 * b / dims, "encode_s": e, "decode_s": d}
                            for k, (b, e, d) in rows.items()}}  # fmt: skip
        results["photos"].append(entry)
        cells = [f"{k} {v['bits_per_dim']:.3f} bits/dim ({v['encode_s']:.2f} s / {v['decode_s']:.2f} s)"
                 for k, v in entry["codecs"].items()]  # fmt: skip
        print(f"{name} {pixels.shape}: exact={entry['exact']}, file / NELBO of the tiles "
              f"{entry['file_over_nelbo']:.4f}; "
              + ", ".join(cells), flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
