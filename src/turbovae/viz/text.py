"""Text outputs of a sentence VAE: sampled lines, reconstructions and interpolations as .txt files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import runtime
from ..data.text import Tokenizer
from ..evaluation import EvalMode
from ..vae import VAE

if TYPE_CHECKING:
    from ..engine.setup import Setup


def lines_of(vae: VAE, ids: torch.Tensor) -> list[str]:
    tok = Tokenizer.from_meta(vae.data_meta)
    return [tok.decode(row) for row in ids.cpu()]


@torch.no_grad()
def sample_lines(
    vae: VAE, n: int, generator: torch.Generator | None = None, greedy: bool = True, temperature: float = 1.0
) -> list[str]:
    """n sentences from the model: z ~ N(0, T²I), decoded greedily or token by token at random."""
    with EvalMode(vae):
        return lines_of(vae, vae.sample(n, generator=generator, mean=greedy, temperature=temperature))


@torch.no_grad()
def write_text_outputs(
    s: Setup, out: Path, n_samples: int = 32, n_recon: int = 12, n_pairs: int = 4, steps: int = 7
) -> None:
    """samples.txt (prior samples: greedy, then drawn), reconstructions.txt (test sentences, their greedy
    reconstruction from the posterior mean and one drawn from z ~ q(z|x)) and interpolations.txt
    (greedy decodings along the line between two test sentences' posterior means)."""
    vae = s.vae
    with EvalMode(vae):
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
