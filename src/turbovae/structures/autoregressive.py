"""The autoregressive structure: a flat Gaussian latent whose decoder also reads the data it scores
(text: each token predicted from z and the tokens before it, teacher forcing), so that decoding
without data is generation, token by token (sentence).

The network provides ``decode(z, x)``, ``generate(z, length, generator, greedy)``, and for export
``embedding``, ``decoder`` (the RNN), ``initial``, ``output``, ``decoder_inputs``, ``hidden``,
``layers``, ``lstm`` and ``special_tokens`` ({"pad", "bos", "eos"} ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Encoder, Graph
from .gaussian import FlatGaussian

if TYPE_CHECKING:
    from ..vae import VAE


def _initial_state(net: Any, z: torch.Tensor) -> torch.Tensor:
    """The text decoder's initial RNN state from z (B, L) as one tensor (S, B, H), S = layers (GRU) or
    2·layers (LSTM: h then c); SentenceNet._state without its len(z), which would fix the batch size."""
    return torch.tanh(net.initial(z)).unflatten(-1, (-1, net.hidden)).transpose(0, 1).contiguous()


def _rnn_state(net: Any, state: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if net.lstm:
        h, c = state.chunk(2, dim=0)
        return h.contiguous(), c.contiguous()
    return state.contiguous()


class TextDecoder(nn.Module):
    """(z (B, L), tokens (B, T)) → logits (B, V, T): position t's distribution given z and the tokens
    before t (teacher forcing), what ``vae.decode_params(z, tokens)`` computes."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        net: Any = self.vae.net
        emb = net.embedding(net.decoder_inputs(tokens))  # (B, T, E)
        inputs = torch.cat([emb, z.unsqueeze(1).expand(-1, tokens.shape[1], -1).to(emb.dtype)], dim=-1)
        out, _ = net.decoder(inputs, _rnn_state(net, _initial_state(net, z)))  # (B, T, H)
        return net.output(out).transpose(-1, -2)


class TextDecoderStep(nn.Module):
    """One step of generation: (z (B, L), token (B,), state (S, B, H)) → the next token's logits (B, V)
    and the new state. Where ``token`` is BOS (the first step) the state is computed from z and the
    given one is ignored (pass zeros)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, z: torch.Tensor, token: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        net: Any = self.vae.net
        bos = net.special_tokens["bos"]
        state = torch.where((token == bos).view(1, -1, 1), _initial_state(net, z), state)
        emb = net.embedding(token).unsqueeze(1)  # (B, 1, E)
        out, new = net.decoder(torch.cat([emb, z.unsqueeze(1).to(emb.dtype)], dim=-1), _rnn_state(net, state))
        new_state = torch.cat(new, dim=0) if net.lstm else new
        return net.output(out[:, 0]), new_state


def _tokens(vae: VAE, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids (B, T) as the data hold them: words of random length, the end marker, then padding."""
    special: dict[str, int] = vae.net.special_tokens  # type: ignore[assignment]
    length = vae.event_shape[0]
    vocab = int(vae.likelihood.params_per_dim)
    ids = torch.randint(4, max(vocab, 5), (batch, length), generator=gen).clamp(max=vocab - 1)
    ends = torch.randint(0, length, (batch,), generator=gen)
    position = torch.arange(length).expand(batch, -1)
    ids = torch.where(position == ends[:, None], torch.tensor(special["eos"]), ids)
    return torch.where(position > ends[:, None], torch.tensor(special["pad"]), ids)


class Autoregressive(FlatGaussian):
    name = "autoregressive"
    description = "a flat Gaussian latent and a decoder that reads the tokens before each one (sentence)"

    def decode_params(
        self, vae: VAE, z: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor | None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("an autoregressive decoder needs x in decode_params; decode/sample generate")
        return vae.net.decode(z, x)  # type: ignore[operator]

    def decode(self, vae: VAE, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The greedy decoding of z: token ids (..., T)."""
        ids = vae.net.generate(z.reshape(-1, vae.latent), vae.event_shape[0])  # type: ignore[operator]
        return ids.view(*z.shape[:-1], -1)

    def sample(
        self,
        vae: VAE,
        n: int,
        generator: torch.Generator | None,
        mean: bool,
        temperature: float,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token ids (n, T), decoded greedily (``mean``) or drawn token by token."""
        z = temperature * vae.prior(next(vae.parameters()).device).rsample((n,), generator=generator)
        return vae.net.generate(z, vae.event_shape[0], generator, greedy=mean)  # type: ignore[operator]

    def decoder_probe(self, vae: VAE) -> None:
        return None  # a recurrent decoder that reads the tokens: not linear layers over latents alone

    def export_graphs(self, vae: VAE) -> list[Graph]:
        """``encoder`` (token ids → posterior), ``decoder`` (z and the tokens → every position's logits)
        and ``decoder_step`` (one step of generation)."""
        net: Any = vae.net
        latent, rows = vae.latent, net.layers * (2 if net.lstm else 1)

        def step_in(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            token = torch.randint(2, 6, (b,), generator=g)  # BOS (2) or a few other ids
            return torch.randn(b, latent, generator=g), token, torch.randn(rows, b, net.hidden, generator=g)

        def decoder_in(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            return torch.randn(b, latent, generator=g), _tokens(vae, b, g)

        def encoder_in(b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (_tokens(vae, b, g),)

        encoder = Graph("encoder", Encoder(vae), encoder_in, ("tokens",), ("mean", "log_var"), (0,))
        decoder = Graph("decoder", TextDecoder(vae), decoder_in, ("z", "tokens"), ("logits",), (0, 0))
        outputs = ("logits", "state_out")
        step = Graph(
            "decoder_step", TextDecoderStep(vae), step_in, ("z", "token", "state"), outputs, (0, 0, 1)
        )
        return [encoder, decoder, step]

    def manifest(self, vae: VAE) -> dict[str, Any]:
        return {"inputs": "token ids, 0-padded", "special_tokens": dict(vae.net.special_tokens)}  # type: ignore[arg-type]

    def codec_refusal(self, vae: VAE) -> str | None:
        return "compression is for image and vector runs; this run is a text model"
