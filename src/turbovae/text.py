"""Text runs: per-token figures, reconstructions, samples and interpolations as lines of text.

Tokens are counted with the end marker (a sentence of n words is n + 1 tokens at the word level), as
in the language-modelling literature; perplexity = exp(NLL per token), from the IWAE estimate of
−log p(x) (an upper bound on it from the NELBO as ``perplexity_nelbo``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import evaluate, runtime
from .data.text import Tokenizer, lengths_of
from .vae import VAE

if TYPE_CHECKING:
    from .train import Setup

Prepare = evaluate.Prepare


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
    with evaluate._EvalMode(vae):
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
    q = evaluate.encode_all(vae, s.x_test, s.prepare_test, batch_size=s.cfg.eval.batch_size)
    active, _ = evaluate.active_units(q)
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


def lines_of(vae: VAE, ids: torch.Tensor) -> list[str]:
    tok = Tokenizer.from_meta(vae.data_meta)
    return [tok.decode(row) for row in ids.cpu()]


@torch.no_grad()
def sample_lines(
    vae: VAE, n: int, generator: torch.Generator | None = None, greedy: bool = True, temperature: float = 1.0
) -> list[str]:
    """n sentences from the model: z ~ N(0, T²I), decoded greedily or token by token at random."""
    with evaluate._EvalMode(vae):
        return lines_of(vae, vae.sample(n, generator=generator, mean=greedy, temperature=temperature))


@torch.no_grad()
def write_text_outputs(
    s: Setup, out: Path, n_samples: int = 32, n_recon: int = 12, n_pairs: int = 4, steps: int = 7
) -> None:
    """samples.txt (prior samples: greedy, then drawn), reconstructions.txt (test sentences, their greedy
    reconstruction from the posterior mean and one drawn from z ~ q(z|x)) and interpolations.txt
    (greedy decodings along the line between two test sentences' posterior means)."""
    vae = s.vae
    with evaluate._EvalMode(vae):
        g = runtime.generator(s.device, 7)
        greedy = sample_lines(vae, n_samples, g, greedy=True)
        drawn = sample_lines(vae, n_samples, g, greedy=False)
        (out / "samples.txt").write_text(
            "# z ~ N(0, I), greedy decoding\n"
            + "".join(f"{t}\n" for t in greedy)
            + "\n# z ~ N(0, I), tokens drawn from p(x | z)\n"
            + "".join(f"{t}\n" for t in drawn)
        )
        spread = torch.linspace(0, len(s.x_test) - 1, min(n_recon, len(s.x_test))).long()
        x = s.prepare_test(s.x_test[spread.to(s.x_test.device)])  # across the test set, not its first lines
        q = vae.encode(x)
        length = s.data.event_shape[0]
        net: Any = vae.net
        best = lines_of(vae, net.generate(q.mean, length))
        some = lines_of(vae, net.generate(q.rsample(generator=g), length, generator=g, greedy=False))
        rows = [
            f"input:   {a}\ngreedy:  {b}\nsampled: {c}\n"
            for a, b, c in zip(lines_of(vae, x), best, some, strict=True)
        ]
        (out / "reconstructions.txt").write_text(
            "# test sentences; greedy decoding of the posterior mean; tokens drawn with z ~ q(z | x)\n\n"
            + "\n".join(rows)
        )
        blocks = []
        for i in range(min(n_pairs, len(x) // 2)):
            za, zb = q.mean[2 * i], q.mean[2 * i + 1]
            t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(1)
            path = lines_of(vae, net.generate((1 - t) * za + t * zb, length))
            blocks.append("\n".join(f"{k / (steps - 1):.2f}  {line}" for k, line in enumerate(path)) + "\n")
        (out / "interpolations.txt").write_text(
            "# greedy decodings along z = (1 − t)·mean(q(z|a)) + t·mean(q(z|b)), pairs of test sentences\n\n"
            + "\n".join(blocks)
        )
