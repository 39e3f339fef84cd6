"""A trained VAE as a lossless codec: bits-back coding with ANS (BB-ANS, Townsend, Bird & Barber 2019).

For every image x, on one stack of ANS words (``constriction``'s AnsCoder, 32-bit words, 24-bit
probabilities):

    encode   pop z ~ q(z | x)   push x under p(x | z)   push z under p(z)
    decode   pop z under p(z)   pop x under p(x | z)    push z under q(z | x)

The bits popped for z are "taken back": the next image's pushes sit on top of them, so an image costs
-log p(x | z) - log p(z) + log q(z | x) bits, the NELBO of the model on it, up to the discretisation.

Vectorised: the images are coded in **steps** of growing size (1, 2, 4, ... up to ``batch`` images),
every step's images together: one network pass, one batched pass over its outputs for the
probabilities, one constriction call per kind of symbol (all the step's latents, then every binary
level of all its pixels). The steps still form one chain on one stack, so the bits popped by a step
come from what the previous steps pushed: the chain needs initial bits only for its first image (its
first step holds one image), and the file has a single stack.

Latents: each dimension on a uniform grid of ``2**latent_bits`` bins over [-8, 8] (prior standard
deviations), coded with constriction's QuantizedGaussian (the posterior N(μ, σ²) and the prior N(0, 1),
or a hierarchical model's conditional prior, integrated over the bins); the decoder network gets the
bin's centre. The data: ``bernoulli`` bits with a 2-entry table each; the 8-bit discretised logistic
mixture by a binary search over its 256 values, 8 binary decisions a value whose probabilities are
mixture masses of halves of the remaining interval (so 8 CDF evaluations a value instead of 255, and
the RGB coupling's channels in turn); ``categorical-256`` with its 256-entry table.

Determinism: the decoder must rebuild bit for bit the probabilities the encoder coded with. The
networks run in fp32 on both sides on batches of the same shapes (the same steps), and every
probability is computed by the same code on tensors of the same shapes, in float64, then quantised by
``constriction`` to 24-bit integers. This is guaranteed on the same machine, torch build and thread
count; across machines it usually holds on CPUs of one kind but is not promised.

File format (version 2, integers little-endian, see docs/compression.md): magic b"\\x89TVZ", version u8,
flags u8, [checkpoint id: 8 bytes], weights id (8 bytes), varints (count, latent bits, batch, seed
words, seed words stripped, event rank, event dims, metadata length), metadata (JSON, deflated when the
flag says so), the stack's ANS words (u32 each), CRC-32 of everything before it (u32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, DataError, TurboVAEError
from .likelihoods import LIKELIHOODS, Likelihood
from .vae import VAE

MAGIC = b"\x89TVZ"
VERSION = 2
PRECISION_BITS = 24  # constriction's default AnsCoder: 24-bit probabilities, 32-bit words
DEFAULT_LATENT_BITS = 12
DEFAULT_BATCH = 256  # images a step at most (the networks' batch)
LATENT_RANGE = 8.0  # latents are coded on [-8, 8]: 2**latent_bits bins
ID_BYTES = 8  # the checkpoint's and the weights' SHA-256, first bytes
_FLAG_CHECKPOINT, _FLAG_DEFLATED, _FLAG_BINARY = 1, 2, 4
_SEED_KEY = 0xB1B5  # seed words: numpy PCG64 seeded with (_SEED_KEY, words)
_LOW_WATER_BITS = 64  # the encoder starts again with more seed words when a pop gets this close to the bottom
_CHUNK_SYMBOLS = 2**17  # values coded at a time (the binary search's arrays stay in cache)
_TINY = 1e-300  # added to every probability: a row of zeros is not normalisable
_TINY32 = 1e-30  # the same in float32
MAX_METADATA_BYTES = 64 * 2**20
MAX_METADATA_DEPTH = 32
MAX_SEED_WORDS = 2**24


class CompressionError(DataError):
    """A compressed file that cannot be decoded: corrupt, truncated, or written by another model."""


class WrongModelError(CheckpointError):
    """A compressed file written with another checkpoint than the one given to decode it."""


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:
        raise ConfigError(
            "compression needs the 'constriction' package: pip install 'turbovae[compress]'"
        ) from None
    return constriction


# ---- identities -------------------------------------------------------------------------------------


def weights_sha256(vae: VAE) -> bytes:
    """SHA-256 over the model's state dict (names, dtypes, shapes, values), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def checkpoint_sha256(run_dir: str | Path) -> bytes:
    """The SHA-256 of the safetensors file of the newest valid checkpoint of a run (the one ``load``
    reads), as recorded in its JSON and verified when it is read."""
    from .engine import checkpoint

    path = checkpoint.latest(Path(run_dir))
    if path is None:
        raise CheckpointError(f"no valid checkpoint in {Path(run_dir) / 'checkpoints'}")
    return bytes.fromhex(json.loads(Path(path).read_text())["tensors_sha256"])


# ---- latents: a uniform grid, coded with quantised Gaussians ----------------------------------------


class _Grid:
    """``2**bits`` bins of width 16 / 2**bits over [-8, 8]: symbol i is the value i·width."""

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 16:
            raise ConfigError(f"latent_bits must be in [2, 16], got {bits}")
        self.width = 2.0 * LATENT_RANGE / 2**bits
        half = 2 ** (bits - 1)
        model = _constriction().stream.model.QuantizedGaussian
        self.family = model(-half, half)
        self.standard = model(-half, half, 0.0, 1.0 / self.width)  # N(0, 1)

    def params(self, g: Any) -> tuple[np.ndarray, np.ndarray]:
        """(means, standard deviations) in bins, float64 (n·size,), of a Gaussian with loc, log_scale."""
        mean = g.loc.detach().double().reshape(-1) / self.width
        std = (g.log_scale.detach().double().reshape(-1).exp() / self.width).clamp(min=1e-9)
        return mean.cpu().numpy(), std.cpu().numpy()

    def values(self, idx: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
        return (torch.from_numpy(idx).to(torch.float64) * self.width).float().reshape(n, -1).to(device)


# ---- the likelihoods: x coded as digits, each with a table over its values --------------------------

# choose(table (N, V) float64, digits (N,) int64 or None) -> the digits: the encoder records the table
# and returns the digits it knows, the decoder pops them with the table
Choose = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class _SymbolCoder:
    """How x is coded under p(x | z), a chunk of images at a time: ``encode`` performs the encoder's stack
    operations for the chunk and ``decode`` the decoder's, in exactly the reverse order."""

    binary = False

    def __init__(self, likelihood: Likelihood) -> None:
        self.likelihood = likelihood
        self.categorical = _constriction().stream.model.Categorical(perfect=False)

    def symbols_per_image(self, params: torch.Tensor) -> int:
        return math.prod(params.shape[2:])

    def code(self, params: torch.Tensor, known: Any, choose: Choose) -> Any:
        """Code the values of images with likelihood params (n, P, *event) (``known``: their symbols
        (n·S,) when encoding, None when decoding); returns the symbols (n·S,)."""
        raise NotImplementedError

    def encode(self, coder: Any, params: torch.Tensor, x: torch.Tensor) -> None:
        _push(coder, self.categorical, lambda choose: self.code(params, x.reshape(-1).long(), choose))

    def decode(self, coder: Any, params: torch.Tensor) -> torch.Tensor:
        symbols = self.code(params, None, _popper(coder, self.categorical))
        return symbols.reshape(len(params), *params.shape[2:])


def _push(coder: Any, model: Any, code: Callable[[Choose], Any]) -> None:
    """Run ``code`` with a ``choose`` that records every table and its digits, then push them all, the
    last first (the decoder pops the first first)."""
    records: list[tuple[np.ndarray, np.ndarray]] = []

    def record(table: torch.Tensor, digits: Any) -> torch.Tensor:
        records.append((digits.to(torch.int32).numpy(), table.numpy()))
        return digits

    code(record)
    for digits, table in reversed(records):
        coder.encode_reverse(digits, model, table)


def _popper(coder: Any, model: Any) -> Choose:
    def pop(table: torch.Tensor, digits: Any) -> torch.Tensor:
        return torch.from_numpy(coder.decode(model, table.numpy()).astype(np.int64))

    return pop


class _BernoulliCoder(_SymbolCoder):
    binary = True

    def code(self, params: torch.Tensor, known: Any, choose: Choose) -> Any:
        logits = params[:, 0].double().reshape(-1)
        return choose(torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], 1) + _TINY, known)


class _Categorical256Coder(_SymbolCoder):
    def code(self, params: torch.Tensor, known: Any, choose: Choose) -> Any:
        table = torch.softmax(params.double().flatten(2), dim=1).transpose(1, 2).reshape(-1, 256)
        return choose(table.contiguous() + _TINY, known)


def _logistic_search(mu: torch.Tensor, inv_s: torch.Tensor, known: Any, choose: Choose) -> Any:
    """Code symbols 0..255 under discretised logistics by binary search: mu (in symbols: the bin of
    symbol v is [v − ½, v + ½], the edge bins reaching to ∓∞), inv_s = 1 / scale, (N,). Level l decides
    bit 7 − l with the masses of the two halves of the remaining interval [a, b). An edge is kept as
    (g, u): g = σ(−|t|) ≤ ½ the logistic's mass beyond it, u = 1 above the median (t ≥ 0), so that a
    mass is a difference of CDFs below the median, of survival functions above it, 1 − g_a − g_b across
    it: the tails keep their precision. Every choice is a product by an exact 0/1 (no branches), in
    float32; the tables are float64 for constriction."""
    n = mu.shape[0]
    low = torch.zeros(n, dtype=torch.int64)
    mu, inv_s = mu.float(), inv_s.float()
    g_lo, u_lo = torch.zeros_like(mu), torch.zeros_like(mu)  # the edge at −∞: no mass below it
    g_hi, u_hi = torch.zeros_like(mu), torch.ones_like(mu)  # +∞
    for level in range(8):
        half = 128 >> level
        t = (low.float() + (half - 0.5) - mu) * inv_s
        e = torch.exp(-t.abs())
        g = e / (1.0 + e)
        u = (t >= 0).float()
        table = torch.empty(n, 2, dtype=torch.float64)
        torch.add(_mass(g_lo, u_lo, g, u), _TINY32, out=table[:, 0])
        torch.add(_mass(g, u, g_hi, u_hi), _TINY32, out=table[:, 1])
        digits = None if known is None else (known >> (7 - level)) & 1
        bit = choose(table, digits)
        low += bit * half
        up = bit.float()
        down = 1.0 - up
        g_lo, u_lo = up * g + down * g_lo, up * u + down * u_lo
        g_hi, u_hi = down * g + up * g_hi, down * u + up * u_hi
    return low


def _mass(g_a: torch.Tensor, u_a: torch.Tensor, g_b: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """The mass between edges a < b kept as (g, u) (see ``_logistic_search``): g_b − g_a below the
    median, g_a − g_b above it, 1 − g_a − g_b across it; selected by products with exact 0, ±1."""
    below_or_above = (g_b - g_a) * (1.0 - u_a - u_b)
    across = (u_b - u_a) * (1.0 - g_a - g_b)
    return (below_or_above + across).clamp_(min=0.0)


_SYMBOL_SCALE = 127.5  # y = v / 127.5 − 1: symbol v ↔ the logistic's y


def _bin_mass(x: torch.Tensor, y: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """(K, N) masses of the bins of values x (N,) (y = x / 127.5 − 1) under logistics (loc, log_scale)
    (K, N), the edge bins reaching to ∓∞: σ(u) − σ(l) = σ(u)·σ(−l)·(1 − e^(l − u)), stable in both
    tails."""
    half = 1.0 / 255.0
    low = torch.where(x == 0, -math.inf, y - half)
    high = torch.where(x == 255, math.inf, y + half)
    inv = torch.exp(-log_scale)
    lower, upper = (low - loc) * inv, (high - loc) * inv
    return torch.sigmoid(upper) * torch.sigmoid(-lower) * -torch.expm1(lower - upper)


class _LogisticCoder(_SymbolCoder):
    """A mixture of discretised logistics per value, or per pixel with the RGB coupling (channels R, G, B
    in turn, G's and B's means moving with the earlier channels' values). The mixture's component of
    each value (pixel) is a latent coded by bits-back too: the encoder pops k from its posterior
    p(k | x, z), pushes x under component k alone, then pushes k under the mixture weights; the
    decoder undoes it. k costs −log π_k − log P_k(x) + log p(k | x, z) = −log p(x | z) bits exactly, and
    x is coded under one logistic: 8 CDF evaluations a value."""

    def __init__(self, likelihood: Likelihood) -> None:
        super().__init__(likelihood)
        self.coupled = bool(getattr(likelihood, "coupled", False))

    def _parts(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log weights (K, N), loc, log_scale (K, C, N), coeff (K, 3, N) or an empty tensor), float32,
        N the chunk's values (pixels), C its channels coded in turn."""
        like: Any = self.likelihood  # discretized-logistic
        if self.coupled:
            logits, loc, log_scale, coeff = like._split_coupled(params)  # (n, K, H, W), (n, K, 3, H, W)
            k = logits.shape[1]
            to = [t.float().permute(1, 2, 0, 3, 4).reshape(k, 3, -1) for t in (loc, log_scale, coeff)]
            logits = logits.float().transpose(0, 1).reshape(k, -1)
            return torch.log_softmax(logits, 0), *to
        logits, loc, log_scale = (t.float().flatten(2) for t in like._split(params))  # (n, K, S)
        k = logits.shape[1]
        to = [t.transpose(0, 1).reshape(k, 1, -1) for t in (loc, log_scale)]
        return torch.log_softmax(logits.transpose(0, 1).reshape(k, -1), 0), *to, loc.new_empty(0)

    @staticmethod
    def _loc(loc: torch.Tensor, coeff: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
        """Channel c's means (…, N) given the earlier channels' values y (C, N) in [−1, 1]."""
        if c == 0:
            return loc[:, 0]
        if c == 1:
            return loc[:, 1] + coeff[:, 0] * y[0]
        return loc[:, 2] + coeff[:, 1] * y[0] + coeff[:, 2] * y[1]

    def _posterior(self, parts: tuple[torch.Tensor, ...], xs: torch.Tensor) -> torch.Tensor:
        """p(k | x, z) (N, K): the weights times every component's mass of the values xs (C, N), each
        channel's masses scaled by their largest (float32 products of three need not underflow)."""
        log_w, loc, log_scale, coeff = parts
        y = xs.float() / _SYMBOL_SCALE - 1.0
        p = torch.softmax(log_w, 0)
        for c in range(len(xs)):
            mass = _bin_mass(xs[c], y[c], self._loc(loc, coeff, y, c), log_scale[:, c])
            p = p * (mass / mass.amax(0).clamp(min=1e-30))
        return p.T.contiguous().double() + _TINY

    def _values(
        self, parts: tuple[torch.Tensor, ...], k: torch.Tensor, xs: torch.Tensor, known: bool, choose: Choose
    ) -> None:
        """Code the channels of xs (C, N) in turn under component k (N,) alone (decoding: fill xs)."""
        _, loc, log_scale, coeff = parts

        def of_k(t: torch.Tensor) -> torch.Tensor:  # (K, C, N) → component k's (C, N)
            return t.gather(0, k.view(1, 1, -1).expand(1, t.shape[1], -1))[0] if len(t) else t

        loc_k, scale_k, coeff_k = of_k(loc), of_k(log_scale), of_k(coeff)
        for c in range(len(xs)):
            y = xs.float() / _SYMBOL_SCALE - 1.0
            mu = (self._loc(loc_k.unsqueeze(0), coeff_k.unsqueeze(0), y, c)[0] + 1.0) * _SYMBOL_SCALE
            inv_s = torch.exp(-scale_k[c]) / _SYMBOL_SCALE
            xs[c] = _logistic_search(mu, inv_s, xs[c] if known else None, choose)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Images (n, *event) → values (C, N)."""
        return x.long().transpose(0, 1).reshape(3, -1) if self.coupled else x.long().reshape(1, -1)

    def encode(self, coder: Any, params: torch.Tensor, x: torch.Tensor) -> None:
        parts, xs = self._parts(params), self._layout(x)
        k = torch.from_numpy(
            coder.decode(self.categorical, self._posterior(parts, xs).numpy()).astype(np.int64)
        )
        _push(coder, self.categorical, lambda choose: self._values(parts, k, xs, True, choose))
        weights = torch.softmax(parts[0], 0).T.contiguous().double() + _TINY
        coder.encode_reverse(k.to(torch.int32).numpy(), self.categorical, weights.numpy())

    def decode(self, coder: Any, params: torch.Tensor) -> torch.Tensor:
        parts = self._parts(params)
        weights = torch.softmax(parts[0], 0).T.contiguous().double() + _TINY
        k = torch.from_numpy(coder.decode(self.categorical, weights.numpy()).astype(np.int64))
        xs = torch.zeros(3 if self.coupled else 1, k.shape[0], dtype=torch.int64)
        self._values(parts, k, xs, False, _popper(coder, self.categorical))
        coder.encode_reverse(k.to(torch.int32).numpy(), self.categorical, self._posterior(parts, xs).numpy())
        shape = params.shape[2:]
        if self.coupled:
            return xs.reshape(3, len(params), *shape[1:]).transpose(0, 1)
        return xs.reshape(len(params), *shape)


def _logistic_coder(likelihood: Likelihood) -> _SymbolCoder:
    return _LogisticCoder(likelihood)


# how data are coded under each likelihood that names a codec (``Likelihood.codec``)
CODERS: dict[str, Any] = {
    "bernoulli": _BernoulliCoder,
    "categorical-256": _Categorical256Coder,
    "logistic": _logistic_coder,
}


def check_model(vae: VAE) -> None:
    """Raise ConfigError when this model cannot be used as a codec (its likelihood or its structure)."""
    _symbol_coder(vae.likelihood)
    refusal = vae.structure.codec_refusal(vae)
    if refusal:
        raise ConfigError(refusal)


def is_binary(vae: VAE) -> bool:
    """Whether the run codes bits (0/1) rather than bytes."""
    return _symbol_coder(vae.likelihood).binary


def _symbol_coder(likelihood: Likelihood) -> _SymbolCoder:
    if likelihood.codec not in CODERS:
        names = ", ".join(sorted(getattr(like, "name", "") for like in _codable_likelihoods()))
        raise ConfigError(
            f"compression needs a likelihood with a probability mass on the stored values: {names}; "
            f"this run's is '{likelihood.name}'"
        )
    return CODERS[likelihood.codec](likelihood)


def _codable_likelihoods() -> list[Any]:
    return [like for like in LIKELIHOODS.values() if like.codec in CODERS]


# ---- the chain --------------------------------------------------------------------------------------


def _seed(words: int) -> np.ndarray:
    seed = np.random.default_rng([_SEED_KEY, words]).integers(0, 2**32, words, dtype=np.uint32)
    seed[-1] |= np.uint32(1 << 31)  # an ANS stack never ends in a zero word
    return seed


def steps(n: int, batch: int) -> list[int]:
    """Images per step: 1, 2, 4, ... up to ``batch``, the last one what is left. The first step holds
    one image, so the chain's initial bits are those of one image's latents."""
    sizes, size, done = [], 1, 0
    while done < n:
        sizes.append(min(size, batch, n - done))
        done += sizes[-1]
        size *= 2
    return sizes


class _Codec:
    """The model side of the chain: the probabilities of the latents and the data, shared by both
    directions, and the constriction calls that code a step's images."""

    def __init__(self, vae: VAE, latent_bits: int) -> None:
        check_model(vae)
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.grid = _Grid(latent_bits)
        self.symbols = _symbol_coder(vae.likelihood)
        self.binary = self.symbols.binary
        self.structure = vae.structure
        self.latent = int(vae.latent)
        self.dims = math.prod(vae.event_shape)
        # a pop of one symbol takes at most PRECISION_BITS bits: enough seed words for the first image
        self.seed_words = -(-self.latent * PRECISION_BITS // 32) + 4

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored symbols (n, *event) → the float input the model was trained on."""
        x = x.to(self.device, torch.float32)
        return x if self.binary else x / 255.0

    # latents: the structure walks its groups top-down (a flat model: one group whose prior is N(0, I))

    def pop_posterior(self, coder: Any, x: torch.Tensor) -> tuple[list[np.ndarray], torch.Tensor, list[Any]]:
        """Encoder side: pop z ~ q(z | x) for the step's images: (z bins per group, the likelihood params
        (n, P, *event), each group's prior parameters for ``push_prior``, None for N(0, I))."""
        chosen: list[np.ndarray] = []
        priors: list[Any] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            idx = coder.decode(self.grid.family, *self.grid.params(q))
            chosen.append(idx)
            priors.append(None if p is None else self.grid.params(p))
            return self.grid.values(idx, len(x), self.device)

        params = self.structure.walk(self.vae, self.model_input(x), len(x), pick)
        return chosen, params, priors

    def push_prior(self, coder: Any, chosen: list[np.ndarray], priors: list[Any]) -> None:
        for g in reversed(range(len(chosen))):  # bottom group first, so the top group pops first
            if priors[g] is None:
                coder.encode_reverse(chosen[g], self.grid.standard)
            else:
                coder.encode_reverse(chosen[g], self.grid.family, *priors[g])

    def pop_prior(self, coder: Any, n: int) -> tuple[list[np.ndarray], torch.Tensor]:
        """Decoder side: pop z under p(z) for n images: (z bins per group, params (n, P, *event))."""
        chosen: list[np.ndarray] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            if p is None:
                idx = coder.decode(self.grid.standard, n * self.structure.prior_size(self.vae))
            else:
                idx = coder.decode(self.grid.family, *self.grid.params(p))
            chosen.append(idx)
            return self.grid.values(idx, n, self.device)

        params = self.structure.walk(self.vae, None, n, pick)
        return chosen, params

    def push_posterior(self, coder: Any, chosen: list[np.ndarray], x: torch.Tensor) -> None:
        """Decoder side: push z back under q(z | x) (undoing the encoder's pop), bottom group first."""
        posteriors: list[Any] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            posteriors.append(self.grid.params(q))
            return self.grid.values(chosen[i], len(x), self.device)

        self.structure.walk(self.vae, self.model_input(x), len(x), pick, decode=False)
        for g in reversed(range(len(chosen))):
            coder.encode_reverse(chosen[g], self.grid.family, *posteriors[g])

    # the data: in chunks of images that keep the arrays of the binary search in cache

    def _chunks(self, params: torch.Tensor) -> list[slice]:
        size = max(1, _CHUNK_SYMBOLS // max(1, self.symbols.symbols_per_image(params)))
        return [slice(i, i + size) for i in range(0, len(params), size)]

    def push_data(self, coder: Any, params: torch.Tensor, x: torch.Tensor) -> None:
        x, params = x.cpu(), params.cpu()
        for part in reversed(self._chunks(params)):  # the decoder takes the first chunk first
            self.symbols.encode(coder, params[part], x[part])

    def pop_data(self, coder: Any, params: torch.Tensor) -> torch.Tensor:
        params = params.cpu()
        return torch.cat([self.symbols.decode(coder, params[part]) for part in self._chunks(params)])

    # a step of the chain, both ways

    def encode_step(self, coder: Any, x: torch.Tensor) -> int:
        """Code images x (n, *event) onto the stack; the stack's valid bits after the pops (its low)."""
        chosen, params, priors = self.pop_posterior(coder, x)
        low = int(coder.num_valid_bits())
        self.push_data(coder, params, x)
        self.push_prior(coder, chosen, priors)
        return low

    def decode_step(self, coder: Any, n: int) -> torch.Tensor:
        chosen, params = self.pop_prior(coder, n)
        x = self.pop_data(coder, params)
        self.push_posterior(coder, chosen, x)
        return x


def _available_bytes() -> int | None:
    from .engine.setup import _available_bytes as available

    return available(torch.device("cpu"))


def _check_fits(need: int, what: str) -> None:
    free = _available_bytes()
    if free is not None and need > free:
        raise CompressionError(
            f"{what} needs {need / 2**30:,.1f} GiB of memory, but {free / 2**30:,.1f} GiB are available"
        )


def _as_symbols(vae: VAE, x: torch.Tensor, binary: bool) -> torch.Tensor:
    """Stored values (N, *event) as integer symbols: bytes 0..255, or bits 0/1 for a Bernoulli run."""
    if tuple(x.shape[1:]) != tuple(vae.event_shape):
        raise DataError(f"images of shape {tuple(x.shape[1:])}, but the model takes {tuple(vae.event_shape)}")
    if x.is_floating_point():  # model inputs: bits, or bytes / 255
        scaled = x.double() if binary else x.double() * 255.0
        sym = torch.round(scaled)
        if not bool(((sym - scaled).abs() < 1e-3).all()):
            raise DataError(
                "float images must be the model's inputs exactly: 0/1 for a bernoulli run, bytes / 255 "
                "for an 8-bit run (pass integer arrays to code stored values)"
            )
        x = sym.long()
    elif x.dtype != torch.uint8:  # bytes stay bytes: an int64 copy of a large input is 8 times its size
        x = x.long()
    high = 1 if binary else 255
    if len(x) and (int(x.min()) < 0 or int(x.max()) > high):
        what = "binary images (values 0 and 1)" if binary else "8-bit images (values 0..255)"
        raise DataError(f"this run codes {what}, got values in [{int(x.min())}, {int(x.max())}]")
    return x


# ---- the header -------------------------------------------------------------------------------------


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise CompressionError("compressed file is truncated (its header runs past its end)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self) -> int:
        value = shift = 0
        while True:
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise _corrupt("a header number runs past 64 bits")


_NUMBERS = ("count", "latent_bits", "batch", "seed_words", "stripped")


def _header(info: dict[str, Any], meta: dict[str, Any], checkpoint: bytes | None, weights: bytes) -> bytes:
    """Everything before the ANS words."""
    blob = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    flags = _FLAG_BINARY if info["values"] == "binary" else 0
    packed = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packed.compress(blob) + packed.flush()
    if len(deflated) < len(blob):
        blob, flags = deflated, flags | _FLAG_DEFLATED
    ids = weights[:ID_BYTES]
    if checkpoint is not None and any(checkpoint):
        ids, flags = checkpoint[:ID_BYTES] + ids, flags | _FLAG_CHECKPOINT
    shape = list(info["event_shape"])
    numbers = [info[k] for k in _NUMBERS] + [len(shape), *shape, len(blob)]
    return MAGIC + bytes([VERSION, flags]) + ids + b"".join(_varint(v) for v in numbers) + blob


def _parse(data: bytes) -> tuple[dict[str, Any], bytes, bytes, int]:
    """(the header's fields and metadata, checkpoint id (zeros when none), weights id, where the ANS words
    start) of a file whose magic, version and CRC were checked."""
    r = _Reader(data, len(MAGIC) + 1, len(data) - 4)
    (flags,) = r.take(1)
    ckpt = r.take(ID_BYTES) if flags & _FLAG_CHECKPOINT else bytes(ID_BYTES)
    weights = r.take(ID_BYTES)
    info: dict[str, Any] = {k: r.varint() for k in _NUMBERS}
    rank = r.varint()
    if not 1 <= rank <= 8:
        raise _corrupt(f"it claims an event of {rank} dimensions")
    info["event_shape"] = [r.varint() for _ in range(rank)]
    meta_len = r.varint()
    if meta_len > MAX_METADATA_BYTES:
        raise _corrupt(f"its metadata length {meta_len} runs past the file")
    blob = r.take(meta_len)
    if flags & _FLAG_DEFLATED:
        try:
            inflate = zlib.decompressobj(-15)
            blob = inflate.decompress(blob, MAX_METADATA_BYTES)
        except zlib.error:
            raise _corrupt("its metadata does not inflate") from None
    if blob:
        if _depth(blob) > MAX_METADATA_DEPTH:
            raise _corrupt(f"its metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        try:
            meta = json.loads(blob)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CompressionError("compressed file is corrupt: its metadata is not valid JSON") from None
        if not isinstance(meta, dict) or set(meta) & {*_NUMBERS, "event_shape", "values"}:
            raise _corrupt("its metadata is not a JSON object of layout fields")
        info.update(meta)
    info["values"] = "binary" if flags & _FLAG_BINARY else "bytes"
    return info, ckpt, weights, r.pos


# ---- compress / decompress --------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The networks on one torch thread while coding: the same kernels whatever the caller's threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _encode(codec: _Codec, x: Any, batch: int, seed_words: int, progress: Any) -> tuple[Any, int, int]:
    """One pass of the chain over the images on a stack of ``seed_words`` seed words: (the coder, the
    fewest valid bits the stack held after any step's pops, the valid bits of the seed)."""
    coder = _constriction().stream.stack.AnsCoder(_seed(seed_words))
    low = start_bits = int(coder.num_valid_bits())
    start = 0
    for size in steps(len(x), batch):
        sym = _as_symbols(codec.vae, x[start : start + size], codec.binary)
        low = min(low, codec.encode_step(coder, sym))
        start += size
        if progress is not None:
            progress(size)
    return coder, low, start_bits


@torch.no_grad()
def compress(
    vae: VAE,
    x: torch.Tensor,
    *,
    batch: int = DEFAULT_BATCH,
    latent_bits: int = DEFAULT_LATENT_BITS,
    checkpoint: bytes | None = None,
    meta: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    progress: Any = None,
) -> bytes:
    """Compress images losslessly with a trained VAE by bits-back ANS coding.

    Args:
        vae: A model with a discrete likelihood (``bernoulli``, ``discretized-logistic``,
            ``categorical-256``); ``mlp``, ``conv`` or ``hvae``. Run in fp32 on its device.
        x: (N, *event_shape) images: integers (bytes 0..255 for an 8-bit run, bits 0/1 for a bernoulli
            run), or the model's float inputs (bytes / 255, or 0/1); or any object with ``len`` whose
            slices ``x[a:b]`` are such tensors, read a step at a time (a stream of tiles: the images
            need not all be in memory).
        batch: The most images coded in one step (the networks' batch); steps grow 1, 2, 4, ... to it.
        latent_bits: Bins per latent dimension, ``2**latent_bits``, over [-8, 8].
        checkpoint: The SHA-256 of the checkpoint the model was loaded from (``checkpoint_sha256``),
            its first 8 bytes recorded in the file (the weights' are always recorded).
        meta: Extra JSON-able metadata to store (the CLI keeps the input's layout there).
        stats: When given, filled with ``bits``, ``initial_bits``, ``net_bits`` and ``header_bytes``.
        progress: Called with the number of images coded after every step (a progress bar's update).

    Returns:
        The compressed file's bytes; ``decompress(vae, data)`` gives the images back as uint8.
    """
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if len(x) < 1:
        raise DataError("no images to compress")
    vae.eval()
    codec = _Codec(vae, latent_bits)
    seed_words = codec.seed_words
    while True:  # a chain whose pops reach the seed's bottom starts again on more seed words
        with _one_thread():
            coder, low, start_bits = _encode(codec, x, batch, seed_words, progress)
        if low >= _LOW_WATER_BITS or seed_words >= MAX_SEED_WORDS:
            break
        seed_words *= 4
    seed, words = _seed(seed_words), coder.get_compressed()
    same = words[: len(seed)] == seed[: len(words)]
    stripped = int(np.argmin(same)) if not same.all() else len(same)
    info = {
        "count": len(x), "latent_bits": latent_bits, "batch": batch, "seed_words": seed_words,
        "stripped": stripped, "event_shape": list(vae.event_shape),
        "values": "binary" if codec.binary else "bytes",
    }  # fmt: skip
    head = _header(info, meta or {}, checkpoint, weights_sha256(vae))
    body = head + np.ascontiguousarray(words[stripped:], dtype="<u4").tobytes()
    data = body + struct.pack("<I", zlib.crc32(body))
    if stats is not None:
        net = int(coder.num_valid_bits()) - start_bits  # the chain's growth, exact to the bit
        stats.update(
            bits=8 * len(data), header_bytes=len(head) + 4, initial_bits=32 * (len(words) - stripped) - net,
            net_bits=net, batch=batch, latent_bits=latent_bits,
        )  # fmt: skip
    return data


def _depth(text: bytes) -> int:
    """The deepest nesting of brackets in JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _corrupt(what: str) -> CompressionError:
    return CompressionError(f"compressed file is corrupt: {what}")


_DTYPE_KINDS = "biuf"  # the dtypes an input array may have had: bool, integers, floats (never objects)


def check_info(info: Any, size: int | None = None) -> dict[str, Any]:
    """Check every header and metadata field the decoder and the writers read, against its type, its
    bounds and the others (raising CompressionError naming it), before anything is allocated from it.
    ``size``: the file's length in bytes."""
    if not isinstance(info, dict):
        raise _corrupt("its metadata is not a JSON object")
    for key in ("count", "batch", "seed_words", "stripped", "latent_bits"):
        if not _is_int(info.get(key)):
            raise _corrupt(f"its metadata lacks {key}")
    n = info["count"]
    if n < 1:
        raise _corrupt(f"it claims {n} images")
    if info["batch"] < 1:
        raise _corrupt("it claims steps of no images")
    if not 1 <= info["seed_words"] <= MAX_SEED_WORDS or info["stripped"] > info["seed_words"]:
        raise _corrupt(f"it claims {info['seed_words']} seed words, {info['stripped']} of them stripped")
    if not 2 <= info["latent_bits"] <= 16:
        raise _corrupt(f"its latent_bits {info['latent_bits']} is outside [2, 16]")
    if size is not None and n > 4096 * size:  # bounds the steps before decoding
        raise CompressionError("compressed file is truncated (it claims more images than it can hold)")
    shape = info.get("event_shape")
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        raise _corrupt("its event_shape is not a list of positive integers")
    dims = math.prod(shape)
    names = info.get("names")
    files = len(info["sizes"]) if isinstance(info.get("sizes"), list) else n  # images of any size: files
    if names is not None:
        if not isinstance(names, list) or len(names) != files:
            how_many = len(names) if isinstance(names, list) else "no list of"
            raise _corrupt(f"it names {how_many} images for {files}")
        for name in names:
            if not isinstance(name, str) or not name or "\0" in name or len(name) > 4096:
                raise _corrupt(f"an image name is not a file name: {str(name)[:80]!r}")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise DataError(f"compressed file names an image outside the output folder: {name[:200]}")
        if len(set(names)) != len(names):
            raise _corrupt("two of its images have the same name")
    modes = info.get("modes")
    if modes is not None and not (
        isinstance(modes, list) and len(modes) == files and all(m in ("L", "RGB", "1") for m in modes)
    ):
        raise _corrupt("its image modes are not a list of L, RGB or 1, one per image")
    if "dtype" in info:
        try:
            dtype = np.dtype(info["dtype"]) if isinstance(info["dtype"], str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in _DTYPE_KINDS or dtype.itemsize > 16:
            raise _corrupt(f"its dtype {str(info['dtype'])[:40]!r} is not a numeric array type")
    if "array_shape" in info:
        array_shape = info["array_shape"]
        if not (
            isinstance(array_shape, list)
            and len(array_shape) >= 2
            and all(_is_int(d) and d >= 0 for d in array_shape)
            and array_shape[0] == n
            and math.prod(array_shape) == n * dims
        ):
            raise _corrupt(f"its array_shape {str(array_shape)[:80]} does not hold {n} images of {shape}")
    if "scale" in info and info["scale"] not in (1, 255):
        raise _corrupt(f"its scale {str(info['scale'])[:40]} is not 1 or 255")
    if "key" in info and not (isinstance(info["key"], str) and len(info["key"]) <= 256):
        raise _corrupt("its array key is not a short string")
    return info


def read_header(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(metadata, checkpoint id, weights id) of a compressed file (the ids: the first 8 bytes of the
    SHA-256s; the checkpoint's zeros when unknown); checks magic, version, the CRC, the lengths and
    every field, raising CompressionError for a corrupt, truncated or foreign file."""
    info, ckpt, weights, _ = _read(data)
    return info, ckpt, weights


def _read(data: bytes) -> tuple[dict[str, Any], bytes, bytes, int]:
    if len(data) < len(MAGIC) + 2 or data[: len(MAGIC)] != MAGIC:
        raise CompressionError("not a turbovae compressed file (.tvz): no TVZ header")
    version = data[len(MAGIC)]
    if version != VERSION:
        was = " (the lane-per-stack coder of turbovae up to commit 20b3469: decompress it with that one)"
        was = was if version == 1 else ""
        raise CompressionError(
            f"compressed file version {version}{was}; this turbovae reads version {VERSION}"
        )
    if len(data) < len(MAGIC) + 2 + ID_BYTES + 4:
        raise CompressionError("compressed file is truncated")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise CompressionError("compressed file is corrupt or truncated (its CRC-32 does not match)")
    info, ckpt, weights, pos = _parse(data)
    if (len(data) - 4 - pos) % 4:
        raise CompressionError("compressed file is corrupt or truncated (its lengths do not add up)")
    return check_info(info, len(data)), ckpt, weights, pos


def _check_model(
    vae: VAE, info: dict[str, Any], ckpt: bytes, weights: bytes, checkpoint: bytes | None
) -> None:
    if checkpoint is not None and any(ckpt) and ckpt != checkpoint[:ID_BYTES]:
        raise WrongModelError(
            f"the file was compressed with checkpoint {ckpt.hex()}…, not this run's "
            f"{checkpoint.hex()[:16]}…: decompress it with the run that compressed it"
        )
    if weights != weights_sha256(vae)[:ID_BYTES]:
        raise WrongModelError(
            f"the file was compressed with another model (weights {weights.hex()}…): decompress it "
            "with the run that compressed it"
        )
    if list(info["event_shape"]) != list(vae.event_shape):
        raise WrongModelError("the file was compressed for another model shape")


@torch.no_grad()
def decompress(
    vae: VAE, data: bytes, *, checkpoint: bytes | None = None, progress: Any = None, sink: Any = None
) -> torch.Tensor | None:
    """The images of a file written by ``compress``, as uint8 (N, *event_shape): bytes, or bits 0/1.
    With ``sink``, nothing is returned and ``sink(start, images)`` is called with every step's images
    instead, as they are decoded: the last step first (a stream: the images need not fit in memory).

    Raises CompressionError (a DataError) for a corrupt or truncated file, WrongModelError (a
    CheckpointError) for a file written with another model or checkpoint (``checkpoint``: the
    SHA-256 of the checkpoint ``vae`` was loaded from, checked when both it and the file record one)."""
    info, ckpt, weights, pos = _read(data)
    _check_model(vae, info, ckpt, weights, checkpoint)
    vae.eval()
    codec = _Codec(vae, info["latent_bits"])
    n, seed_words, stripped = info["count"], info["seed_words"], info["stripped"]
    if sink is None:  # before anything is allocated from the header
        _check_fits(n * codec.dims * 2, f"decoding {n:,} images")
    seed = _seed(seed_words)
    words = np.frombuffer(data, dtype="<u4", count=(len(data) - 4 - pos) // 4, offset=pos).astype(np.uint32)
    try:
        coder = _constriction().stream.stack.AnsCoder(np.concatenate([seed[:stripped], words]))
    except Exception as e:
        raise CompressionError(f"compressed file is corrupt: {e}") from None
    sizes = steps(n, info["batch"])
    out = torch.empty(n, *vae.event_shape, dtype=torch.uint8) if sink is None else None
    end = n
    try:
        with _one_thread():
            for size in reversed(sizes):
                images = codec.decode_step(coder, size).to(torch.uint8)
                end -= size
                if out is None:
                    sink(end, images)
                else:
                    out[end : end + size] = images
                if progress is not None:
                    progress(size)
    except (TurboVAEError, OSError):
        raise
    except Exception as e:  # constriction refuses a state a corrupt file can lead to
        raise CompressionError(f"compressed file is corrupt: {e}") from None
    rest = coder.get_compressed()
    if len(rest) != len(seed) or not np.array_equal(rest, seed):
        raise CompressionError("compressed file is corrupt: the chain did not end on its seed words")
    return out
