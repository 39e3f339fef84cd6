"""The options every model family shares: ``ModelConfig``, the base of each family's own dataclass.

A family's file in ``models/`` subclasses it with its options (``MLPConfig`` beside ``MLPNet``, as
nanoGPT's ``GPTConfig`` sits beside ``GPT``); ``cfg.model`` is an instance of the class that the
family's registry entry names, chosen by ``model.name`` when the config is resolved (config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError

# a field with this metadata does not change the network's shapes: left out of the compile-cost key
NOT_SHAPING: dict[str, Any] = {"shapes": False}


@dataclass(slots=True)
class ModelConfig:
    """The ``model`` section's options shared by every family (``slots``: setting an option the family
    does not have fails instead of being ignored)."""

    name: str = field(default="mlp", metadata=NOT_SHAPING)  # the family: a key of models.MODELS
    latent: int = 20
    activation: str = "relu"
    dropout: float = 0.0
    likelihood: str = "bernoulli"
    # σ of the Gaussian likelihoods (initial σ where learned)
    likelihood_scale: float = field(default=0.1, metadata=NOT_SHAPING)
    mixtures: int = 10  # discretized-logistic: mixture components per value

    def check(self) -> None:
        """Raise ConfigError for values of the family's own options that cannot work (the shared ones
        are checked in config.validate)."""

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The family's own options, without the shared ones, in their order."""
        shared = {f.name for f in fields(ModelConfig)}
        return tuple(f.name for f in fields(cls) if f.name not in shared)

    @classmethod
    def shape_fields(cls) -> tuple[str, ...]:
        """The model.* keys that shape the network (the compile-cost cache key): the family's own
        options, then the shared ones, less those marked NOT_SHAPING."""
        own = set(cls.options())
        ordered = sorted(fields(cls), key=lambda f: f.name not in own)  # stable: own first, in order
        return tuple(f.name for f in ordered if f.metadata.get("shapes", True))


def check_widths(key: str, widths: list[int]) -> None:
    """A list of layer widths: non-empty, each positive."""
    if not widths or any(w < 1 for w in widths):
        raise ConfigError(f"model.{key} must be a non-empty list of positive widths, got {widths}")
