"""Text runs: per-token figures, reconstructions, samples and interpolations as lines of text.

Tokens are counted with the end marker (a sentence of n words is n + 1 tokens at the word level), as
in the language-modelling literature; perplexity = exp(NLL per token), from the IWAE estimate of
−log p(x) (an upper bound on it from the NELBO as ``perplexity_nelbo``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..data.text import lengths_of
from ..vae import VAE
from .diagnostics import active_units, encode_all
from .likelihood import EvalMode, Prepare

if TYPE_CHECKING:
    from ..engine.setup import Setup


def per_token(nats_per_sentence: float | None, x: torch.Tensor) -> float | None:
    """Nats per sentence → nats per token over the sentences ``x`` (B, T)."""
    if nats_per_sentence is None:
        return None
    return nats_per_sentence * len(x) / max(1, int(lengths_of(x).sum()))


def text_metrics(nelbo: float, nll_iwae: float | None, x: torch.Tensor) -> dict[str, Any]:
    """Per-token NELBO and IWAE NLL, and perplexities, for held-out sentences ``x``."""
    nelbo_tok, nll_tok = per_token(nelbo, x), per_token(nll_iwae, x)
    assert nelbo_tok is not None
    return {
        "tokens_per_sentence": float(lengths_of(x).double().mean()),
        "nelbo_per_token": nelbo_tok,
        "nll_iwae_per_token": nll_tok,
        "perplexity": math.exp(nll_tok) if nll_tok is not None else None,
        "perplexity_nelbo": math.exp(nelbo_tok),
    }


@torch.no_grad()
def reconstruction_accuracy(vae: VAE, x: torch.Tensor, prepare: Prepare, *, batch_size: int = 500) -> float:
    """Share of the tokens of ``x`` that greedy decoding from the posterior mean gets right, position by
    position (end marker included). A decoder that ignores z scores only what the language model alone
    predicts."""
    right = total = 0
    with EvalMode(vae):
        for i in range(0, len(x), batch_size):
            xb = prepare(x[i : i + batch_size])
            ids = vae.net.generate(vae.encode(xb).mean, xb.shape[1])  # type: ignore[operator]
            mask = xb != 0
            right += int(((ids == xb) & mask).sum())
            total += int(mask.sum())
    return right / max(1, total)


def text_summary(s: Setup, ev: dict[str, float], iw: dict[str, Any], loop: dict[str, Any]) -> dict[str, Any]:
    """The text keys of summary.json, prefixed ``test_`` where they describe the test set."""
    vae, meta = s.vae, s.data.meta["text"]
    q = encode_all(vae, s.x_test, s.prepare_test, batch_size=s.cfg.eval.batch_size)
    active, _ = active_units(q)
    out = {f"test_{k}": v for k, v in text_metrics(ev["nelbo"], iw["nll"], s.x_test).items()}
    train_tokens = int(lengths_of(s.x_train).sum())
    out.update(
        test_active_units=active,
        latent=vae.latent,
        test_reconstruction_accuracy=reconstruction_accuracy(vae, s.x_test[:1000], s.prepare_test),
        tokens_per_second=loop["examples"] * train_tokens / len(s.x_train) / max(loop["train_seconds"], 1e-9),
        tokenizer=meta["tokenizer"],
        vocab_size=len(meta["vocab"]),
        max_length=meta["max_length"],
        lines_truncated=meta.get("truncated"),
        empty_lines_skipped=meta.get("empty_lines"),
    )
    return out
