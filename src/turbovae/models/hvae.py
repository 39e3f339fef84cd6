"""A top-down hierarchical VAE for images, in the VDVAE / Efficient-VDVAE family (Child 2021; Hazami et
al. 2022), with NVAE's residual posterior (Vahdat & Kautz 2020).

Levels: ``model.channels`` gives one width per resolution level. Level 0 is the input's resolution
divided by ``patch`` (a p×p stride-p stem: space-to-depth); every further level halves it, rounding up
(28 → 14 → 7 → 4 → 2 → 1). The bottom-up encoder is a ResNet: the stem, ``enc_blocks[i]`` bottleneck
residual blocks at level i and a 2×2 stride-2 convolution between levels; it keeps the activations at
the end of each level. The top-down decoder starts from a learned constant at the lowest level and runs,
from the lowest level to level 0, ``groups[i]`` stochastic layers ("groups") per level, a 2×2 stride-2
transposed convolution between levels, and a 1×1 convolution (p×p stride-p transposed with a patch) to
the likelihood's parameters. Group l (top-down order) has ``latent_channels[i]`` channels at its level's
resolution and

    prior      p(z_l | z_<l)    = N(μ_p, σ_p) from the decoder state h (the top group: N(0, I))
    posterior  q(z_l | x, z_<l) = N(μ_p + Δμ, σ_p · Δσ) from [h, encoder activations]   (residual)
    update     h ← ResBlock(h + prior features + 1×1 conv(z_l))

so that each group's KL is analytic given z_<l and starts near 0: the prior head's last layer is
zero-initialised (p = N(0, I), no features), the posterior head's scaled by 0.1 (q ≈ p), and the last
layers of the residual branches and of the z projection by 1/√(number of layers) (VDVAE), so that the
decoder state is not swamped by noise at the start.

The flat latent vector the training loop draws noise for (``latent_size`` = Σ_l C_l·H_l·W_l) is the
concatenation of the groups' noise in top-down order, each flattened as (C, H, W). ``encode`` returns
the top group's posterior q(z_1 | x) (the one group whose prior is N(0, I)); ``decode`` takes either
the whole flat vector or the top group's values alone (the lower groups then take their prior means).

Conditional (``n_classes`` K > 0, a CVAE): the one-hot class y enters the top-down pass, which both the
priors and the posteriors read: a learned projection of it is added to the top state h_top, and before
every group another (zero-initialised) projection is added to the decoder state, so that every prior
p(z_l | z_<l, y) and posterior q(z_l | x, z_<l, y) sees the class. K = 0 builds exactly the
unconditional network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import one_hot
from ..distributions import DiagonalGaussian
from ..errors import ConfigError
from .base import NOT_SHAPING, ModelConfig, check_widths
from .mlp import ACTIVATIONS


@dataclass(slots=True)
class HVAEConfig(ModelConfig):
    """``model.*`` of the hierarchical VAE. The per-level lists run from the finest level; empty means
    the default: 1 group of ``model.latent`` channels and 1 encoder block per level."""

    name: str = field(default="hvae", metadata=NOT_SHAPING)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # widths per resolution level
    latent_channels: list[int] = field(default_factory=list)  # latent channels of each level's groups
    groups: list[int] = field(default_factory=list)  # stochastic groups per level
    enc_blocks: list[int] = field(default_factory=list)  # bottom-up residual blocks per level
    patch: int = 1  # the stem's patch size (2: level 0 at half the image's resolution)
    bottleneck: float = 0.25  # residual blocks' inner width, a fraction of the level's width
    softplus_scales: bool = True  # σ = softplus(·) ("gradient smoothing", Efficient-VDVAE) rather than exp(·)
    residual_posterior: bool = True  # q's parameters as offsets of the prior's (NVAE)
    kl_balance: bool = True  # NVAE's KL balancing across groups during KL warm-up

    def check(self) -> None:
        check_widths("channels", self.channels)
        for key, least in (("groups", 0), ("latent_channels", 1), ("enc_blocks", 0)):
            values = getattr(self, key)
            if values and (len(values) != len(self.channels) or any(v < least for v in values)):
                raise ConfigError(
                    f"model.{key} needs one entry >= {least} per level of model.channels "
                    f"({len(self.channels)}), got {values}"
                )
        if self.patch < 1 or not 0 < self.bottleneck <= 1:
            raise ConfigError("model.patch must be >= 1 and model.bottleneck in (0, 1]")


_LN2 = math.log(2.0)
# NHWC: oneDNN's bf16 convolutions run several times faster on it than on NCHW (and cuDNN prefers it);
# every tensor that enters a conv is kept in it, since a mix falls back to the slow layout
NHWC = torch.channels_last
# a stochastic layer's choice of z given its prior p and posterior q (None where x is not given):
# pick(group index, p, q) -> z (N, D) flattened
Pick = Callable[[int, DiagonalGaussian, DiagonalGaussian | None], torch.Tensor]


def _conv(c_in: int, c_out: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    if scale != 1.0:  # VDVAE: the last layer of a residual branch scaled down (0: zero-initialised)
        with torch.no_grad():
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.zero_()
    return conv


class Block(nn.Module):
    """VDVAE's bottleneck unit act → 1×1 → act → k×k → act → 1×1 (k = 3, or 1 at 2×2 and below), with
    a residual connection when ``residual``; ``last_scale`` scales the initial weights of the last conv."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, activation: str, residual: bool, size: int,
                 last_scale: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        act = ACTIVATIONS[activation]
        k = 3 if size > 2 else 1
        self.residual = residual
        self.body = nn.Sequential(
            act(),
            _conv(c_in, c_mid, 1),
            act(),
            _conv(c_mid, c_mid, k),
            act(),
            _conv(c_mid, c_out, 1, last_scale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 (a reduced-precision head's output under autocast), without a call when it is."""
    return t if t.dtype == torch.float32 else t.float()


def _group_sample(
    p_loc: torch.Tensor | None,
    p_raw: torch.Tensor | None,
    d_loc: torch.Tensor,
    d_raw: torch.Tensor,
    eps: torch.Tensor,
    softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, −KL (N, 1, 1, 1)) of a group: ``_GroupSample``."""
    return _GroupSample.apply(p_loc, p_raw, d_loc, d_raw, eps, softplus)


class _GroupSample(torch.autograd.Function):
    """One group's reparameterised sample and analytic KL with the residual posterior, as one autograd
    node with a hand-written backward: z = μ_q + σ_q·ε and −KL(q || p) per example (N, 1, 1, 1), from
    the raw head outputs. The same maths as building p and q and calling ``q.kl(p)`` (exact, not an
    approximation; float32 rounding differs), in 12 operators forward and 12 backward (the top group 8
    and 6), each an operator call on a CPU and a kernel launch on a GPU: with the unused log-ratio and
    casts the distributions' route took about 80 per group (fmnist-hvae-gpu: 2,041 -> 1,145 a step).

    With σ = s(raw) (softplus: log2(1 + 2^raw), or exp), σ_p = s(p_raw), Δσ = s(d_raw), r = Δμ/σ_p:

        q = N(μ_p + Δμ, σ_p·Δσ),   KL(q || p) = Σ ½(Δσ² − 1) − log Δσ + ½ r²

    (NVAE's residual KL: no difference of two log-scales, so it is also more accurate near q = p). The
    top group (p = N(0, I): ``p_loc`` and ``p_raw`` None) has σ_p = 1, μ_p = 0. The KL comes out negated
    (the caller negates all groups' at once: one operator instead of one per group)."""

    @staticmethod
    def forward(
        ctx: Any, p_loc: torch.Tensor | None, p_raw: torch.Tensor | None, d_loc: torch.Tensor,
        d_raw: torch.Tensor, eps: torch.Tensor, softplus: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        s_d = F.softplus(d_raw, beta=_LN2) if softplus else d_raw.exp()
        log_s_d = s_d.log() if softplus else d_raw
        if p_loc is None or p_raw is None:  # the top group: N(0, I)
            s_p, r = None, d_loc
            z = torch.addcmul(d_loc, eps, s_d)
        else:
            s_p = F.softplus(p_raw, beta=_LN2) if softplus else p_raw.exp()
            r = d_loc / s_p
            z = torch.addcmul(p_loc + d_loc, eps, s_p * s_d)
        # per dimension: −KL_d = log Δσ − ½(Δσ² − 1) − ½ r², each term small near q = p, then summed
        neg = torch.addcmul(log_s_d, s_d, s_d, value=-0.5).addcmul_(r, r, value=-0.5).add_(0.5)
        ctx.softplus = softplus
        ctx.save_for_backward(p_raw, d_raw, eps, s_p, s_d, r)
        return z, neg.sum(tuple(range(1, neg.dim())), keepdim=True)

    @staticmethod
    def backward(ctx: Any, g_z: torch.Tensor, g_neg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p_raw, d_raw, eps, s_p, s_d, r = ctx.saved_tensors
        g_sigma = g_z * eps  # ∂/∂σ_q
        # −∂KL/∂Δσ = 1/Δσ − Δσ; ∂z/∂Δσ = ε·σ_p
        w = torch.sub(s_d.reciprocal(), s_d)
        g_s_d = torch.addcmul(g_sigma if s_p is None else g_sigma * s_p, g_neg, w)
        g_d_raw = _scale_backward(g_s_d, d_raw, s_d, ctx.softplus)
        if s_p is None:
            return None, None, torch.addcmul(g_z, g_neg, r, value=-1.0), g_d_raw, None, None  # ∂KL/∂Δμ = Δμ
        r_over = r / s_p
        g_d_loc = torch.addcmul(g_z, g_neg, r_over, value=-1.0)  # ∂KL/∂Δμ = r/σ_p
        # −∂KL/∂σ_p = r²/σ_p; ∂z/∂σ_p = ε·Δσ
        g_s_p = torch.addcmul(g_sigma * s_d, g_neg, r * r_over)
        return g_z, _scale_backward(g_s_p, p_raw, s_p, ctx.softplus), g_d_loc, g_d_raw, None, None


def _scale_backward(
    grad: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor, softplus: bool
) -> torch.Tensor:
    """The gradient with respect to ``raw`` of σ = s(raw), given the gradient ``grad`` with respect to σ."""
    if softplus:  # torch's own softplus backward (its threshold included)
        return torch.ops.aten.softplus_backward(grad, raw, _LN2, 20.0)
    return grad * scale  # exp


class Group(nn.Module):
    """One stochastic layer of the top-down decoder (VDVAE's DecBlock with a residual posterior)."""

    def __init__(self, width: int, mid: int, z_channels: int, size: tuple[int, int], activation: str,
                 top: bool, n_groups: int, softplus: bool, residual_posterior: bool) -> None:  # fmt: skip
        super().__init__()
        h, w = size
        self.z_channels, self.size, self.top = z_channels, size, top
        self.softplus, self.residual_posterior = softplus, residual_posterior
        self.dims = z_channels * h * w
        side = min(h, w)
        # the prior head starts at zero (p = N(0, I), no features), the posterior head near zero (q ≈ p):
        # every group's KL starts near 0 and the decoder state is not swamped by noise
        self.posterior = Block(2 * width, mid, 2 * z_channels, activation, False, side, last_scale=0.1)
        self.prior = None if top else Block(width, mid, 2 * z_channels + width, activation, False, side,
                                            last_scale=0.0)  # fmt: skip
        self.z_proj = _conv(z_channels, width, 1, scale=1.0 / math.sqrt(n_groups))
        self.res = Block(width, mid, width, activation, True, side, last_scale=1.0 / math.sqrt(n_groups))

    def _log_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """log σ of a raw output. softplus (Efficient-VDVAE's gradient smoothing): σ = log2(1 + 2^raw),
        1 at raw = 0, whose log has a gradient bounded by ln 2 as σ → 0, where exp's log-σ takes
        unbounded steps; exp: σ = e^raw (VDVAE)."""
        return torch.log(F.softplus(raw, beta=_LN2)) if self.softplus else raw

    def _gaussian(self, loc: torch.Tensor, raw: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(loc.flatten(1), self._log_scale(raw.float()).flatten(1))

    def forward(
        self, h: torch.Tensor, feat: torch.Tensor | None, index: int, pick: Pick
    ) -> tuple[torch.Tensor, tuple[DiagonalGaussian | None, DiagonalGaussian, torch.Tensor]]:
        """(new h, (q or None, p, z)) for the decoder state h (N, width, H, W) and encoder activations."""
        n = h.shape[0]
        if self.prior is None:  # the top group: p = N(0, I)
            p = DiagonalGaussian.standard((n, self.dims), device=h.device)
            h_next = h
        else:
            p_loc, p_raw, features = self.prior(h).split([self.z_channels, self.z_channels, h.shape[1]], 1)
            p = self._gaussian(p_loc.float(), p_raw)
            h_next = h + features
        q = None
        if feat is not None:
            d_loc, d_raw = self.posterior(torch.cat([h, feat], 1)).chunk(2, 1)
            delta = self._gaussian(d_loc.float(), d_raw)
            if self.residual_posterior:  # NVAE: relative to the prior, so KL = 0 while the head is 0
                q = DiagonalGaussian(p.loc + delta.loc, p.log_scale + delta.log_scale)
            else:
                q = delta
        z = pick(index, p, q)  # (N, D)
        h_next = h_next + self.z_proj(z.view(n, self.z_channels, *self.size).to(h.dtype))
        return self.res(h_next), (q, p, z)

    def sample_kl(
        self, h: torch.Tensor, feat: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new h, −KL(q || p) (N, 1, 1, 1)) for the noise ``eps`` (N, D) of this group: ``forward`` with
        the posterior's sample, the sample and the KL one fused node (``_GroupSample``), no distributions
        built. For the residual posterior only (``HVAENet.kl_pass`` checks)."""
        n, c = h.shape[0], self.z_channels
        p_loc = p_raw = None
        h_next = h
        if self.prior is not None:
            out = self.prior(h)  # (N, 2C + width, H, W): μ_p, raw σ_p, features
            if out.dtype == torch.float32:
                p_loc, p_raw, features = out.split([c, c, h.shape[1]], 1)
            else:  # reduced precision (autocast): the two statistics cast to float32 in one operator
                stats, features = out.split([2 * c, h.shape[1]], 1)
                p_loc, p_raw = stats.float().split([c, c], 1)
            h_next = h + features
        d_loc, d_raw = _fp32(self.posterior(torch.cat([h, feat], 1))).split([c, c], 1)
        z, neg_kl = _group_sample(p_loc, p_raw, d_loc, d_raw, eps.view(n, c, *self.size), self.softplus)
        h_next = h_next + self.z_proj(z if z.dtype == h.dtype else z.to(h.dtype))
        return self.res(h_next), neg_kl


def _level_sizes(event_shape: tuple[int, ...], channels: list[int], groups: list[int],
                 latent_channels: list[int], enc_blocks: list[int], bottleneck: float,
                 patch: int) -> list[tuple[int, int]]:  # fmt: skip
    """The (H, W) of every resolution level, after checking that the options fit the images."""
    if len(event_shape) != 3:
        raise ConfigError(
            f"model 'hvae' needs images (C, H, W), but the data have shape {tuple(event_shape)}"
        )
    levels = len(channels)
    for key, values in (("groups", groups), ("latent_channels", latent_channels),
                        ("enc_blocks", enc_blocks)):  # fmt: skip
        if len(values) != levels:
            raise ConfigError(
                f"model.{key} needs one entry per resolution level ({levels}, as model.channels "
                f"{channels}), got {values}"
            )
        if any(v < 0 for v in values):
            raise ConfigError(f"model.{key} must not be negative, got {values}")
    if sum(groups) < 1:
        raise ConfigError(f"model.groups must hold at least one stochastic layer, got {groups}")
    if any(c < 1 for g, c in zip(groups, latent_channels, strict=True) if g):
        raise ConfigError(f"model.latent_channels must be >= 1 where there are groups, got {latent_channels}")
    if not 0 < bottleneck <= 4:
        raise ConfigError(f"model.bottleneck must be in (0, 4], got {bottleneck}")
    _, height, width = event_shape
    if patch < 1 or height % patch or width % patch:
        raise ConfigError(
            f"model.patch must be >= 1 and divide the image size, got {patch} for {height}×{width}"
        )
    # level 0 is the input's resolution over the patch size; then halving, rounded up: 28, 14, 7, 4, 2, 1
    sizes = [(-(-height // patch // 2**i), -(-width // patch // 2**i)) for i in range(levels)]
    if levels > 1 and sizes[-2] == (1, 1):
        raise ConfigError(
            f"model 'hvae': {height}×{width} images reach 1×1 after {sizes.index((1, 1)) + 1} levels, "
            f"but model.channels has {levels}"
        )
    return sizes


class HVAENet(nn.Module):
    """The network of the top-down hierarchical VAE (see the module docstring); its ``structure`` tells
    the VAE, the objectives and the evaluation to go top-down."""

    structure = "hierarchical"  # structures/hierarchical.py: its latents are groups, top-down

    def __init__(
        self,
        event_shape: tuple[int, ...],
        params_per_dim: int,
        channels: list[int],
        groups: list[int],
        latent_channels: list[int],
        enc_blocks: list[int],
        activation: str = "silu",
        bottleneck: float = 0.25,
        softplus_scales: bool = True,
        residual_posterior: bool = True,
        kl_balance: bool = True,
        patch: int = 1,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        sizes = _level_sizes(event_shape, channels, groups, latent_channels, enc_blocks, bottleneck, patch)
        c_in, height, width = event_shape
        levels = len(channels)
        self.event_shape = tuple(event_shape)
        self.params_per_dim = params_per_dim
        self.kl_balance = kl_balance
        mids = [max(4, round(c * bottleneck)) for c in channels]
        # the stem: a 3×3 conv, or with patch p > 1 a p×p stride-p conv (space-to-depth: no layer ever
        # runs at the input's resolution, which is where small convolutions cost most on a CPU)
        self.stem = (
            _conv(c_in, channels[0], 3) if patch == 1 else nn.Conv2d(c_in, channels[0], patch, stride=patch)
        )
        self.enc = nn.ModuleList(
            nn.Sequential(*(Block(channels[i], mids[i], channels[i], activation, True, min(sizes[i]),
                                  last_scale=1.0 / math.sqrt(max(1, sum(enc_blocks))))
                            for _ in range(enc_blocks[i])))
            for i in range(levels)
        )  # fmt: skip
        # between levels, learned resampling: a 2×2 stride-2 conv down (space-to-depth + 1×1 conv) and a
        # 2×2 stride-2 transposed conv up (1×1 conv + depth-to-space): every output pixel gets its own
        # features, which nearest-neighbour upsampling would not give a level without layers; odd sizes
        # are padded on the way down and cropped on the way up
        self.sizes = sizes
        self.down = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 2, stride=2) for i in range(levels - 1)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in range(levels - 1)
        )
        self.h_top = nn.Parameter(torch.zeros(1, channels[-1], *sizes[-1]))
        n_groups = sum(groups)
        self.groups = nn.ModuleList()
        self.group_level: list[int] = []  # the level of every group, top-down
        self.group_sizes: list[int] = []  # its latent dims C·H·W
        for level in reversed(range(levels)):
            for _ in range(groups[level]):
                self.group_sizes.append(latent_channels[level] * sizes[level][0] * sizes[level][1])
                self.groups.append(
                    Group(channels[level], mids[level], latent_channels[level], sizes[level], activation,
                          top=not self.group_level, n_groups=n_groups, softplus=softplus_scales,
                          residual_posterior=residual_posterior)
                )  # fmt: skip
                self.group_level.append(level)
        self.latent_size = sum(self.group_sizes)
        self.top_size = self.group_sizes[0]
        # KL balancing's α_l: each group's share of the latent dims (a buffer: no host copy in a CUDA graph)
        self.group_dims: torch.Tensor
        sizes_t = torch.tensor(self.group_sizes, dtype=torch.float32)
        self.register_buffer("group_dims", sizes_t / sizes_t.min(), persistent=False)
        self.out = nn.Sequential(
            ACTIVATIONS[activation](),
            _conv(channels[0], params_per_dim * c_in, 1)
            if patch == 1  # else depth-to-space: every pixel of a patch its own parameters
            else nn.ConvTranspose2d(channels[0], params_per_dim * c_in, patch, stride=patch),
        )
        if n_classes:  # the class: into the top state, and before every group (zero at the start)
            self.cond_top = nn.Linear(n_classes, channels[-1])
            self.cond_groups = nn.ModuleList(nn.Linear(n_classes, channels[lv]) for lv in self.group_level)
            for proj in self.cond_groups.parameters():
                nn.init.zeros_(proj)
        # NHWC weights (the loop converts only the plain conv model, and only on CUDA)
        self.to(memory_format=NHWC)  # type: ignore[call-overload]
        if sizes[-1] == (1, 1):  # a 1×1 top state: as its gradient (a sum over the batch) comes out, so
            # that the two have equal strides (the multi-tensor kernels of the guard and the optimiser
            # pair each parameter with its gradient; for a 1×1 H, W the layouts differ in strides only)
            with torch.no_grad():
                self.h_top.data = self.h_top.data.clone(memory_format=torch.contiguous_format)
        # floats of a decoded example: the decoder state at every level and the output, the size the
        # IWAE evaluation plans its chunks by (a rough scale: the memory a chunk needs stays small)
        self.activation_values = sum(c * h * w for c, (h, w) in zip(channels, sizes, strict=True)) + (
            params_per_dim * c_in * height * width
        )

    # ---- bottom-up ---------------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's activations at the end of every level, level 0 first: (B, W_i, H_i, W_i)."""
        h = self.stem((2.0 * x - 1.0).contiguous(memory_format=NHWC))
        feats = []
        for i, blocks in enumerate(self.enc):
            h = blocks(h)
            feats.append(h)
            if i < len(self.down):
                h = self.down[i](
                    F.pad(h, (0, h.shape[3] % 2, 0, h.shape[2] % 2))
                    if h.shape[2] % 2 or h.shape[3] % 2
                    else h
                )
        return feats

    # ---- top-down ----------------------------------------------------------------------------------

    def top_down(
        self,
        n: int,
        feats: list[torch.Tensor] | None,
        pick: Pick,
        stop_after: int | None = None,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[DiagonalGaussian | None, DiagonalGaussian, torch.Tensor]]]:
        """(likelihood parameters (n, P, C, H, W), [(q, p, z) per group]) for n examples; ``feats``
        (n examples each) give the posteriors, None runs the prior alone; ``y`` (n,): the class ids of
        a conditional network."""

        def run(
            index: int, group: Group, h: torch.Tensor, feat: torch.Tensor | None
        ) -> tuple[torch.Tensor, Any]:
            return group(h, feat, index, pick)

        return self._walk(n, feats is None, run, feats, stop_after, y)

    def _walk(
        self,
        n: int,
        prior_only: bool,
        run: Callable[[int, Group, torch.Tensor, Any], tuple[torch.Tensor, Any]],
        feats: list[torch.Tensor] | None,
        stop_after: int | None = None,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[Any]]:
        """The top-down pass: the decoder state through every group, ``run(index, group, h, feat)`` ->
        (new h, the group's record), and up the levels; (likelihood parameters, the records)."""
        h = self.h_top.expand(n, -1, -1, -1).contiguous(memory_format=NHWC)
        code = None
        if self.n_classes:
            code = one_hot(y, self.n_classes, self.h_top)  # (n, K)
            h = h + self.cond_top(code)[:, :, None, None].to(h.dtype)
        level = len(self.enc) - 1
        records = []
        for index, group in enumerate(self.groups):
            while self.group_level[index] < level:
                level -= 1
                h = self._up(h, level)
            if code is not None:
                h = h + self.cond_groups[index](code)[:, :, None, None].to(h.dtype)
            h, record = run(index, group, h, None if prior_only or feats is None else feats[level])  # type: ignore[arg-type]
            records.append(record)
            if stop_after is not None and len(records) >= stop_after:
                return h, records
        while level > 0:
            level -= 1
            h = self._up(h, level)
        c, height, width = self.event_shape
        return self.out(h).view(n, self.params_per_dim, c, height, width), records

    def _up(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """From level + 1 to ``level``: the transposed conv, cropped to the level's size."""
        height, width = self.sizes[level]
        h = self.up[level](h)
        return h if h.shape[2:] == (height, width) else h[:, :, :height, :width]

    def _slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(self.group_sizes, dim=-1))

    def posterior(
        self, feats: list[torch.Tensor], eps: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[DiagonalGaussian, DiagonalGaussian | None, torch.Tensor]]]:
        """Reparameterised samples z_l = μ_q + σ_q·ε_l, top-down, for noise ``eps`` (..., B, latent_size)
        (leading sample dims in front of the batch). Returns the likelihood parameters (..., B, P, *event)
        and, per group, (q, p, z) with shapes (..., B, D_l); p is None for the top group (N(0, I))."""
        lead, batch = eps.shape[:-1], feats[0].shape[0]
        n = math.prod(lead)
        if n != batch:  # importance samples: every example's activations once per sample
            feats = [
                f.unsqueeze(0)
                .expand(n // batch, *f.shape)
                .reshape(n, *f.shape[1:])
                .contiguous(memory_format=NHWC)
                for f in feats
            ]
            if y is not None:  # the class of every example, once per sample (sample-major, as feats)
                y = y.unsqueeze(0).expand(n // batch, batch).reshape(n)
        noise = self._slices(eps.reshape(n, -1).float())

        def pick(i: int, p: DiagonalGaussian, q: DiagonalGaussian | None) -> torch.Tensor:
            assert q is not None
            return q.loc + noise[i] * q.stddev

        params, records = self.top_down(n, feats, pick, y=y)

        def shaped(d: DiagonalGaussian) -> DiagonalGaussian:
            return DiagonalGaussian(d.loc.view(*lead, -1), d.log_scale.view(*lead, -1))

        out = []
        for index, (q, p, z) in enumerate(records):
            assert q is not None
            out.append((shaped(q), None if index == 0 else shaped(p), z.view(*lead, -1)))
        return params.view(*lead, *params.shape[1:]), out

    def kl_pass(
        self, feats: list[torch.Tensor], eps: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training terms' pass: (likelihood parameters (B, P, *event), KL(q(z_l | x, z_<l) ||
        p(z_l | z_<l)) of every group (B, G)) for noise ``eps`` (B, latent_size). The same as
        ``posterior`` followed by ``q.kl(p)`` per group (exact maths, float32 rounding apart), without the
        per-group distributions: each group's sample and KL are one fused node (``Group.sample_kl``)."""
        groups = cast(list[Group], list(self.groups))
        if eps.dim() != 2 or not all(g.residual_posterior for g in groups):
            params, records = self.posterior(feats, eps, y)
            return params, torch.stack([q.kl(p) for q, p, _ in records], -1)
        noise = self._slices(_fp32(eps))

        def run(index: int, group: Group, h: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, Any]:
            return group.sample_kl(h, feat, noise[index])

        params, neg_kls = self._walk(len(eps), False, run, feats, y=y)
        return params, torch.cat(neg_kls, 1).view(len(eps), len(neg_kls)).neg()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        """The top group's posterior q(z_1 | x), (B, top_size): the latents whose prior is N(0, I)."""
        records = self.top_down(len(x), self.features(x), lambda i, p, q: q.loc, stop_after=1, y=y)[1]  # type: ignore[union-attr]
        q = records[0][0]
        assert q is not None
        return q

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters (..., P, *event) for latents z (..., latent_size), all groups given,
        or z (..., top_size), the top group given and the lower groups at their prior means."""
        lead = z.shape[:-1]
        flat = z.reshape(-1, z.shape[-1]).float()
        if z.shape[-1] == self.latent_size:
            values = self._slices(flat)

            def pick(i: int, p: DiagonalGaussian, q: DiagonalGaussian | None) -> torch.Tensor:
                return values[i]
        elif z.shape[-1] == self.top_size:

            def pick(i: int, p: DiagonalGaussian, q: DiagonalGaussian | None) -> torch.Tensor:
                return flat if i == 0 else p.loc
        else:
            raise ValueError(
                f"hvae decodes z of {self.latent_size} (all groups) or {self.top_size} (the top group) "
                f"values, got {z.shape[-1]}"
            )
        if y is not None:  # y (B,) for z (..., B, latent): one class per decoded row
            y = y.expand(*lead).reshape(-1)
        params = self.top_down(len(flat), None, pick, y=y)[0]
        return params.view(*lead, *params.shape[1:])

    def sample_params(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Likelihood parameters (n, P, *event) of n ancestral draws z_l ~ p(z_l | z_<l), top-down, with
        the prior scales multiplied by ``temperature``."""
        device = self.h_top.device

        def pick(i: int, p: DiagonalGaussian, q: DiagonalGaussian | None) -> torch.Tensor:
            eps = torch.randn(p.loc.shape, generator=generator, device=device)
            return p.loc + temperature * eps * p.stddev

        return self.top_down(n, None, pick, y=y)[0]

    def reconstruct_params(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters for z_l = the mean of q(z_l | x, z_<l) in every group, top-down."""
        return self.top_down(len(x), self.features(x), lambda i, p, q: q.loc, y=y)[0]  # type: ignore[union-attr]


def build(
    event_shape: tuple[int, ...], latent: int, params_per_dim: int, cfg: HVAEConfig, n_classes: int = 0
) -> nn.Module:
    # model.latent: latent channels per group wherever model.latent_channels does not say
    levels = len(cfg.channels)
    return HVAENet(
        event_shape,
        params_per_dim,
        list(cfg.channels),
        groups=list(cfg.groups or [1] * levels),
        latent_channels=list(cfg.latent_channels or [latent] * levels),
        enc_blocks=list(cfg.enc_blocks or [1] * levels),
        activation=cfg.activation,
        bottleneck=cfg.bottleneck,
        softplus_scales=cfg.softplus_scales,
        residual_posterior=cfg.residual_posterior,
        kl_balance=cfg.kl_balance,
        patch=cfg.patch,
        n_classes=n_classes,
    )
