"""The autoencoder of latent diffusion (LDM's KL-f4/f8 and VQ-f4/f8, Stable Diffusion's VAE): ResNet
blocks with GroupNorm and SiLU, a downsampling conv per level but the last (f = 2^(levels - 1)), an
optional attention block in the middle, spatial latents (z_channels, H/f, W/f), and a discriminator
beside it (a patch-GAN, trained in the same step: ``structures/perceptual.py``).

The modules are named as diffusers names them (``encoder.down_blocks.0.resnets.0.conv1`` ...), so that
an export to ``diffusers.AutoencoderKL`` / ``VQModel`` and ``--init`` from one are a copy of the
state dict, not a re-implementation (``to_diffusers_config``, ``diffusers_state``, ``load_diffusers``).
Inputs are turbovae's [0, 1]; the network works in diffusers' [-1, 1] (x·2 − 1 in, (y + 1)/2 out)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import DiagonalGaussian
from ..errors import ConfigError, DataError
from .base import NOT_SHAPING, ModelConfig, check_widths
from .conv import Upsample2x


@dataclass(slots=True)
class AutoencoderConfig(ModelConfig):
    """``model.*`` of the KL autoencoder (``latent`` is z_channels, the latent channels per position)."""

    name: str = field(default="autoencoder-kl", metadata=NOT_SHAPING)
    latent: int = 4
    activation: str = "silu"
    likelihood: str = "laplace-learned"  # L1 read as a Laplace (gaussian-learned: MSE)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # block_out_channels, one per level
    layers_per_block: int = 1
    attention: bool = True  # the attention block in the middle (mid_block_add_attention)
    norm_groups: int = 0  # GroupNorm groups; 0: the largest divisor of every width up to 32
    # the loss (structures/perceptual.py); not shaping the autoencoder
    ms_ssim: float = field(default=0.0, metadata=NOT_SHAPING)  # weight of (1 − MS-SSIM) per pixel
    disc_weight: float = field(default=0.0, metadata=NOT_SHAPING)  # the patch-GAN's weight; 0: no GAN
    disc_start: int = field(default=0, metadata=NOT_SHAPING)  # training forward passes before the GAN
    disc_loss: str = field(default="hinge", metadata=NOT_SHAPING)  # hinge | vanilla (non-saturating)
    disc_layers: int = 3  # NLayerDiscriminator's n_layers
    disc_channels: int = 64  # its first layer's width (ndf)
    adaptive_weight: bool = field(default=True, metadata=NOT_SHAPING)  # LDM's ratio of gradient norms
    feature_matching: float = field(default=0.0, metadata=NOT_SHAPING)  # L1 of the disc's features
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9], metadata=NOT_SHAPING)
    disc_weight_decay: float = field(default=0.0, metadata=NOT_SHAPING)
    freeze: str = field(default="none", metadata=NOT_SHAPING)  # none | encoder (train the decoder only)
    init: str = field(default="", metadata=NOT_SHAPING)  # a diffusers directory to start from

    def check(self) -> None:
        check_widths("channels", self.channels)
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.norm_groups < 0 or (self.norm_groups and any(c % self.norm_groups for c in self.channels)):
            raise ConfigError(
                f"model.norm_groups = {self.norm_groups} must divide every width of model.channels "
                f"{self.channels} (0: chosen)"
            )
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ConfigError(f"model.disc_loss must be hinge or vanilla, got '{self.disc_loss}'")
        if self.freeze not in ("none", "encoder"):
            raise ConfigError(f"model.freeze must be none or encoder, got '{self.freeze}'")
        if self.disc_weight < 0 or self.ms_ssim < 0 or self.feature_matching < 0 or self.disc_start < 0:
            raise ConfigError("model.disc_weight, ms_ssim, feature_matching and disc_start must be >= 0")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ConfigError("model.disc_layers and model.disc_channels must be >= 1")


@dataclass(slots=True)
class VQAutoencoderConfig(AutoencoderConfig):
    """``model.*`` of the vector-quantised autoencoder (a VQModel)."""

    name: str = field(default="autoencoder-vq", metadata=NOT_SHAPING)
    latent: int = 3
    codebook_size: int = 256  # num_vq_embeddings
    codebook_dim: int = 0  # vq_embed_dim; 0: model.latent
    commitment: float = field(default=0.25, metadata=NOT_SHAPING)  # β of the commitment term
    codebook_decay: float = field(default=0.99, metadata=NOT_SHAPING)  # EMA of the codebook; 0: by gradient
    dead_after: int = field(default=100, metadata=NOT_SHAPING)  # steps unused before a code restarts

    def check(self) -> None:
        AutoencoderConfig.check(self)
        if self.codebook_size < 2 or self.codebook_dim < 0:
            raise ConfigError("model.codebook_size must be >= 2 and model.codebook_dim >= 0")
        if not 0.0 <= self.codebook_decay < 1.0:
            raise ConfigError(f"model.codebook_decay must be in [0, 1), got {self.codebook_decay}")


def norm_groups(channels: list[int], asked: int = 0) -> int:
    """GroupNorm's groups: ``asked``, else the largest divisor of every width that is at most 32."""
    return asked or math.gcd(32, *channels)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest ×2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = Upsample2x()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class Attention(nn.Module):
    """Single-head self-attention over the positions, with a GroupNorm before and a residual around."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Block(nn.Module):
    """A level: ``resnets``, then ``downsamplers`` or ``upsamplers`` (diffusers' names)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str, dropout: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, dropout) for i in range(layers)]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """ResNet block, attention (optional), ResNet block."""

    def __init__(self, channels: int, groups: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, dropout) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c_in: int, c_out: int, channels: list[int], layers: int, groups: int, attention: bool,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.conv_in = nn.Conv2d(c_in, channels[0], 3, padding=1)
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(
            [Block(channels[max(i - 1, 0)], c, layers, groups, "down" if i < last else "", dropout)
             for i, c in enumerate(channels)]
        )  # fmt: skip
        self.mid_block = MidBlock(channels[-1], groups, attention, dropout)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, c_in: int, c_out: int, channels: list[int], layers: int, groups: int, attention: bool,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(c_in, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention, dropout)
        last = len(rev) - 1
        self.up_blocks = nn.ModuleList(
            [Block(rev[max(i - 1, 0)], c, layers + 1, groups, "up" if i < last else "", dropout)
             for i, c in enumerate(rev)]
        )  # fmt: skip
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], c_out, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class NLayerDiscriminator(nn.Module):
    """The patch-GAN discriminator of pix2pix and taming-transformers: one logit per patch."""

    def __init__(self, c_in: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(c_in, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]  # fmt: skip
        seq += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, features: bool = False) -> Any:
        """Patch logits (B, 1, h, w); ``features``: the activations after each LeakyReLU instead."""
        if not features:
            return self.main(x)
        out = []
        for m in self.main:
            x = m(x)
            if isinstance(m, nn.LeakyReLU):
                out.append(x)
        return out


class AutoencoderNet(nn.Module):
    """LDM's autoencoder as a turbovae network: ``encode`` gives q(z | x) over the flattened spatial
    latents (B, z_channels·h·w), ``decode`` the likelihood's location (B, 1, C, H, W) in [0, 1] units.
    ``discriminator`` (when model.disc_weight > 0) is trained beside it (structures/perceptual.py)."""

    structure = "perceptual"
    quantised = False

    def __init__(self, event_shape: tuple[int, ...], cfg: AutoencoderConfig, params_per_dim: int) -> None:
        super().__init__()
        if len(event_shape) != 3:
            raise ConfigError(f"model '{cfg.name}' needs images (C, H, W), got data of shape {event_shape}")
        c, height, width = event_shape
        f = 2 ** (len(cfg.channels) - 1)
        if height % f or width % f:
            raise ConfigError(
                f"model '{cfg.name}' with {len(cfg.channels)} levels downsamples by {f}: H and W must be "
                f"divisible by {f}, got {height}x{width}; use --crop or fewer model.channels"
            )
        if params_per_dim != 1:
            raise ConfigError(
                f"model '{cfg.name}' predicts one value per pixel: use likelihood laplace-learned (L1), "
                "gaussian-learned or gaussian (MSE)"
            )
        self.cfg = cfg
        self.event_shape = tuple(event_shape)
        self.z_shape = (self.code_channels(cfg), height // f, width // f)
        self.latent_size = math.prod(self.z_shape)
        groups = norm_groups(list(cfg.channels), cfg.norm_groups)
        moments = cfg.latent if self.quantised else 2 * cfg.latent
        args = (list(cfg.channels), cfg.layers_per_block, groups, cfg.attention, cfg.dropout)
        self.encoder = Encoder(c, moments, *args)
        self.decoder = Decoder(cfg.latent, c, *args)
        self.build_bottleneck(cfg, moments)
        self.steps: torch.Tensor
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training passes (disc_start)
        if cfg.disc_weight > 0 and min(height, width) < 3 * 2**cfg.disc_layers:
            raise ConfigError(
                f"model.disc_layers = {cfg.disc_layers} needs images of at least {3 * 2**cfg.disc_layers} "
                f"pixels a side, got {height}x{width}: fewer model.disc_layers or a larger --crop"
            )
        self.discriminator = (
            NLayerDiscriminator(c, cfg.disc_channels, cfg.disc_layers) if cfg.disc_weight > 0 else None
        )

    def code_channels(self, cfg: AutoencoderConfig) -> int:
        """The channels of the latents ``encode`` describes and ``decode`` takes."""
        return cfg.latent

    def build_bottleneck(self, cfg: AutoencoderConfig, moments: int) -> None:
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent, cfg.latent, 1)

    def train(self, mode: bool = True) -> AutoencoderNet:
        super().train(mode)
        if self.cfg.freeze == "encoder":  # the frozen encoder's dropout stays off too
            self.encoder.eval()
        return self

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2·z_channels, h, w): the posterior's mean and log-variance, as diffusers computes them."""
        return self.quant_conv(self.encoder(x * 2.0 - 1.0))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.moments(x).chunk(2, dim=1)
        log_scale = 0.5 * logvar.clamp(-30.0, 20.0)  # diffusers' clamp of the log-variance
        return DiagonalGaussian(mean.flatten(1), log_scale.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's location (..., 1, C, H, W) for latents (..., latent_size)."""
        return self.decode_codes(z)

    def decode_codes(self, z: torch.Tensor) -> torch.Tensor:
        """``decode`` of latents that need no quantising (a VQ bottleneck's codes already)."""
        lead = z.shape[:-1]
        h = self.post_quant_conv(z.reshape(-1, *self.z_shape))
        out = self.decoder(h)
        return ((out + 1.0) * 0.5).view(*lead, 1, *self.event_shape)

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight (LDM's adaptive GAN weight compares gradient norms there)."""
        return self.decoder.conv_out.weight

    def frozen(self) -> list[nn.Module]:
        """The modules model.freeze keeps fixed."""
        return [self.encoder, self.quant_conv] if self.cfg.freeze == "encoder" else []

    # ---- diffusers ----------------------------------------------------------------------------------

    diffusers_class = "AutoencoderKL"

    def to_diffusers_config(self, scaling_factor: float) -> dict[str, Any]:
        cfg, levels = self.cfg, len(self.cfg.channels)
        return {
            "_class_name": self.diffusers_class,
            "in_channels": self.event_shape[0],
            "out_channels": self.event_shape[0],
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(cfg.channels),
            "layers_per_block": cfg.layers_per_block,
            "act_fn": "silu",
            "latent_channels": cfg.latent,
            "norm_num_groups": norm_groups(list(cfg.channels), cfg.norm_groups),
            "sample_size": self.event_shape[1],
            "scaling_factor": scaling_factor,
            "mid_block_add_attention": cfg.attention,
            **self.extra_diffusers_config(),
        }

    def extra_diffusers_config(self) -> dict[str, Any]:
        return {"force_upcast": True}

    def diffusers_state(self) -> dict[str, torch.Tensor]:
        """The autoencoder's weights under diffusers' names (the discriminator and buffers left out)."""
        names = {n for n, _ in self.named_parameters()}
        return {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()
                if k in names and not k.startswith("discriminator.")}  # fmt: skip

    def load_diffusers(self, folder: str | Path) -> None:
        """Weights from a diffusers directory (config.json + diffusion_pytorch_model.safetensors) whose
        configuration matches this network's; refuses one that does not, naming the difference."""
        from safetensors.torch import load_file

        root = Path(folder).expanduser()
        config_file, weights = root / "config.json", root / "diffusion_pytorch_model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise DataError(
                f"--init {folder}: expected a diffusers directory with config.json and "
                "diffusion_pytorch_model.safetensors (save_pretrained(..., safe_serialization=True))"
            )
        theirs = json.loads(config_file.read_text())
        mine = self.to_diffusers_config(1.0)
        for key in ("_class_name", "block_out_channels", "layers_per_block", "latent_channels",
                    "norm_num_groups", "in_channels", "mid_block_add_attention", "num_vq_embeddings",
                    "vq_embed_dim"):  # fmt: skip
            if key in mine and key in theirs and _norm(theirs[key]) != _norm(mine[key]):
                raise ConfigError(
                    f"--init {folder}: its {key} is {theirs[key]}, this model's is {mine[key]} "
                    "(set model.channels, model.layers_per_block, model.latent ... to match)"
                )
        state = load_file(str(weights))
        own = self.diffusers_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"--init {folder}: the weights do not match this model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        with torch.no_grad():
            params = dict(self.named_parameters())
            for k, v in state.items():
                if params[k].shape != v.shape:
                    want = tuple(params[k].shape)
                    raise ConfigError(f"--init {folder}: {k} is {tuple(v.shape)}, expected {want}")
                params[k].copy_(v)
        self.after_init()

    def after_init(self) -> None:
        """Called after weights were loaded from diffusers (the VQ codebook's EMA restarts from them)."""

    def init_from_data(self, mean: Any, class_mean: Any = None) -> None:
        """Once before training: ``model.init`` loads the diffusers weights; ``model.freeze`` fixes the
        encoder (its parameters stop requiring gradients, so the optimiser never sees them)."""
        if self.cfg.init:
            self.load_diffusers(self.cfg.init)
        for m in self.frozen():
            m.requires_grad_(False)
        self.train(self.training)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v


def build(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: AutoencoderConfig
) -> nn.Module:
    return AutoencoderNet(event_shape, cfg, params_per_dim)


def describe(model: dict[str, Any]) -> str:
    widths = ",".join(str(c) for c in model.get("channels", []))
    f = 2 ** (len(model.get("channels", [])) - 1)
    name = model.get("name", "autoencoder")
    return f"{name} f{f}, channels {widths}, z_channels {model.get('latent', '?')}"


def build_vq(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: VQAutoencoderConfig
) -> nn.Module:
    return VQAutoencoderNet(event_shape, cfg, params_per_dim)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (VQ-VAE) with a straight-through gradient; its codebook ``embedding``
    learned by gradient (``decay`` 0) or, by default, as an exponential moving average of the encoder
    outputs assigned to each code (van den Oord et al. 2017, appendix; Sonnet's VectorQuantizerEMA),
    codes unused for ``dead_after`` training passes restarted at encoder outputs of the batch (picked
    by a fixed rule from a counter: no random draws, so a resumed run restarts the same ones)."""

    def __init__(self, n: int, dim: int, decay: float, dead_after: int, commitment: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n, 1.0 / n)  # taming-transformers' init
        self.decay, self.dead_after, self.commitment = decay, dead_after, commitment
        if decay > 0:
            self.embedding.weight.requires_grad_(False)
        self.cluster_size: torch.Tensor
        self.embed_sum: torch.Tensor
        self.unused: torch.Tensor
        self.restarts: torch.Tensor
        self.register_buffer("cluster_size", torch.ones(n))
        self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("unused", torch.zeros(n, dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def codes(self, zf: torch.Tensor) -> torch.Tensor:
        """The nearest code of each row of ``zf`` (N, dim), as diffusers finds it (cdist, argmin)."""
        return torch.cdist(zf.float(), self.embedding.weight.float()).argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, dim, h, w) → (the quantised z, straight-through; the commitment (and, without EMA, the
        codebook) loss summed per example (B,); the codes (B, h·w))."""
        b, dim, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, dim).float()  # (B·h·w, dim)
        idx = self.codes(zf)
        q = F.embedding(idx, self.embedding.weight).float()
        loss = self.commitment * (zf - q.detach()).pow(2).view(b, -1).sum(1)
        if self.decay == 0:
            loss = loss + (zf.detach() - q).pow(2).view(b, -1).sum(1)
        elif self.training and torch.is_grad_enabled():
            self.ema_update(zf.detach(), idx)
        zq = zf + (q - zf).detach()
        return zq.view(b, h, w, dim).permute(0, 3, 1, 2).to(z.dtype), loss, idx.view(b, -1)

    @torch.no_grad()
    def ema_update(self, zf: torch.Tensor, idx: torch.Tensor) -> None:
        n = self.embedding.num_embeddings
        counts = torch.bincount(idx, minlength=n).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, zf)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every rank's codebook sees the global batch
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + n * 1e-5) * total  # Laplace smoothing
        weight = self.embed_sum / smoothed[:, None]
        # dead codes: restarted at encoder outputs of this batch, spread over it
        self.unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused >= self.dead_after)[:, None]
        rows = (torch.arange(n, device=zf.device) * 7919 + self.restarts * 104729) % len(zf)
        fresh = zf[rows]
        if distributed:
            torch.distributed.broadcast(fresh, 0)
        self.restarts.add_(1)
        self.embedding.weight.copy_(torch.where(dead, fresh, weight))
        self.embed_sum.copy_(torch.where(dead, fresh, self.embed_sum))
        self.cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.unused.masked_fill_(dead[:, 0], 0)

    def restart_from_weights(self) -> None:
        with torch.no_grad():
            self.embed_sum.copy_(self.embedding.weight)
            self.cluster_size.fill_(1.0)
            self.unused.zero_()


class VQAutoencoderNet(AutoencoderNet):
    """The VQ autoencoder (diffusers' VQModel): ``encode`` gives the encoder's continuous latents as a
    point mass (B, dim·h·w), ``decode`` quantises them to the nearest codes first, as VQModel does."""

    structure = "quantised"
    quantised = True
    diffusers_class = "VQModel"

    def code_channels(self, cfg: AutoencoderConfig) -> int:
        return getattr(cfg, "codebook_dim", 0) or cfg.latent

    def build_bottleneck(self, cfg: AutoencoderConfig, moments: int) -> None:
        assert isinstance(cfg, VQAutoencoderConfig)
        dim = self.code_channels(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent, dim, 1)
        self.quantize = VectorQuantizer(cfg.codebook_size, dim, cfg.codebook_decay, cfg.dead_after,
                                        cfg.commitment)  # fmt: skip
        self.post_quant_conv = nn.Conv2d(dim, cfg.latent, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.quant_conv(self.encoder(x * 2.0 - 1.0)).flatten(1)
        return DiagonalGaussian(h, torch.full_like(h, -30.0))  # a point mass at the encoder's output

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat latents (B, latent_size) → (codes' vectors (B, latent_size), straight-through; the
        commitment loss (B,); the codes (B, h·w))."""
        zq, loss, idx = self.quantize(z.reshape(-1, *self.z_shape))
        return zq.flatten(1), loss, idx

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        zq = self.quantise(z.reshape(-1, z.shape[-1]))[0]
        return self.decode_codes(zq).view(*lead, 1, *self.event_shape)

    def extra_diffusers_config(self) -> dict[str, Any]:
        cfg = self.cfg
        assert isinstance(cfg, VQAutoencoderConfig)
        return {"num_vq_embeddings": cfg.codebook_size, "vq_embed_dim": self.code_channels(cfg),
                "norm_type": "group", "lookup_from_codebook": False, "force_upcast": False}  # fmt: skip

    def after_init(self) -> None:
        self.quantize.restart_from_weights()
