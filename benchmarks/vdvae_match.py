"""turbovae's ``fmnist-hvae-vdvae`` preset against the VDVAE peer's Fashion-MNIST network (issue 35,
target 1: "the same network", parameter counts within 5%): both counted, part by part, with the
multiply-adds of their convolutions per image (one forward pass of the posterior, training's pass).

The peer is ``../shared/bench/peer_vdvae.py`` (openai/vdvae re-implemented) built with its default
flags, the ones its README measured: width 32, encoder ``28x1,28d2,14x1,14d2,7x3,7d7,1x2``, decoder
``1x2,7m1,7x4,14m7,14x1,28m14``, 16 latent channels, bottleneck 0.25, Bernoulli head.

    PYTHONPATH=src python benchmarks/vdvae_match.py [--peer ../shared/bench/peer_vdvae.py] [--json]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import turbovae
from turbovae.engine.setup import build_vae

TOLERANCE = 0.05  # issue 35 target 1: parameter counts within 5%


def load_peer(path: Path) -> Any:
    sys.path.insert(0, str(path.parent))  # it imports its data helper (fmnist.py) from its folder
    spec = importlib.util.spec_from_file_location("peer_vdvae", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conv_macs(model: nn.Module, run: Any) -> int:
    """Multiply-adds of every convolution in one call of ``run`` (per image: batch 1)."""
    total = 0

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        positions = (
            out.shape[2] * out.shape[3]
            if isinstance(m, nn.Conv2d)
            else inputs[0].shape[2] * inputs[0].shape[3]
        )
        total += k * m.out_channels * positions  # (transposed: every input position, every output channel)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return total


def parts(model: nn.Module, depth: int) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for name, p in model.named_parameters():
        out[".".join(name.split(".")[:depth])] += p.numel()
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peer", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/bench/peer_vdvae.py"
    )
    p.add_argument("--config", default="fmnist-hvae-vdvae")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    peer = load_peer(args.peer)
    enc, dec = "28x1,28d2,14x1,14d2,7x3,7d7,1x2", "1x2,7m1,7x4,14m7,14x1,28m14"
    h = peer.Hyperparams(peer.CIFAR10, width=32, zdim=16, bottleneck_multiple=0.25, enc_blocks=enc,
                         dec_blocks=dec, num_mixtures=10, dataset="fashion_mnist", image_size=28,
                         image_channels=1, out="bernoulli")  # fmt: skip
    torch.manual_seed(0)
    theirs = peer.VAE(h)
    x = torch.rand(1, 28, 28, 1).round()
    their_macs = conv_macs(theirs, lambda: theirs(x, x))
    cfg = turbovae.resolve(args.config)
    ours = build_vae(cfg, (1, 28, 28))
    xo = x.permute(0, 3, 1, 2)
    our_macs = conv_macs(ours, lambda: ours.structure.terms(ours, xo, eps=torch.randn(1, ours.latent)))
    n_theirs, n_ours = (sum(q.numel() for q in m.parameters()) for m in (theirs, ours))
    ratio = n_ours / n_theirs - 1
    row = {"peer": "vdvae-ea35b49 (peer_vdvae.py defaults)", "config": args.config, "peer_params": n_theirs,
           "params": n_ours, "difference": round(ratio, 4), "within_tolerance": abs(ratio) <= TOLERANCE,
           "peer_conv_macs_per_image": their_macs, "conv_macs_per_image": our_macs,
           "peer_parts": parts(theirs, 2), "parts": parts(ours.net, 1)}  # fmt: skip
    if args.json:
        print(json.dumps(row))
        return
    print(
        f"peer (VDVAE re-implemented, Fashion-MNIST defaults): {n_theirs:,} parameters, "
        f"{their_macs / 1e6:.2f} M conv multiply-adds an image"
    )
    print(
        f"turbovae {args.config}: {n_ours:,} parameters ({100 * ratio:+.1f}%, target within "
        f"{100 * TOLERANCE:.0f}%: {'yes' if abs(ratio) <= TOLERANCE else 'NO'}), {our_macs / 1e6:.2f} M conv "
        f"multiply-adds an image"
    )
    print("peer by part:    ", ", ".join(f"{k} {v:,}" for k, v in row["peer_parts"].items()))
    print("turbovae by part:", ", ".join(f"{k} {v:,}" for k, v in row["parts"].items()))


if __name__ == "__main__":
    main()
