"""turbovae's bits-back codec against standard lossless codecs on the Fashion-MNIST test images.

For each trained run given: the run's own test images (the 10,000 Fashion-MNIST test images; for a
bernoulli run their fixed binarisation, the images its test NELBO is measured on) are compressed with
``turbovae.compress``, decompressed and compared bit for bit; the rate (whole file, and without the
initial bits and the header) against the model's NELBO on the same images (fp32, one sample per image,
in bits/dim); gzip, bz2 and lzma (stdlib, strongest settings) on the concatenated images, PNG and
lossless WebP (Pillow) image by image; images/s both ways.

Train the runs first (a few minutes each on one CPU thread), e.g.

    turbovae train --config fmnist-mlp --out runs/fmnist-mlp-bin train.threads=1 eval.iwae_k=1
    turbovae train --data fashion-mnist --model mlp --hidden 512 --latent 32 \\
        --likelihood discretized-logistic model.mixtures=5 --epochs 40 --out runs/fmnist-mlp-dl \\
        train.threads=1 eval.iwae_k=1 train.time_limit=540

then

    python benchmarks/compression.py runs/fmnist-mlp-bin runs/fmnist-mlp-dl --json results.json
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import lzma
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import turbovae
from turbovae import compression
from turbovae.engine.setup import setup
from turbovae.evaluation.likelihood import nelbo


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def baselines(x: np.ndarray, binary: bool) -> dict[str, float]:
    """bits/dim of the standard codecs on images x (N, H, W) uint8 (bits 0/1 when ``binary``)."""
    dims = x.size
    raw = np.packbits(x).tobytes() if binary else x.tobytes()  # binary: 1 bit a pixel before coding
    out = {
        "gzip": 8 * len(gzip.compress(raw, 9)) / dims,
        "bz2": 8 * len(bz2.compress(raw, 9)) / dims,
        "lzma": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / dims,
    }
    png = webp = 0
    for image in x:
        im = Image.fromarray(image * np.uint8(255)).convert("1") if binary else Image.fromarray(image)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        png += len(buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(image * np.uint8(255) if binary else image).save(
            buf, format="WEBP", lossless=True, quality=100, method=6
        )
        webp += len(buf.getvalue())
    out["png"], out["webp_lossless"] = 8 * png / dims, 8 * webp / dims
    return out


def bench_run(
    run_dir: str, n: int | None, batch: int, latent_bits: int, others: bool = True
) -> dict[str, Any]:
    vae = turbovae.load(run_dir, "cpu")
    s = setup(vae.config, torch.device("cpu"), vae.data_meta)
    x = s.x_test.cpu()[:n]  # uint8: bytes, or the fixed binarisation (bits 0/1)
    binary = vae.likelihood.name == "bernoulli"
    dims = x[0].numel() * len(x)
    stats: dict[str, Any] = {}
    start, cpu = time.perf_counter(), time.process_time()
    data = compression.compress(
        vae, x, batch=batch, latent_bits=latent_bits, checkpoint=compression.checkpoint_sha256(run_dir),
        stats=stats,
    )  # fmt: skip
    enc, enc_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    back = compression.decompress(vae, data)
    dec, dec_cpu = time.perf_counter() - start, time.process_time() - cpu
    xf = x.float() if binary else x.float() / 255.0
    gen = torch.Generator().manual_seed(0)
    nelbo_nats = nelbo(vae, xf, lambda r: r, batch_size=500, generator=gen)["nelbo"]
    nelbo_bpd = nelbo_nats / (x[0].numel() * math.log(2.0))
    net_bpd = stats["net_bits"] / dims
    return {
        "run": run_dir,
        "model": vae.config.model.name,
        "likelihood": vae.likelihood.name,
        "images": len(x),
        "exact": bool(torch.equal(back, x.to(torch.uint8))),
        "bytes": len(data),
        "bits_per_dim": 8 * len(data) / dims,
        "net_bits_per_dim": net_bpd,
        "initial_bits": stats["initial_bits"],
        "header_bytes": stats["header_bytes"],
        "nelbo_bits_per_dim": nelbo_bpd,
        "rate_over_nelbo": net_bpd / nelbo_bpd,
        "compress_images_per_second": len(x) / enc,
        "decompress_images_per_second": len(x) / dec,
        # per second of this process's CPU time: what a quiet core would give, on a loaded machine
        "compress_images_per_cpu_second": len(x) / enc_cpu,
        "decompress_images_per_cpu_second": len(x) / dec_cpu,
        "compress_mb_per_second": x.numel() / enc / 1e6,
        "decompress_mb_per_second": x.numel() / dec / 1e6,
        "load_average": os.getloadavg()[0],
        "batch": stats["batch"],
        "latent_bits": latent_bits,
        "baselines": baselines(x.numpy().reshape(len(x), *x.shape[-2:]), binary) if others else {},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run directories (bernoulli and/or 8-bit likelihoods)")
    p.add_argument("--n", type=int, default=None, help="the first N test images (default all)")
    p.add_argument("--batch", type=int, default=compression.DEFAULT_BATCH)
    p.add_argument("--latent-bits", type=int, default=compression.DEFAULT_LATENT_BITS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-baselines", action="store_true", help="time turbovae alone (no gzip ... WebP rows)")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "runs": []}
    for run in args.runs:
        r = bench_run(run, args.n, args.batch, args.latent_bits, not args.no_baselines)
        results["runs"].append(r)
        b = r["baselines"]
        print(
            f"{run} ({r['model']}, {r['likelihood']}): {r['images']} images, exact={r['exact']}, "
            f"{r['bits_per_dim']:.4f} bits/dim ({r['net_bits_per_dim']:.4f} net, {r['initial_bits']} initial "
            f"bits; NELBO {r['nelbo_bits_per_dim']:.4f}, ratio {r['rate_over_nelbo']:.4f}); "
            f"{r['compress_images_per_second']:.0f} / {r['decompress_images_per_second']:.0f} images/s "
            f"({r['compress_images_per_cpu_second']:.0f} / {r['decompress_images_per_cpu_second']:.0f} a CPU "
            f"second; {r['compress_mb_per_second']:.2f} / {r['decompress_mb_per_second']:.2f} MB/s of raw "
            f"input; load {r['load_average']:.1f}); " + ", ".join(f"{k} {v:.4f}" for k, v in b.items()),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
