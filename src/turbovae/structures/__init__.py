"""Latent structures, registered by name: what a VAE's latents are and how its bound is computed.

A network names its structure with a class attribute ``structure`` (absent: ``gaussian``); ``VAE``
holds the object (``vae.structure``) and everything else asks it. A new structure is one file here and
one entry in ``STRUCTURES``; ``base.py`` documents the contract."""

from __future__ import annotations

from typing import Any

from ..errors import unknown_name
from .autoregressive import Autoregressive
from .base import Graph, LatentStructure, Pick, Terms
from .gaussian import FlatGaussian
from .hierarchical import Hierarchical, kl_balance_weights, log_prior_ratio, posterior_pass
from .perceptual import Perceptual
from .quantised import Quantised

STRUCTURES: dict[str, LatentStructure] = {
    "gaussian": FlatGaussian(),
    "hierarchical": Hierarchical(),
    "autoregressive": Autoregressive(),
    "perceptual": Perceptual(),
    "quantised": Quantised(),
}


def structure_of(net: Any) -> LatentStructure:
    """The structure a network names (``net.structure``; the flat Gaussian when it names none)."""
    name = getattr(net, "structure", "gaussian")
    if name not in STRUCTURES:
        raise unknown_name("latent structure", name, STRUCTURES)
    return STRUCTURES[name]


__all__ = [
    "STRUCTURES",
    "Graph",
    "LatentStructure",
    "Pick",
    "Terms",
    "kl_balance_weights",
    "log_prior_ratio",
    "posterior_pass",
    "structure_of",
]
