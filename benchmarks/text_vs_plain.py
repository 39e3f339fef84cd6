"""Text: tokens/s of turbovae's sentence VAE against a straightforward PyTorch sentence-VAE loop on the
same data, with the same network sizes, in the same process.

The plain loop is what a sentence VAE usually looks like in PyTorch: a DataLoader over the token ids
padded to the longest line of the corpus, shuffled, no length bucketing; the encoder GRU reads packed
sequences (pack_padded_sequence), the decoder GRU the whole padded batch with teacher forcing and word
dropout; cross-entropy with ignore_index on the padding; eager fp32; ``loss.item()`` every step.
turbovae runs its own training step as ``turbovae train`` would (``turbovae.bench.bench_turbovae``):
length-bucketed batches cut to their longest line, the encoder's state gathered at each line's last
token, the configured precision. Tokens are real tokens (end markers included, padding not).

    python benchmarks/text_vs_plain.py --threads 1          # the words-char preset, 3 rounds
    python benchmarks/text_vs_plain.py --config text data.name=text:corpus.txt --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from turbovae import runtime
from turbovae.commands.bench import bench_turbovae, forever
from turbovae.config import resolve
from turbovae.engine.setup import setup

PAD, UNK, BOS = 0, 1, 2


class PlainSentenceVAE(nn.Module):
    """Bowman et al.'s sentence VAE written the usual way; the same sizes as turbovae's ``sentence``."""

    def __init__(self, vocab: int, embedding: int, hidden: int, latent: int, word_dropout: float) -> None:
        super().__init__()
        self.word_dropout = word_dropout
        self.embedding = nn.Embedding(vocab, embedding, padding_idx=PAD)
        self.encoder = nn.GRU(embedding, hidden, batch_first=True)
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.z_to_hidden = nn.Linear(latent, hidden)
        self.decoder = nn.GRU(embedding + latent, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = (x != PAD).sum(1)
        packed = pack_padded_sequence(
            self.embedding(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, h = self.encoder(packed)
        mu, logvar = self.mu(h[-1]), self.logvar(h[-1])
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(inputs.shape) < self.word_dropout) & (inputs != PAD)
            drop[:, 0] = False
            inputs = inputs.masked_fill(drop, UNK)
        emb = torch.cat([self.embedding(inputs), z.unsqueeze(1).expand(-1, x.shape[1], -1)], -1)
        out, _ = self.decoder(emb, torch.tanh(self.z_to_hidden(z)).unsqueeze(0))
        return self.out(out), mu, logvar


def plain_runner(s) -> Callable[[int], float]:
    """The plain loop on the same training data: a function that runs n steps and returns tokens/s."""
    cfg = s.cfg
    x_train = s.x_train.cpu()  # (N, T): padded to the corpus' longest line
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True
    )
    m = cfg.model
    vocab = s.vae.likelihood.params_per_dim
    model = PlainSentenceVAE(vocab, m.embedding, m.hidden[0], m.latent, m.word_dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    batches = forever(loader)
    state = {"step": 0}

    def run(n: int) -> float:
        tokens, t0 = 0, time.perf_counter()
        for _ in range(n):
            (x,) = next(batches)
            logits, mu, logvar = model(x)
            rec = F.cross_entropy(logits.reshape(-1, vocab), x.reshape(-1), ignore_index=PAD, reduction="sum")
            kl_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # (B, L)
            warmup = cfg.train.kl_warmup_steps
            beta = cfg.train.beta * min(1.0, state["step"] / warmup) if warmup else cfg.train.beta
            free_bits = cfg.train.free_bits
            kl = kl_dim.mean(0).clamp(min=free_bits).sum() if free_bits else kl_dim.sum(1).mean()
            loss = rec / len(x) + beta * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            state["step"] += 1
            tokens += int((x != PAD).sum())
        return tokens / (time.perf_counter() - t0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="words-char")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (turbovae auto, fp32, plain)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per side and round")
    parser.add_argument("--window-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = {}
    for precision in ("auto", "fp32"):
        cfg = resolve(args.config, overrides=[*args.overrides, f"train.precision={precision}"])
        runtime.seed_everything(cfg.train.seed)
        setups[precision] = setup(cfg)
    s = setups["fp32"]
    plain = plain_runner(s)
    plain(10)  # warm-up
    # the three sides take turns, so that a change in the machine's load moves them together; the
    # speed-up is the median over rounds of each round's ratio
    rounds = []
    for _ in range(args.rounds):
        row = {
            p: bench_turbovae(setups[p], args.windows, args.window_steps)["tokens_per_second"] for p in setups
        }
        row["plain"] = statistics.median(plain(args.window_steps) for _ in range(args.windows))
        rounds.append(row)
        print(json.dumps({k: round(v) for k, v in row.items()}), file=sys.stderr)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "device": runtime.describe(s.device),
        "precision_auto": setups["auto"].precision,
        "batch_size": s.cfg.train.batch_size,
        "padded_length": s.x_train.shape[1],
        "mean_tokens": float((s.x_train != PAD).sum(1).double().mean()),
        "rounds": rounds,
        "speedup": statistics.median(r["auto"] / r["plain"] for r in rounds),
        "speedup_fp32": statistics.median(r["fp32"] / r["plain"] for r in rounds),
    }
    for side in ("auto", "fp32", "plain"):
        result[f"{side}_tokens_per_second"] = statistics.median(r[side] for r in rounds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
