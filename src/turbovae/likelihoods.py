"""Decoder likelihoods p(x | z): log_prob summed per example in nats, computed in float32.

The decoder outputs ``params`` of shape ``(..., P, *event_shape)``: P values per data dimension
(``params_per_dim``), leading dims are the batch and, for IWAE, the importance samples. ``x`` has
shape ``(..., *event_shape)`` and broadcasts against the leading dims of ``params``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError, unknown_name

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)
MIN_SCALE = 1e-3  # floor on a Gaussian's scale: per-pixel variances collapse to 0 on constant pixels


class Likelihood(nn.Module):
    """Base class. Subclasses set ``params_per_dim``, ``support`` and ``discrete``."""

    name = "base"
    summary = ""  # one line for --likelihood's help and docs/training.md
    params_per_dim = 1
    support = "real"  # "binary": {0, 1}; "unit": [0, 1]; "real": any finite value
    discrete = False  # a probability mass on the data, so bits/dim are defined
    # how a lossless codec codes data under it (compression.py's CODERS), None: it cannot
    codec: str | None = None

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)

    def _sum_event(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(-len(self.event_shape)).sum(-1)

    def _param(self, params: torch.Tensor, i: int) -> torch.Tensor:
        return params.select(-len(self.event_shape) - 1, i).float()

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over the event dims: shape ``params.shape[:-len(event)-1]``."""
        raise NotImplementedError

    def log_prob_eval(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``log_prob`` for evaluation (no gradient): the same values, by a faster form where one exists
        (it may work in place on its own buffers, which autograd cannot follow)."""
        return self.log_prob(x, params)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | params], shape ``(..., *event_shape)``."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample x ~ p(x | params)."""
        raise NotImplementedError

    def check_data(self, low: float, high: float, binary: bool, name: str) -> None:
        """Raise DataError when data with this range cannot be scored by this likelihood."""
        label = type(self).name
        if self.support == "binary" and not binary:
            raise DataError(
                f"likelihood '{label}' needs binary data, but '{name}' has values in [{low:g}, {high:g}] "
                "that are not all 0 or 1: use --binarize dynamic|static, --likelihood continuous-bernoulli "
                "or gaussian, or --likelihood bernoulli-grey for BCE on grey values (not a normalised "
                "likelihood; the pytorch/examples convention)"
            )
        if self.support in ("binary", "unit") and (low < 0.0 or high > 1.0):
            raise DataError(
                f"likelihood '{label}' needs data in [0, 1], but '{name}' has values in "
                f"[{low:g}, {high:g}]: rescale the data or use --likelihood gaussian"
            )


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _gumbel_argmax(
    logits: torch.Tensor, dim: int, generator: torch.Generator | None, keepdim: bool = False
) -> torch.Tensor:
    """A draw from softmax(logits) along ``dim`` by the Gumbel-max trick (an index)."""
    u = _uniform(logits, generator).clamp(min=1e-20)
    return (logits - torch.log(-torch.log(u))).argmax(dim, keepdim=keepdim)


def _logistic_noise(log_scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draws of logistic(0, e^log_scale), by the inverse CDF of a uniform kept off 0 and 1."""
    u = _uniform(log_scale, generator).clamp(1e-5, 1.0 - 1e-5)
    return log_scale.exp() * (torch.log(u) - torch.log1p(-u))


class Bernoulli(Likelihood):
    """Bernoulli on logits, for binary data: log p = x·η − softplus(η)."""

    name = "bernoulli"
    summary = "binary data, the Bernoulli mass (grey data are binarised, see --binarize)"
    support = "binary"
    discrete = True
    codec: str | None = "bernoulli"

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        x = x.float().expand_as(logits)
        return -self._sum_event(F.binary_cross_entropy_with_logits(logits, x, reduction="none"))

    def log_prob_eval(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """An exact, faster form for x ∈ {0, 1}, where IWAE evaluation spends most of its time.

        The binary cross-entropy costs several passes over the (samples, batch, dims) logits, each with a
        log1p. With s = 2x − 1, log p(x | η) = Σ log σ(sη) = Σ min(sη, 0) + Σ log σ(|sη|), and since
        σ(|t|) ∈ [½, 1), the last sum is the log of products of up to 120 factors, which cannot underflow
        in float32: one sigmoid per value and one log per group. Sums and products run in float32.
        """
        event = len(self.event_shape)
        logits = params.select(-event - 1, 0).flatten(-event)  # (..., B, D), maybe bf16
        signs = (2.0 * x.float() - 1.0).flatten(-event)  # (B, D)
        if logits.dim() < 3:
            return _bernoulli_block(logits, signs)
        # blocks of leading (sample) rows small enough to stay in the L2 cache across the passes
        lead = logits.flatten(0, -3)  # (S, B, D)
        step = max(1, _L2_VALUES // max(1, lead.shape[1] * lead.shape[2]))
        parts = [_bernoulli_block(lead[i : i + step], signs) for i in range(0, len(lead), step)]
        return torch.cat(parts).reshape(logits.shape[:-1])

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._param(params, 0))

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.mean(params)
        return (_uniform(p, generator) < p).float()


_L2_VALUES = 1 << 17  # logits per block of Bernoulli.log_prob_eval: its passes stay in the L2 cache


def _group_size(dims: int, largest: int = 120) -> int:
    """The largest divisor of ``dims`` that is at most ``largest``."""
    return max(g for g in range(1, min(dims, largest) + 1) if dims % g == 0)


def _bernoulli_block(logits: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    # float32, in a fresh buffer that the passes below may overwrite
    t = logits * signs if logits.dtype == torch.float32 else logits.float().mul_(signs)
    total = t.sum(-1)
    t.abs_()
    total.sub_(t.sum(-1)).mul_(0.5)  # Σ min(t, 0) = ½ (Σt − Σ|t|)
    dims = t.shape[-1]
    group = _group_size(dims)
    t.sigmoid_()
    if group < 8:  # no useful divisor: one log per value
        return total + t.log_().sum(-1)
    return total + t.unflatten(-1, (dims // group, group)).prod(-1).log_().sum(-1)


class BernoulliGrey(Bernoulli):
    """Binary cross-entropy on grey values in [0, 1], the pytorch/examples convention.

    Not a normalised density for non-binary x: its "NELBO" is not a bound on anything, so it is kept
    only for comparisons with code that uses it, and must be asked for by name.
    """

    name = "bernoulli-grey"
    summary = "grey values in [0, 1], binary cross-entropy as in pytorch/examples (not normalised)"
    support = "unit"
    discrete = False
    log_prob_eval = Likelihood.log_prob_eval  # grey values: the fast form holds for x ∈ {0, 1} only
    codec = None  # no probability mass on grey values


def _cb_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(η) of the continuous Bernoulli with logits η, where C(η) = η / tanh(η / 2)."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = math.log(2.0) + logits.pow(2) / 12.0  # log(2 (1 + η²/12 + O(η⁴)))
    return torch.where(small, taylor, exact)


class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1] for grey values."""

    name = "continuous-bernoulli"
    summary = "values in [0, 1], the continuous Bernoulli (a proper density on [0, 1])"
    support = "unit"

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        x = x.float().expand_as(logits)
        log_p = -F.binary_cross_entropy_with_logits(logits, x, reduction="none") + _cb_log_norm(logits)
        return self._sum_event(log_p)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits = self._param(params, 0)
        small = logits.abs() < 1e-2
        safe = torch.where(small, torch.ones_like(logits), logits)
        # E[x] = σ(η) / tanh(η/2) − 1/η, with limit ½ + η/12 at η = 0
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1.0 / safe
        return torch.where(small, 0.5 + logits / 12.0, exact)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = self._param(params, 0)
        u = _uniform(logits, generator)
        small = logits.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(logits), logits)
        # inverse CDF: x = log(1 + u (e^η − 1)) / η, written to avoid overflow for large |η|
        positive = 1.0 + torch.log(u + (1.0 - u) * torch.exp(-safe.clamp(min=0))) / safe
        negative = torch.log1p(u * torch.expm1(safe.clamp(max=0))) / safe
        x = torch.where(safe > 0, positive, negative)
        return torch.where(small, u, x).clamp(0.0, 1.0)


class Gaussian(Likelihood):
    """Gaussian with a fixed scale σ (``likelihood_scale``); the decoder outputs the mean."""

    name = "gaussian"
    summary = "real values, a Gaussian of fixed σ = model.likelihood_scale"

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        super().__init__(event_shape)
        self.log_scale: torch.Tensor
        self.register_buffer("log_scale", torch.tensor(math.log(scale)))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._param(params, 0)
        return loc, self.log_scale.float().expand_as(loc)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        standardized = (x.float() - loc) * torch.exp(-log_scale)
        return self._sum_event(-0.5 * standardized.pow(2) - log_scale - 0.5 * _LOG_2PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._param(params, 0)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        eps = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + eps * log_scale.exp()


class GaussianLearned(Gaussian):
    """Gaussian with one learned scale shared by all dimensions, initialised at ``likelihood_scale``."""

    name = "gaussian-learned"
    summary = "real values, a Gaussian with one learned σ (starting at model.likelihood_scale)"

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        Likelihood.__init__(self, event_shape)
        # softplus keeps σ ≥ MIN_SCALE with smooth gradients (no clamp that stops learning)
        init = math.log(math.expm1(max(scale - MIN_SCALE, 1e-6)))
        self.raw_scale = nn.Parameter(torch.tensor(init))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._param(params, 0)
        return loc, torch.log(F.softplus(self.raw_scale.float()) + MIN_SCALE).expand_as(loc)


class LaplaceLearned(GaussianLearned):
    """Laplace with one learned scale b shared by all dimensions: −log p = |x − μ| / b + log 2b per value,
    the L1 loss read as a likelihood (LDM's ``nll = |x − x̂| / exp(logvar) + logvar``, up to log 2)."""

    name = "laplace-learned"
    summary = "real values, a Laplace with one learned scale (L1 as a likelihood; autoencoders)"

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        return self._sum_event(-(x.float() - loc).abs() * torch.exp(-log_scale) - log_scale - _LOG_2)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        loc, log_scale = self._loc_log_scale(params)
        u = torch.rand(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype) - 0.5
        return loc - log_scale.exp() * u.sign() * torch.log1p(-2.0 * u.abs()).clamp(min=-50.0)


class GaussianPixel(Gaussian):
    """Gaussian whose mean and scale the decoder outputs for every dimension (per-pixel variance)."""

    name = "gaussian-pixel"
    summary = "real values, a Gaussian with a learned σ per dimension"
    params_per_dim = 2

    def __init__(self, event_shape: tuple[int, ...], scale: float = 0.1) -> None:
        Likelihood.__init__(self, event_shape)
        # offset so that a zero decoder output starts at σ = scale
        self.raw_offset = math.log(math.expm1(max(scale - MIN_SCALE, 1e-6)))

    def _loc_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = F.softplus(self._param(params, 1) + self.raw_offset) + MIN_SCALE
        return self._param(params, 0), torch.log(scale)


def _dims(dims: list[int]) -> slice | torch.Tensor:
    """A slice when ``dims`` are consecutive (a view, no gather and no scatter in the backward)."""
    if dims and dims == list(range(dims[0], dims[0] + len(dims))):
        return slice(dims[0], dims[0] + len(dims))
    return torch.tensor(dims, dtype=torch.long)


class Mixed(Likelihood):
    """Table rows in the transformed space of ``data/table_transform.py``: a Gaussian with a learned
    σ per dim (floored at 10⁻³) on the continuous dims, a softmax over every one-hot block
    (categories, booleans, the mode of mode-specific normalisation, missing indicators).

    ``log_prob`` is summed per row in nats: densities of the normalised values plus log-masses of the
    categories. Dims whose gate (their column's missing indicator) is on are not scored, so a missing
    value counts only through its indicator. The decoder outputs one value per dim (P = 1): the mean
    of a Gaussian dim, the logit of a one-hot dim. The layout is read from
    ``data_meta["table"]["layout"]``.

    All blocks are scored together, whatever their sizes: log-sum-exp per block as
    m_b + log Σ_{d∈b} exp(η_d − m_b), with the block maxima m_b taken without gradient and the sums
    as one matrix product with the (dims × blocks) membership matrix, so a table costs the same
    handful of tensor ops however many columns it has.
    """

    name = "mixed"
    summary = "tables, a Gaussian for each number and a categorical for each category"
    uses_data_meta = True

    def __init__(
        self, event_shape: tuple[int, ...], scale: float = 0.1, data_meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(event_shape)
        table = (data_meta or {}).get("table")
        if not isinstance(table, dict) or "layout" not in table:
            raise ConfigError(
                "likelihood 'mixed' is for tables: use --data csv:PATH (or a .csv/.parquet file), "
                "or another --likelihood"
            )
        layout = table["layout"]
        if self.event_shape != (int(layout["dims"]),):
            raise ConfigError(
                f"likelihood 'mixed': the table has {layout['dims']} transformed dims, but the data have "
                f"shape {self.event_shape}"
            )
        blocks = layout["blocks"]  # [start, size, gate]
        block_dims = [d for start, size, _ in blocks for d in range(start, start + size)]
        self.n_cont, self.n_blocks = len(layout["continuous"]), len(blocks)
        self.cont: slice | torch.Tensor
        self.onehot: slice | torch.Tensor
        width = max((size for _, size, _ in blocks), default=1)
        padded = torch.zeros(len(blocks), width, dtype=torch.long)  # block b's positions in block_dims
        pad = torch.ones(len(blocks), width, dtype=torch.bool)
        block_of: list[int] = []  # the block of every one-hot dim
        for b, (_, size, _) in enumerate(blocks):
            padded[b] = len(block_of)  # the padding repeats the block's first position: same maximum
            padded[b, :size] = torch.arange(len(block_of), len(block_of) + size)
            pad[b, :size] = False
            block_of += [b] * size
        cont_gate = torch.tensor(layout["continuous_gate"], dtype=torch.long)
        block_gate = torch.tensor([gate for _, _, gate in blocks], dtype=torch.long)
        membership = torch.zeros(len(block_of), len(blocks))
        membership[torch.arange(len(block_of)), torch.tensor(block_of, dtype=torch.long)] = 1.0
        # derived from data_meta, so not part of the state dict
        for key, value in {
            "cont_gate": cont_gate.clamp(min=0),
            "cont_gated": (cont_gate >= 0).float(),
            "block_gate": block_gate.clamp(min=0),
            "block_gated": (block_gate >= 0).float(),
            "membership": membership,  # (Db, nb)
            "block_of": torch.tensor(block_of, dtype=torch.long),  # (Db,)
            "padded": padded.flatten(),  # (nb·W,)
            "pad": pad,  # (nb, W)
        }.items():
            self.register_buffer(key, value, persistent=False)
        for key, dims in (("cont", _dims(layout["continuous"])), ("onehot", _dims(block_dims))):
            if isinstance(dims, torch.Tensor):
                self.register_buffer(key, dims, persistent=False)  # moves with the module
            else:
                setattr(self, key, dims)
        self.cont_gate: torch.Tensor
        self.cont_gated: torch.Tensor
        self.block_gate: torch.Tensor
        self.block_gated: torch.Tensor
        self.membership: torch.Tensor
        self.block_of: torch.Tensor
        self.padded: torch.Tensor
        self.pad: torch.Tensor
        self.cont_is_gated = bool((cont_gate >= 0).any())
        self.blocks_are_gated = bool((block_gate >= 0).any())
        init = math.log(math.expm1(max(scale - MIN_SCALE, 1e-6)))
        self.raw_scale = nn.Parameter(torch.full((self.n_cont,), init))

    def scale(self) -> torch.Tensor:
        """σ of every continuous dim, (Kc,)."""
        return F.softplus(self.raw_scale.float()) + MIN_SCALE

    def _padded(self, logits: torch.Tensor, masked: bool = True) -> torch.Tensor:
        """(..., nb, W) the one-hot logits (..., Db) by block; the padding is −inf (``masked``) or a
        copy of one of the block's logits (enough for the maximum, and cheaper)."""
        out = logits.index_select(-1, self.padded).unflatten(-1, self.pad.shape)  # 4× faster than [..., idx]
        return out.masked_fill(self.pad, -math.inf) if masked else out

    def _take(self, t: torch.Tensor, dims: slice | torch.Tensor) -> torch.Tensor:
        return t[..., dims] if isinstance(dims, slice) else t.index_select(-1, dims)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = self._param(params, 0)  # (..., D)
        x = x.float()
        total = p.new_zeros(p.shape[:-1])
        if self.n_cont:
            scale = self.scale()
            z = (self._take(x, self.cont) - self._take(p, self.cont)) / scale
            lp = -0.5 * z * z - scale.log() - 0.5 * _LOG_2PI  # (..., Kc)
            if self.cont_is_gated:
                lp = lp * (1.0 - x.index_select(-1, self.cont_gate) * self.cont_gated)
            total = total + lp.sum(-1)
        if self.n_blocks:
            logits, xb = self._take(p, self.onehot), self._take(x, self.onehot)  # (..., Db)
            top = self._padded(logits.detach(), masked=False).amax(-1)  # (..., nb): a shift, no gradient
            sums = (logits - top.index_select(-1, self.block_of)).exp() @ self.membership  # (..., nb)
            lse = sums.log() + top
            if self.blocks_are_gated:
                chosen = (xb * logits) @ self.membership  # x is one-hot: the chosen logit per block
                lp = (chosen - lse) * (1.0 - x.index_select(-1, self.block_gate) * self.block_gated)
                total = total + lp.sum(-1)
            else:
                total = total + (xb * logits).sum(-1) - lse.sum(-1)
        return total

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Gaussian dims: the mean; one-hot dims: the probabilities of the block's softmax."""
        p = self._param(params, 0)
        out = p.clone()
        if self.n_blocks:
            probs = torch.softmax(self._padded(self._take(p, self.onehot)), -1).flatten(-2)  # (..., nb·W)
            out[..., self.onehot] = probs[..., ~self.pad.flatten()]
        return out

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian dims: mean + σ·ε; every one-hot block: one category drawn from its softmax."""
        p = self._param(params, 0)
        out = p.clone()
        if self.n_cont:
            eps = torch.randn((*p.shape[:-1], self.n_cont), generator=generator, device=p.device)
            out[..., self.cont] = self._take(p, self.cont) + eps * self.scale()
        if self.n_blocks:
            logits = self._padded(self._take(p, self.onehot))  # (..., nb, W)
            choice = _gumbel_argmax(logits, -1, generator, keepdim=True)
            onehot = torch.zeros_like(logits).scatter_(-1, choice, 1.0).flatten(-2)
            out[..., self.onehot] = onehot[..., ~self.pad.flatten()]
        return out


class Categorical(Likelihood):
    """A softmax over the vocabulary at every position of a token sequence (text, ``data/text.py``).

    ``x`` holds token ids (..., T) padded with 0; the decoder outputs logits (..., V, T) (P = V, the
    vocabulary size, read from ``data_meta["text"]["vocab"]``). ``log_prob`` sums the log-masses of the
    tokens at the non-padding positions (x != 0, the end marker included): nats per sentence. ``x``
    may be shorter than the data's T (batches are cut to their longest line); the logits match it.
    """

    name = "categorical"
    summary = "text, a softmax over the vocabulary at every position"
    support = "tokens"
    # a probability mass, but bits per (padded) dimension mean nothing for text: text runs report
    # nats per token and perplexity instead
    discrete = False
    uses_data_meta = True

    def __init__(
        self, event_shape: tuple[int, ...], scale: float = 0.1, data_meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(event_shape)
        text = (data_meta or {}).get("text")
        if not isinstance(text, dict) or "vocab" not in text:
            raise ConfigError(
                "likelihood 'categorical' is for text: use --data text:PATH or --data words, or another "
                "--likelihood"
            )
        self.params_per_dim = len(text["vocab"])

    def _logits(self, params: torch.Tensor) -> torch.Tensor:
        """(..., T, V) float32: a view when the decoder computed (..., T, V) and transposed it."""
        return params.movedim(-2, -1).float()

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits = self._logits(params)  # (..., T, V)
        target = x.expand(logits.shape[:-1])  # (..., T): samples in front broadcast
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=0,
                              reduction="none")  # fmt: skip
        return -nll.view(target.shape).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The most likely token at every position (the mode; a mean of token ids means nothing)."""
        return self._logits(params).argmax(-1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = self._logits(params)
        return _gumbel_argmax(logits, -1, generator)

    def check_data(self, low: float, high: float, binary: bool, name: str) -> None:
        if low < 0 or high >= self.params_per_dim:
            raise DataError(
                f"likelihood 'categorical' needs token ids in [0, {self.params_per_dim}), but '{name}' has "
                f"values in [{low:g}, {high:g}]"
            )


# ---- 8-bit data: a probability mass over the 256 values of every pixel ---------------------------------

BYTE_LEVELS = 256


def _check_bytes(label: str, levels: int | None, low: float, high: float, binary: bool, name: str) -> None:
    """The 8-bit likelihoods score x = byte / 255: they need bytes (uint8 with values 0..255)."""
    if low < 0.0 or high > 1.0:
        raise DataError(
            f"likelihood '{label}' needs 8-bit data (bytes scaled to [0, 1]), but '{name}' has values in "
            f"[{low:g}, {high:g}]: use it for uint8 images, or --likelihood gaussian for real values"
        )
    if binary or levels == BYTE_LEVELS:
        return
    what = f"{levels} levels (0..{levels - 1})" if levels else "floating-point values"
    raise DataError(
        f"likelihood '{label}' needs 8-bit data (uint8, 256 levels), but '{name}' has {what}: use it for "
        "8-bit images (IDX, PNG/JPEG folders, uint8 .npz), or --likelihood bernoulli|continuous-bernoulli"
    )


def _levels_of(data_meta: dict[str, Any] | None) -> int | None:
    """The number of stored values of byte data (``Dataset.meta["levels"]``), None when unknown."""
    levels = (data_meta or {}).get("levels")
    return int(levels) if levels is not None else None


def _logistic_log_mass(y: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of y) under a logistic(loc, e^log_scale) discretised to the 256 bins of [−1, 1] (width
    2/255), the edge bins reaching to ∓∞ so that the 256 masses sum to 1; broadcasts its arguments."""
    inv_scale = torch.exp(-log_scale)
    half = 1.0 / (BYTE_LEVELS - 1)  # half a bin
    upper = inv_scale * (y - loc + half)  # standardised bin edges
    lower = inv_scale * (y - loc - half)
    # log(σ(u) − σ(l)) = −softplus(−u) − softplus(l) + log(1 − e^(l−u)): exact and stable in both tails
    log_cdf_upper, log_sf_lower = -F.softplus(-upper), -F.softplus(lower)  # log σ(u), log(1 − σ(l))
    log_mass = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(lower - upper))
    log_mass = torch.where(y < -1.0 + half, log_cdf_upper, log_mass)  # x = 0: P(Y < −1 + h)
    return torch.where(y > 1.0 - half, log_sf_lower, log_mass)  # x = 255: P(Y > 1 − h)


def _clipped_logistic_mean(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E[clip(Y, −1, 1)] for Y ~ logistic(loc, scale): 1 − s·(softplus((1 − μ)/s) − softplus((−1 − μ)/s)),
    the mean of the discretised logistic up to O(bin²)."""
    return 1.0 - scale * (F.softplus((1.0 - loc) / scale) - F.softplus((-1.0 - loc) / scale))


def _to_grid(y: torch.Tensor) -> torch.Tensor:
    """y ∈ [−1, 1] rounded to the nearest of the 256 values, as x = byte / 255 ∈ [0, 1]."""
    return torch.round((y + 1.0) / 2.0 * (BYTE_LEVELS - 1)) / (BYTE_LEVELS - 1)


class DiscretizedLogistic(Likelihood):
    """A mixture of K discretised logistics (Salimans et al. 2017, PixelCNN++), for 8-bit data.

    x = byte / 255 is mapped to y = 2x − 1 ∈ [−1, 1]; the 256 values are bins of width 2/255, the edge
    bins reaching to ∓∞, so the masses sum to 1 exactly (up to rounding). Log-scales are clamped below
    at −7, as PixelCNN++ does. ``components`` K is ``model.mixtures``. log_prob is a mass in nats, so
    bits/dim are exact.

    **Colour images** (event shape (3, H, W)): the three channels of a pixel are coupled as in
    PixelCNN++ and VDVAE's DmolNet. One mixture over the K components per pixel, shared by the
    channels, and the means of G and B depend linearly on the values of the earlier channels:
    μ_G = μ'_G + α·y_R, μ_B = μ'_B + β·y_R + γ·y_G with α, β, γ = tanh(raw coefficients), per
    component and pixel. log p(pixel) = log Σ_k π_k P_k(x_R) P_k(x_G | x_R) P_k(x_B | x_R, x_G): a mass
    over the 256³ colours of a pixel. Channels independent given z make every pixel's colour a product
    of three marginals, so the strong correlation of R, G and B in natural images (grey and
    near-grey areas) has to be carried by the latents, value by value; the coupling puts it in the
    likelihood at the cost of 3 coefficients per component, which is why PixelCNN++ and VDVAE use it.
    The decoder outputs P = 4K values per channel, in the order [logits K, loc K, log_scale K,
    coeff K]: the logits are read from channel 0's slot only (channels 1 and 2's logit slots are
    unused), and the coeff slots of channels 0, 1, 2 hold the raw α, β, γ.

    **Any other event** (grey images (1, H, W), other channel counts, tables): P = 3K values per
    dimension, [logits K, loc K, log_scale K], one mixture per value and the values independent given z.
    """

    name = "discretized-logistic"
    codec = "logistic"
    summary = "8-bit images, a mixture of model.mixtures discretised logistics per value"
    support = "unit"
    discrete = True
    params_per_dim = 3 * 10  # the uncoupled layout with 10 components; the instance's value is the truth
    MIN_LOG_SCALE = -7.0

    def __init__(
        self, event_shape: tuple[int, ...], components: int = 10, data_meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(event_shape)
        if components < 1:
            raise ConfigError(
                f"likelihood 'discretized-logistic' needs model.mixtures >= 1, got {components}"
            )
        self.components = components
        # RGB images: PixelCNN++'s channel coupling (a 3-column table or other shapes are not coupled)
        self.coupled = len(self.event_shape) == 3 and self.event_shape[0] == 3
        self.params_per_dim = (4 if self.coupled else 3) * components
        self.levels = _levels_of(data_meta)

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, loc, log_scale), each (..., K, *event), float32 (the uncoupled layout)."""
        axis = -len(self.event_shape) - 1
        logits, loc, log_scale = params.float().chunk(3, dim=axis)
        return logits, loc, log_scale.clamp(min=self.MIN_LOG_SCALE)

    def _split_coupled(
        self, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (..., K, H, W), loc, log_scale, coeff (..., K, 3, H, W)), float32; coeff = tanh(raw),
        its channels 0, 1, 2 being α, β, γ."""
        logits, loc, log_scale, coeff = params.float().chunk(4, dim=-4)  # (..., K, 3, H, W) each
        return logits[..., 0, :, :], loc, log_scale.clamp(min=self.MIN_LOG_SCALE), torch.tanh(coeff)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if self.coupled:
            return self._log_prob_coupled(x, params)
        logits, loc, log_scale = self._split(params)
        axis = -len(self.event_shape) - 1
        y = (2.0 * x.float() - 1.0).unsqueeze(axis)  # (..., 1, *event) in [−1, 1]
        log_mass = _logistic_log_mass(y, loc, log_scale)
        log_p = torch.logsumexp(log_mass + F.log_softmax(logits, dim=axis), dim=axis)  # (..., *event)
        return self._sum_event(log_p)

    def _log_prob_coupled(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        logits, loc, log_scale, coeff = self._split_coupled(params)
        y = (2.0 * x.float() - 1.0).unsqueeze(-4)  # (..., 1, 3, H, W)
        y_r, y_g, y_b = y.unbind(-3)  # (..., 1, H, W)
        mu_r, mu_g, mu_b = loc.unbind(-3)  # (..., K, H, W)
        s_r, s_g, s_b = log_scale.unbind(-3)
        alpha, beta, gamma = coeff.unbind(-3)
        log_mass = (  # log P_k(x_R) + log P_k(x_G | x_R) + log P_k(x_B | x_R, x_G): (..., K, H, W)
            _logistic_log_mass(y_r, mu_r, s_r)
            + _logistic_log_mass(y_g, mu_g + alpha * y_r, s_g)
            + _logistic_log_mass(y_b, mu_b + beta * y_r + gamma * y_g, s_b)
        )
        log_p = torch.logsumexp(log_mass + F.log_softmax(logits, dim=-3), dim=-3)  # (..., H, W)
        return log_p.flatten(-2).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x]: the mixture of the components' means, each that of a logistic clipped to [−1, 1]
        (the discrete mean up to O(bin²)).

        Coupled colour images: per component k, the means are chained through the coupling,
        m_R = c(μ_R), m_G = c(μ'_G + α·m_R), m_B = c(μ'_B + β·m_R + γ·m_G) with c the clipped mean,
        then mixed with the shared weights π_k. Exact (up to O(bin²)) where the clip is linear over
        the spread of the conditioning values; otherwise it misses the clip's Jensen gap, E[c(μ + αY)]
        ≠ c(μ + α·E[Y]) (the exact value needs a sum over the 256² earlier (R, G) values per pixel)."""
        if self.coupled:
            return self._mean_coupled(params)
        logits, loc, log_scale = self._split(params)
        axis = -len(self.event_shape) - 1
        s = log_scale.exp()
        clipped = _clipped_logistic_mean(loc, s)
        y = (torch.softmax(logits, dim=axis) * clipped).sum(axis)
        return ((y + 1.0) / 2.0).clamp(0.0, 1.0)

    def _mean_coupled(self, params: torch.Tensor) -> torch.Tensor:
        logits, loc, log_scale, coeff = self._split_coupled(params)
        mu_r, mu_g, mu_b = loc.unbind(-3)  # (..., K, H, W)
        s_r, s_g, s_b = log_scale.exp().unbind(-3)
        alpha, beta, gamma = coeff.unbind(-3)
        m_r = _clipped_logistic_mean(mu_r, s_r)
        m_g = _clipped_logistic_mean(mu_g + alpha * m_r, s_g)
        m_b = _clipped_logistic_mean(mu_b + beta * m_r + gamma * m_g, s_b)
        weights = torch.softmax(logits, dim=-3).unsqueeze(-3)  # (..., K, 1, H, W)
        y = (weights * torch.stack((m_r, m_g, m_b), dim=-3)).sum(-4)  # (..., 3, H, W)
        return ((y + 1.0) / 2.0).clamp(0.0, 1.0)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A component by Gumbel-max, a logistic draw from it, rounded to the nearest of the 256 values.

        Coupled colour images: one component per pixel for the three channels, then R, G given the
        drawn R, B given the drawn R and G, each conditioning value rounded to the 256-value grid first
        (the value log_prob conditions on), as PixelCNN++ does."""
        if self.coupled:
            return self._sample_coupled(params, generator)
        logits, loc, log_scale = self._split(params)
        axis = -len(self.event_shape) - 1
        choice = _gumbel_argmax(logits, axis, generator, keepdim=True)
        mu, log_s = loc.gather(axis, choice).squeeze(axis), log_scale.gather(axis, choice).squeeze(axis)
        y = (mu + _logistic_noise(log_s, generator)).clamp(-1.0, 1.0)
        return _to_grid(y)

    def _sample_coupled(self, params: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        logits, loc, log_scale, coeff = self._split_coupled(params)
        choice = _gumbel_argmax(logits, -3, generator, keepdim=True)  # (..., 1, H, W)
        index = choice.unsqueeze(-3).expand(*loc.shape[:-4], 1, *loc.shape[-3:])  # (..., 1, 3, H, W)
        mu, log_s, co = (t.gather(-4, index).squeeze(-4) for t in (loc, log_scale, coeff))  # (..., 3, H, W)
        noise = _logistic_noise(log_s, generator)  # logistic draws, one per channel
        (mu_r, mu_g, mu_b), (n_r, n_g, n_b) = mu.unbind(-3), noise.unbind(-3)
        alpha, beta, gamma = co.unbind(-3)
        x_r = _to_grid((mu_r + n_r).clamp(-1.0, 1.0))
        y_r = 2.0 * x_r - 1.0  # the drawn value on the grid conditions the next channels
        x_g = _to_grid((mu_g + alpha * y_r + n_g).clamp(-1.0, 1.0))
        y_g = 2.0 * x_g - 1.0
        x_b = _to_grid((mu_b + beta * y_r + gamma * y_g + n_b).clamp(-1.0, 1.0))
        return torch.stack((x_r, x_g, x_b), dim=-3)

    def check_data(self, low: float, high: float, binary: bool, name: str) -> None:
        _check_bytes(self.name, self.levels, low, high, binary, name)


class Categorical256(Likelihood):
    """A 256-way softmax per value, for 8-bit data x = byte / 255: P = 256 logits per dim (the
    most general mass on a byte; no order between neighbouring values, so it needs more data)."""

    name = "categorical-256"
    codec = "categorical-256"
    summary = "8-bit images, a softmax over the 256 values"
    support = "unit"
    discrete = True
    params_per_dim = BYTE_LEVELS

    def __init__(self, event_shape: tuple[int, ...], data_meta: dict[str, Any] | None = None) -> None:
        super().__init__(event_shape)
        self.levels = _levels_of(data_meta)
        self.values: torch.Tensor
        self.register_buffer("values", torch.arange(BYTE_LEVELS) / (BYTE_LEVELS - 1), persistent=False)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        axis = -len(self.event_shape) - 1
        log_p = F.log_softmax(params.float(), dim=axis)  # (..., 256, *event)
        index = torch.round(x.float() * (BYTE_LEVELS - 1)).long().clamp(0, BYTE_LEVELS - 1)
        index = index.unsqueeze(axis).expand(*log_p.shape[:axis], 1, *log_p.shape[axis + 1 :])
        return self._sum_event(log_p.gather(axis, index).squeeze(axis))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        axis = -len(self.event_shape) - 1
        probs = torch.softmax(params.float(), dim=axis).movedim(axis, -1)  # (..., *event, 256)
        return probs @ self.values

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        axis = -len(self.event_shape) - 1
        logits = params.float()
        return _gumbel_argmax(logits, axis, generator).float() / (BYTE_LEVELS - 1)

    def check_data(self, low: float, high: float, binary: bool, name: str) -> None:
        _check_bytes(self.name, self.levels, low, high, binary, name)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (
        Bernoulli,
        BernoulliGrey,
        ContinuousBernoulli,
        Gaussian,
        GaussianLearned,
        GaussianPixel,
        LaplaceLearned,
        Mixed,
        Categorical,
        DiscretizedLogistic,
        Categorical256,
    )
}


def build_likelihood(
    name: str,
    event_shape: tuple[int, ...],
    scale: float = 0.1,
    data_meta: dict[str, Any] | None = None,
    components: int = 10,
) -> Likelihood:
    """The likelihood registered as ``name``; ``scale`` is the (initial) σ of the Gaussian ones,
    ``components`` the number of logistics of ``discretized-logistic`` (``model.mixtures``).

    ``data_meta`` is the dataset's description (``Dataset.meta``), for likelihoods that need to know
    the data's layout (tables, text) or its number of levels (the 8-bit likelihoods)."""
    if name not in LIKELIHOODS:
        raise unknown_name("likelihood", name, LIKELIHOODS)
    cls = LIKELIHOODS[name]
    if cls is DiscretizedLogistic:
        return DiscretizedLogistic(event_shape, components, data_meta)
    if cls is Categorical256:
        return Categorical256(event_shape, data_meta)
    if getattr(cls, "uses_data_meta", False):
        return cls(event_shape, scale, data_meta)  # type: ignore[call-arg]
    if issubclass(cls, Gaussian):
        return cls(event_shape, scale)
    return cls(event_shape)
