"""The sentence VAE of Bowman et al. (2016): an RNN encoder to a Gaussian posterior, and an RNN
language model conditioned on z that reads the sentence shifted right (teacher forcing).

Inputs are token ids (B, T) padded with 0 (see ``data/text.py``). z conditions the decoder twice:
through its initial state and concatenated to every input. Word dropout (Bowman et al. §3.2)
replaces decoder *input* tokens by ``UNK`` with probability ``word_dropout`` while training, so
that the decoder cannot lean on the previous tokens alone and z has to carry the sentence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import BOS, EOS, PAD, UNK
from ..distributions import DiagonalGaussian
from ..errors import ConfigError, unknown_name
from .base import NOT_SHAPING, ModelConfig, check_widths

CELLS: dict[str, Callable[..., nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM}


@dataclass(slots=True)
class SentenceConfig(ModelConfig):
    """``model.*`` of the sentence VAE."""

    name: str = field(default="sentence", metadata=NOT_SHAPING)
    hidden: list[int] = field(default_factory=lambda: [400])  # the RNN's width, one entry per layer
    embedding: int = 64  # token embedding size
    cell: str = "gru"  # gru | lstm
    word_dropout: float = 0.0  # share of decoder input tokens replaced by <unk> while training

    def check(self) -> None:
        if self.cell not in CELLS:
            raise unknown_name("model.cell", self.cell, CELLS)
        if not self.embedding > 0:
            raise ConfigError(f"model.embedding must be > 0, got {self.embedding}")
        if not 0 <= self.word_dropout <= 1:
            raise ConfigError(f"model.word_dropout must be in [0, 1], got {self.word_dropout}")
        check_widths("hidden", self.hidden)


class SentenceNet(nn.Module):
    """Embedding → RNN encoder → (loc, log σ); z → initial state, and [embedding; z] → RNN → logits.

    ``decode(z, x)`` returns logits (..., V, T) for z (..., B, L) and tokens x (B, T): samples of z in
    front (IWAE) share the same x. ``generate(z, ...)`` decodes from z alone, token by token.
    """

    structure = "autoregressive"  # structures/autoregressive.py: decode reads the tokens (teacher forcing)
    special_tokens: ClassVar[dict[str, int]] = {"pad": PAD, "bos": BOS, "eos": EOS}  # ids an export names

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        latent: int,
        hidden: int = 256,
        layers: int = 1,
        embedding: int = 64,
        cell: str = "gru",
        word_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ConfigError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
        rnn = CELLS[cell]
        self.vocab_size, self.max_length, self.latent = vocab_size, max_length, latent
        self.hidden, self.layers, self.lstm = hidden, layers, cell == "lstm"
        self.word_dropout = word_dropout
        between = dropout if layers > 1 else 0.0
        self.embedding = nn.Embedding(vocab_size, embedding, padding_idx=PAD)
        self.encoder = rnn(embedding, hidden, layers, batch_first=True, dropout=between)
        self.posterior = nn.Linear(hidden, 2 * latent)
        self.initial = nn.Linear(latent, layers * hidden * (2 if self.lstm else 1))
        self.decoder = rnn(embedding + latent, hidden, layers, batch_first=True, dropout=between)
        self.output = nn.Linear(hidden, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        lengths = (x != PAD).sum(-1)  # (B,) tokens including the end marker
        out, _ = self.encoder(self.dropout(self.embedding(x)))  # (B, T, H)
        # a unidirectional RNN's output at the last real token has read that token and none of the
        # padding after it: the same state packing would give, without sorting or packing
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        h = out.gather(1, last).squeeze(1)  # (B, H)
        loc, log_scale = self.posterior(h).chunk(2, dim=-1)
        return DiagonalGaussian(loc, log_scale)

    def _state(self, z: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The decoder's initial state from z (N, L): (layers, N, H), or (h, c) for an LSTM."""
        s = torch.tanh(self.initial(z)).view(len(z), -1, self.hidden).transpose(0, 1)  # (layers·k, N, H)
        if self.lstm:
            h, c = s.chunk(2, dim=0)
            return h.contiguous(), c.contiguous()
        return s.contiguous()

    def decoder_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's inputs: ``BOS`` then x shifted right, with word dropout while training."""
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], dim=1)  # (B, T)
        if self.training and self.word_dropout > 0:
            # the module's RNG, like nn.Dropout: part of the checkpointed torch state, so resume is exact
            drop = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
            drop[:, 0] = False  # keep the start marker
            inputs = inputs.masked_fill(drop & (inputs != PAD), UNK)
        return inputs

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lead, (batch, length) = z.shape[:-1], x.shape
        zf = z.reshape(-1, self.latent)  # (N, L), N = samples · B
        copies = len(zf) // batch
        emb = self.dropout(self.embedding(self.decoder_inputs(x)))  # (B, T, E)
        emb = emb.unsqueeze(0).expand(copies, -1, -1, -1).reshape(len(zf), length, -1)
        inputs = torch.cat([emb, zf.unsqueeze(1).expand(-1, length, -1).to(emb.dtype)], dim=-1)
        out, _ = self.decoder(inputs, self._state(zf))  # (N, T, H)
        logits = self.output(self.dropout(out))  # (N, T, V)
        return logits.view(*lead, length, self.vocab_size).transpose(-1, -2)  # (..., V, T)

    @torch.no_grad()
    def generate(
        self,
        z: torch.Tensor,
        max_length: int | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = True,
    ) -> torch.Tensor:
        """Token ids (N, T) decoded from z (N, L): the most likely token at each step (``greedy``) or
        one drawn from the softmax, until the end marker; 0 after it."""
        length = max_length or self.max_length
        state = self._state(z)
        token = torch.full((len(z),), BOS, dtype=torch.long, device=z.device)
        out = torch.zeros(len(z), length, dtype=torch.long, device=z.device)
        done = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        never = torch.tensor([PAD, BOS], device=z.device)  # never targets of the likelihood
        for t in range(length):
            emb = self.embedding(token).unsqueeze(1)  # (N, 1, E)
            h, state = self.decoder(torch.cat([emb, z.unsqueeze(1).to(emb.dtype)], dim=-1), state)
            logits = self.output(h[:, 0]).float()  # (N, V)
            logits[:, never] = -torch.inf
            if greedy:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            token = token.masked_fill(done, PAD)
            out[:, t] = token
            done |= token == EOS
            if bool(done.all()):
                break
        return out


def build(event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: SentenceConfig) -> nn.Module:
    # text: event_shape = (T,), params_per_dim = the vocabulary size (the categorical likelihood's P)
    if len(event_shape) != 1 or params_per_dim < 4:
        raise ConfigError("model 'sentence' is for text: --data text:PATH or words, --likelihood categorical")
    if len(set(cfg.hidden)) != 1:
        raise ConfigError(f"model 'sentence' needs equal RNN widths in model.hidden, got {cfg.hidden}")
    return SentenceNet(params_per_dim, event_shape[0], latent, cfg.hidden[0], len(cfg.hidden), cfg.embedding,
                       cfg.cell, cfg.word_dropout, cfg.dropout)  # fmt: skip
