"""A convolutional ResNet-style VAE network for images (C, H, W), H and W divisible by 2^levels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..conditioning import one_hot
from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from .base import NOT_SHAPING, ModelConfig, check_widths
from .mlp import ACTIVATIONS


@dataclass(slots=True)
class ConvConfig(ModelConfig):
    """``model.*`` of the convolutional net."""

    name: str = field(default="conv", metadata=NOT_SHAPING)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # widths per resolution level

    def check(self) -> None:
        check_widths("channels", self.channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(conv(act(x))))."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 3, padding=1),
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upsample2x(nn.Module):
    """Nearest-neighbour ×2 upsampling of (N, C, H, W) as a broadcast and a reshape: the same values as
    ``nn.Upsample(scale_factor=2, mode="nearest")``, whose backward torch.compile (inductor, CPU, bf16
    autocast; torch 2.13) got wrong, zero gradients for every layer before it, so that a compiled conv
    VAE stopped learning (test NELBO 437 against 251 eager after one epoch of Fashion-MNIST)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class ConvNet(nn.Module):
    """Encoder: conv stem, then per level a ResBlock and a stride-2 conv; a linear head to 2·latent.

    Decoder mirrors it with nearest-neighbour upsampling + conv (no checkerboard artefacts of
    transposed convolutions) and outputs P·C channels at full resolution.

    With ``n_classes`` K > 0 it is conditional (a CVAE): the one-hot class y enters the encoder as K
    constant input planes and the decoder concatenated to z. K = 0 builds exactly the unconditional
    network.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent: int,
        params_per_dim: int,
        channels: list[int],
        activation: str = "silu",
        dropout: float = 0.0,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        if len(event_shape) != 3:
            raise ConfigError(
                f"model 'conv' needs images (C, H, W), but the data have shape {tuple(event_shape)}; "
                "use --model mlp for vectors"
            )
        c_in, height, width = event_shape
        levels = len(channels)
        if height % 2**levels or width % 2**levels:
            raise ConfigError(
                f"model 'conv' with {levels} levels needs H and W divisible by {2**levels}, "
                f"got {height}×{width}; use fewer entries in model.channels or --resize"
            )
        self.event_shape = tuple(event_shape)
        self.params_per_dim = params_per_dim
        self.bottom = (channels[-1], height // 2**levels, width // 2**levels)
        flat = channels[-1] * self.bottom[1] * self.bottom[2]
        act = ACTIVATIONS[activation]

        enc: list[nn.Module] = [nn.Conv2d(c_in + n_classes, channels[0], 3, padding=1)]
        for i, c in enumerate(channels):
            c_next = channels[min(i + 1, levels - 1)]
            enc += [ResBlock(c, activation), nn.Conv2d(c, c_next, 4, stride=2, padding=1)]
        enc += [act(), nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, 2 * latent)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Linear(latent + n_classes, flat), nn.Unflatten(1, self.bottom)]
        rev = list(reversed(channels))
        for i, c in enumerate(rev):
            c_next = rev[min(i + 1, levels - 1)]
            dec += [
                ResBlock(c, activation),
                Upsample2x(),
                nn.Conv2d(c, c_next, 3, padding=1),
            ]
        dec += [act(), nn.Conv2d(rev[-1], params_per_dim * c_in, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        if self.n_classes:  # the class as K constant planes: (B, C + K, H, W)
            planes = one_hot(y, self.n_classes, x)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], 1)
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)  # (B, L) each
        return DiagonalGaussian(loc, log_scale)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        lead = z.shape[:-1]  # (B,) or (S, B) for importance samples
        if self.n_classes:  # y (B,) broadcast over the sample dims: (..., B, L + K)
            code = one_hot(y, self.n_classes, z)
            z = torch.cat([z, code.expand(*lead, self.n_classes)], -1)
        out = self.decoder(z.reshape(-1, z.shape[-1]))  # (N, P·C, H, W)
        c, h, w = self.event_shape
        return out.view(*lead, self.params_per_dim, c, h, w)


def build(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: ConvConfig, n_classes: int = 0
) -> nn.Module:
    return ConvNet(event_shape, latent, params_per_dim, list(cfg.channels), cfg.activation, cfg.dropout,
                   n_classes=n_classes)  # fmt: skip
