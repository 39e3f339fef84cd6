"""The VAE: a network (encoder + decoder), a likelihood p(x|z) and the prior N(0, I)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import conditioning
from .distributions import DiagonalGaussian
from .errors import ConfigError
from .likelihoods import Likelihood
from .structures import LatentStructure, structure_of


class VAE(nn.Module):
    """What ``turbovae.load`` returns. Inputs are float tensors ``(B, *event_shape)`` preprocessed as in
    training (bytes divided by the dataset's ``max_value``, binarised if the run binarised)."""

    def __init__(self, net: nn.Module, likelihood: Likelihood, latent: int) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        # what the latents are (flat Gaussian, hierarchical, autoregressive ...): structures/
        self.structure: LatentStructure = structure_of(net)
        self.latent = latent
        self.config: Any = None  # the run's Config, set by turbovae.load
        self.max_value = 1.0  # inputs are stored values / max_value (e.g. bytes / 255)
        # the dataset's description (Dataset.meta: a table's columns and fitted transforms), set by
        # build_vae and so by turbovae.load
        self.data_meta: dict[str, Any] = {}
        # the checkpoint turbovae.load read (its JSON, and the SHA-256 of its tensors): None, "" otherwise
        self.checkpoint_path: Any = None
        self.checkpoint_sha256 = ""

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    def prior(self, device: torch.device | str | None = None) -> DiagonalGaussian:
        """p(z) = N(0, I); for a hierarchical network, the top group's prior (the lower groups' priors are
        conditional: ``sample`` draws from them)."""
        return DiagonalGaussian.standard((self.structure.prior_size(self),), device=device)

    @property
    def n_classes(self) -> int:
        """K, the classes of a conditional VAE (``data.condition``), 0 for an unconditional one."""
        return int(getattr(self.net, "n_classes", 0))

    @property
    def condition(self) -> dict[str, Any] | None:
        """What a conditional VAE's class ids mean (``data_meta["condition"]``: kind, names, counts)."""
        return self.data_meta.get("condition")

    def condition_ids(self, condition: Any, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``condition`` as (n,) int64 class ids: a tensor or sequence of n ids, or one class (an id or a
        name) for all n."""
        if isinstance(condition, torch.Tensor) and condition.dim() == 1:
            if condition.shape != (n,):
                raise ConfigError(f"condition: {len(condition)} class ids for {n} examples")
            if condition.is_floating_point() or condition.dtype == torch.bool:  # 0.5 is not class 0
                raise ConfigError(f"condition: class ids must be integers, got a {condition.dtype} tensor")
            given = condition.to(device=device, dtype=torch.long)
            outside = (given < 0) | (given >= self.n_classes)
            if bool(outside.any()):  # one host sync
                bad = int(given[outside][0])
                raise ConfigError(f"condition: class id {bad} is not in 0..{self.n_classes - 1}")
            return given
        if isinstance(condition, list | tuple):
            ids = [self._class_id(c) for c in condition]
            return conditioning.check_labels(torch.tensor(ids, device=device), n, self.n_classes, "condition")
        return torch.full((n,), self._class_id(condition), dtype=torch.long, device=device)

    def _class_id(self, c: Any) -> int:
        if isinstance(c, torch.Tensor):
            c = int(c.item())
        if isinstance(c, int) and not isinstance(c, bool):
            if not 0 <= c < self.n_classes:
                raise ConfigError(f"class id {c} is not in 0..{self.n_classes - 1}")
            return c
        if self.condition is None:
            raise ConfigError(f"condition '{c}' names a class, but this VAE has no class names")
        return conditioning.resolve(self.condition, c)

    def _y(self, condition: Any, n: int, device: torch.device) -> torch.Tensor | None:
        if condition is None:
            return None
        if not self.n_classes:
            raise ConfigError(
                "this VAE is not conditional (trained without data.condition): pass no condition"
            )
        return self.condition_ids(condition, n, device)

    def encode(self, x: torch.Tensor, condition: Any = None) -> DiagonalGaussian:
        """The posterior q(z | x); ``.mean`` gives the usual embedding. For a hierarchical network, the
        top group's posterior q(z_1 | x), the one group whose prior is N(0, I). A conditional VAE
        needs ``condition`` (class ids (B,), or one class id or name): q(z | x, y)."""
        if condition is None:
            return self.net.encode(x)  # type: ignore[operator]
        return self.net.encode(x, self._y(condition, len(x), x.device))  # type: ignore[operator]

    def decode_params(
        self, z: torch.Tensor, x: torch.Tensor | None = None, condition: Any = None
    ) -> torch.Tensor:
        """Raw likelihood parameters ``(..., P, *event_shape)`` for latents ``(..., latent)``.

        An autoregressive network (text) also needs the data ``x`` (B, *event) whose likelihood the
        parameters are for (each position is predicted from the ones before it); z may carry sample
        dims in front of B. Other networks ignore ``x``. A conditional VAE needs ``condition``: the
        class of each of the B rows (ids (B,) or one class), shared by z's sample dims."""
        y = None if condition is None else self._y(condition, z.shape[-2] if z.dim() > 1 else 1, z.device)
        return self.structure.decode_params(self, z, x, y)

    def decode(self, z: torch.Tensor, condition: Any = None) -> torch.Tensor:
        """E[x | z], the picture a latent stands for: ``(..., *event_shape)``. For text, the greedy
        decoding of z: token ids (..., T). A conditional VAE: E[x | z, y] for ``condition`` y."""
        y = None if condition is None else self._y(condition, z.shape[-2] if z.dim() > 1 else 1, z.device)
        return self.structure.decode(self, z, y)

    def reconstruct(self, x: torch.Tensor, condition: Any = None) -> torch.Tensor:
        """E[x | z = mean of q(z | x)]; hierarchical: every group at its posterior mean, top-down.
        A conditional VAE: with ``condition`` y in both the encoder and the decoder."""
        return self.structure.reconstruct(
            self, x, None if condition is None else self._y(condition, len(x), x.device)
        )

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        mean: bool = True,
        temperature: float = 1.0,
        condition: Any = None,
    ) -> torch.Tensor:
        """n draws from the model: z ~ N(0, I), then E[x | z] (``mean=True``) or x ~ p(x | z).

        For text: token ids (n, T), decoded greedily (``mean=True``) or drawn token by token.
        Hierarchical: z drawn top-down from the conditional priors p(z_l | z_<l).
        ``temperature`` T scales the prior's standard deviations (z ~ N(0, T²I); hierarchical: every
        group's σ_p): below 1 the draws come from nearer the prior's mode, the usual trade of diversity
        for cleaner samples in deep VAEs (NVAE, VDVAE); 0 gives the mode itself.

        A conditional VAE draws from p(x | y) for ``condition`` y: one class (an id or a name) for all n
        draws, or n class ids; without it, y is drawn from the training frequencies, then z."""
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ConfigError(f"the sampling temperature must be finite and >= 0, got {temperature}")
        y = None
        if condition is not None or self.n_classes:
            y = self._sample_classes(n, generator, condition, next(self.parameters()).device)
        return self.structure.sample(self, n, generator, mean, temperature, y)

    def _sample_classes(
        self, n: int, generator: torch.Generator | None, condition: Any, device: torch.device
    ) -> torch.Tensor:
        """The classes of n conditional draws: from ``condition``, else from the training frequencies."""
        if condition is None:
            if self.condition is None:
                raise ConfigError("this VAE is conditional: pass condition= (class ids or a class)")
            return conditioning.draw_classes(self.condition, n, generator, device)
        given = self._y(condition, n, device)  # an unconditional VAE: the error that says so
        assert given is not None
        return given
