"""Held-out numbers of a VAE: the NELBO, the importance-weighted log-likelihood, bits/dim, posterior
diagnostics (active units, KL per dimension, mutual information), and ``evaluate`` (all of them, what
``turbovae eval`` prints). Table fidelity and text metrics are the modules ``fidelity`` and ``text``."""

from .diagnostics import ACTIVE_THRESHOLD, active_units, encode_all, kl_per_dim, mutual_information
from .likelihood import (
    EvalMode,
    Prepare,
    bits_per_dim,
    default_prepare,
    iwae_log_likelihood,
    iwae_nll,
    nelbo,
    plan_chunks,
)
from .summary import evaluate

__all__ = [
    "ACTIVE_THRESHOLD",
    "EvalMode",
    "Prepare",
    "active_units",
    "bits_per_dim",
    "default_prepare",
    "encode_all",
    "evaluate",
    "iwae_log_likelihood",
    "iwae_nll",
    "kl_per_dim",
    "mutual_information",
    "nelbo",
    "plan_chunks",
]
