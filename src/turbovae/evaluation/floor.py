"""The matmul-bound floor of an IWAE pass: the time its decoder's matrix products alone take here."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .. import runtime
from ..vae import VAE
from .likelihood import EvalMode


def decoder_linears(vae: VAE, rows: int) -> list[tuple[int, int, int]] | None:
    """The (rows, in, out) shapes of every matmul one decoder pass over ``rows`` latents runs, or None
    when the decoder runs something other than linear layers and pointwise functions (e.g. convolutions)."""
    shapes: list[tuple[int, int, int]] = []
    heavy = False

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal heavy
        if isinstance(module, nn.Linear):
            shapes.append((inputs[0].numel() // module.in_features, module.in_features, module.out_features))
        elif isinstance(module, nn.modules.conv._ConvNd):
            heavy = True

    probe = vae.structure.decoder_probe(vae)
    if probe is None:  # a decoder that needs more than latents (text's recurrent one): not only linears
        return None
    handles = [m.register_forward_hook(hook) for m in vae.modules()]
    try:
        with torch.no_grad(), EvalMode(vae):
            probe(rows)
    finally:
        for h in handles:
            h.remove()
    return None if heavy or not shapes else shapes


@torch.no_grad()
def matmul_floor(
    vae: VAE, n: int, k: int, rows: int, precision: str = "fp32", repeats: int = 7
) -> dict[str, float] | None:
    """The matmul-bound floor of an IWAE pass: the decoder's FLOPs over n·k latents divided by the
    throughput torch reaches on this machine for the same matmul shapes and dtype (the best of
    ``repeats`` timed runs of one chunk's matmuls, with nothing else: no bias, activation, likelihood,
    sampling or log-sum-exp). None for decoders that are not made of linear layers."""
    shapes = decoder_linears(vae, rows)
    if shapes is None:
        return None
    device = next(vae.parameters()).device
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pairs = [
        (torch.randn(m, i, device=device, dtype=dtype), torch.randn(o, i, device=device, dtype=dtype).T)
        for m, i, o in shapes
    ]
    outs = [torch.empty(a.shape[0], w.shape[1], device=device, dtype=dtype) for a, w in pairs]

    def once() -> None:
        for (a, w), out in zip(pairs, outs, strict=True):
            torch.mm(a, w, out=out)

    once()  # warm-up: the first call packs weights and spins up threads
    best = math.inf
    for _ in range(repeats):
        runtime.synchronize(device)
        t0 = time.perf_counter()
        once()
        runtime.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    flops_chunk = sum(2.0 * m * i * o for m, i, o in shapes)
    total = n * k / rows  # chunks of `rows` latents
    return {
        "floor_seconds": best * total,
        "floor_flops": flops_chunk * total,
        "floor_gflops_per_second": flops_chunk / best / 1e9,
    }
