"""What a latent structure is: the object that owns how a VAE's latents are drawn, scored and coded.

A network (``models/``) maps data to distributions and back; its *structure* says what those
distributions are and how the terms of the bound follow from them. Everything that used to ask "is
this network hierarchical?" or "does its decoder read the data?" asks the structure instead:

- the training terms (``terms``, ``elbo``) and the importance log-weights (``encoded``,
  ``log_weights``) — the one place the ELBO and the IWAE maths are written, used by the objectives
  (``objectives.py``) and by evaluation (``evaluation/likelihood.py``) alike;
- the prior and sampling (``prior_size``, ``sample``), decoding and reconstruction;
- the latent walk a codec follows (``walk``), and whether a codec can use it (``codec_refusal``);
- the graphs an export writes (``export_graphs``) and what its manifest says (``manifest``);
- the report's extra figures (``eval_extras``) and how its posterior is described (``posterior_note``).

A network names its structure with a class attribute, ``structure = "hierarchical"`` (absent: the flat
Gaussian). A new structure is one file here and one entry in ``STRUCTURES`` (``structures/__init__.py``).
Methods take the ``VAE`` as their first argument: a structure object holds no state of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import runtime
from ..distributions import DiagonalGaussian

if TYPE_CHECKING:
    from ..vae import VAE

Noise = torch.Tensor | None  # standard-normal reparameterisation noise, drawn by the caller if given
# a codec's choice of a latent group's values: (group index, its prior (None: N(0, I)), its posterior
# (None when decoding)) -> the values z_l (n, D_l) to continue with
Pick = Callable[[int, DiagonalGaussian | None, DiagonalGaussian | None], torch.Tensor]


@dataclass
class Terms:
    """One posterior pass: rec = −log p(x | z) (B,), kl (B,) (analytic, the total over groups), and what
    the objective may charge differently: the flat posterior ``q`` (free bits per dimension) or the
    groups' KLs ``kl_groups`` (B, G)."""

    rec: torch.Tensor
    kl: torch.Tensor
    q: DiagonalGaussian | None = None
    kl_groups: torch.Tensor | None = None


@dataclass
class Graph:
    """One exported file: the module, how to make its inputs, their names and which axis is the batch."""

    name: str
    module: nn.Module
    inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]  # (batch, generator) -> inputs
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_axes: tuple[int, ...]  # of every input; outputs' batch axes are found by the export's shapes


class Encoder(nn.Module):
    """x (B, *event) → the posterior's mean and log-variance (B, latent)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.vae.encode(x)
        return q.mean, 2.0 * q.log_scale


class Decoder(nn.Module):
    """z (B, latent) → the likelihood's parameters (B, P, *event) and E[x | z] (B, *event)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.vae.decode_params(z)
        return params, self.vae.likelihood.mean(params)


def net_call(fn: Any, *args: Any, y: torch.Tensor | None = None) -> Any:
    """``fn(*args)``, with the class ids ``y`` appended for a conditional call (unconditional networks
    take no ``y`` argument at all)."""
    return fn(*args) if y is None else fn(*args, y)


def autocast_or_not(device: torch.device, precision: str | None) -> Any:
    """``runtime.autocast(device, precision)``, or no change of precision for None (training)."""
    return contextlib.nullcontext() if precision is None else runtime.autocast(device, precision)


class LatentStructure:
    """The contract of a latent structure; see the module docstring. Subclasses override what differs."""

    name = ""
    description = ""  # one line for `--help` and the docs

    # ---- the prior, decoding, sampling ---------------------------------------------------------------

    def prior_size(self, vae: VAE) -> int:
        """The dimension of the latents whose prior is N(0, I)."""
        return vae.latent

    def groups(self, vae: VAE) -> list[int]:
        """The sizes of the latent groups whose KLs are reported one by one (empty: one flat latent)."""
        return []

    def decode_params(
        self, vae: VAE, z: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor | None
    ) -> torch.Tensor:
        """Raw likelihood parameters (..., P, *event) for latents (..., latent)."""
        return net_call(vae.net.decode, z, y=y)

    def decode(self, vae: VAE, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """E[x | z] (..., *event)."""
        return vae.likelihood.mean(self.decode_params(vae, z, None, y))

    def reconstruct(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """E[x | z] at the posterior's mean."""
        return self.decode(vae, net_call(vae.net.encode, x, y=y).mean, y)

    def sample(
        self,
        vae: VAE,
        n: int,
        generator: torch.Generator | None,
        mean: bool,
        temperature: float,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """n draws: E[x | z] (``mean``) or x ~ p(x | z), z from the prior with its scales times
        ``temperature``; ``y`` (n,): the classes of a conditional VAE."""
        params = self.sample_params(vae, n, generator, temperature, y)
        return vae.likelihood.mean(params) if mean else vae.likelihood.sample(params, generator)

    def sample_params(
        self, vae: VAE, n: int, generator: torch.Generator | None, temperature: float, y: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    # ---- the bound ----------------------------------------------------------------------------------

    def terms(
        self,
        vae: VAE,
        x: torch.Tensor,
        eps: Noise = None,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
    ) -> Terms:
        """rec and KL of one reparameterised posterior sample (noise ``eps``, else from ``generator``)."""
        raise NotImplementedError

    def elbo(
        self,
        vae: VAE,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        eps: Noise = None,
        beta: float | torch.Tensor = 1.0,
        free_bits: float = 0.0,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The (β-)ELBO's loss and its terms (``objectives.elbo`` documents them)."""
        raise NotImplementedError

    def noise_shape(self, vae: VAE, batch: int, k: int | None = None) -> tuple[int, ...]:
        """The reparameterisation noise of one batch: (B, latent), or (k, B, latent) for k samples."""
        return (batch, vae.latent) if k is None else (k, batch, vae.latent)

    def encoded(self, vae: VAE, x: torch.Tensor, y: torch.Tensor | None) -> Any:
        """What the importance-weighted estimate computes once per example before its samples."""
        raise NotImplementedError

    def log_weights(
        self,
        vae: VAE,
        x: torch.Tensor,
        state: Any,
        eps: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        precision: str | None = None,
        grad: bool = True,
        with_kl: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log p(x | z_i) (c, B), log p(z_i) − log q(z_i | x) (c, B), the analytic KL (B,) of the
        posterior, only ``with_kl``) for the c samples of noise ``eps`` (c, B, latent), ``state`` from
        ``encoded``. The decoder runs under ``precision`` (None: as the caller's context); the sums run
        in float32. ``grad=False`` lets the likelihood use its faster form that autograd cannot follow
        (evaluation)."""
        raise NotImplementedError

    # ---- the optimiser, evaluation, export, compression -----------------------------------------------

    def param_groups(self, vae: VAE) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (a group may carry its own betas, weight decay ...)."""
        return [{"params": list(vae.parameters())}]

    def final_metrics(
        self, vae: VAE, x: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, Any]:
        """What summary.json adds for this structure, from the test inputs ``x`` (``prepare`` makes a
        batch of them the model's inputs)."""
        return {}

    def eval_extras(self, vae: VAE, nelbo: dict[str, Any]) -> dict[str, Any]:
        """What ``evaluate`` adds for this structure, from ``nelbo``'s output."""
        return {}

    posterior_group = ""  # which latents `encode`'s posterior covers, where not all ("the top group")

    def decoder_probe(self, vae: VAE) -> Callable[[int], Any] | None:
        """A function running one decoder pass over ``rows`` latents (the matmul floor's probe), or
        None when the decoder needs more than latents."""
        device = next(vae.parameters()).device
        return lambda rows: vae.decode_params(torch.zeros(rows, vae.latent, device=device))

    def export_graphs(self, vae: VAE) -> list[Graph]:
        """The graphs an export writes for this structure (``commands/export.py``)."""
        latent, event = vae.latent, vae.event_shape

        def x_in(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.rand(b, *event, generator=g),)

        def z_in(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.randn(b, latent, generator=g),)

        return [
            Graph("encoder", self.export_encoder(vae), x_in, ("x",), ("mean", "log_var"), (0,)),
            Graph("decoder", self.export_decoder(vae), z_in, ("z",), ("params", "mean"), (0,)),
        ]

    def export_encoder(self, vae: VAE) -> nn.Module:
        return Encoder(vae)

    def export_decoder(self, vae: VAE) -> nn.Module:
        return Decoder(vae)

    def manifest(self, vae: VAE) -> dict[str, Any]:
        """What an export's ``export.json`` says of the inputs."""
        return {"inputs": "stored values / max_value (as in training)"}

    def codec_refusal(self, vae: VAE) -> str | None:
        """Why a lossless codec cannot use this structure (one line), or None when it can."""
        return None

    def walk(self, vae: VAE, x: torch.Tensor | None, n: int, pick: Pick, decode: bool = True) -> Any:
        """The codec's pass over the latent groups, top group first: ``pick(i, p, q)`` chooses group i's
        values given its prior p (None: N(0, I)) and, when the model inputs ``x`` are given, its
        posterior q. Returns the likelihood parameters (n, P, *event) of the chosen latents (with
        ``decode=False`` the decoder may be skipped and None returned)."""
        raise NotImplementedError
