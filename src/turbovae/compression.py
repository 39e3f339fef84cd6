"""A trained VAE as a lossless codec: bits-back coding with ANS (BB-ANS, Townsend, Bird & Barber 2019).

For every image x, on a stack of ANS words (``constriction``'s AnsCoder, 32-bit words, 24-bit
probabilities):

    encode   pop z ~ q(z | x)   push x under p(x | z)   push z under p(z)
    decode   pop z under p(z)   pop x under p(x | z)    push z under q(z | x)

The bits popped for z are "taken back": the next image's pushes sit on top of them, so an image costs
-log p(x | z) - log p(z) + log q(z | x) bits, the NELBO of the model on it, up to the discretisation.

Latents are discretised per dimension into ``2**latent_bits`` buckets of equal mass under the prior
N(0, 1) (BB-ANS's choice): the prior over buckets is uniform (exactly ``latent_bits`` bits a dimension),
the posterior's mass of a bucket is a difference of Gaussian CDFs at the bucket edges, and the value
the decoder network is given is the bucket's centre in prior mass, Φ⁻¹((i + ½) / 2**latent_bits).
A hierarchical model (``hvae``) codes its groups in turn, top-down (plain BB-ANS over the hierarchy):
every group on the same grid of buckets, the lower groups' priors p(z_l | z_<l) discretised on it too.

Throughput: images are dealt round-robin to ``lanes`` independent chains (one ANS stack each), and the
networks run once per step on the images of all lanes together (image ``t·lanes + j`` is lane j's
t-th). Each chain starts from its own ``seed words`` (fixed pseudo-random words both sides can
generate) that pay for its first image: more lanes, bigger batches, more of these initial bits. The
seed words still untouched at the bottom of a stack are not stored (the decoder regenerates them), and
the decoder checks that every chain ends on exactly its seed.

Determinism: the decoder must rebuild bit for bit the probabilities the encoder coded with. The
networks run in fp32 on both sides on batches of the same shapes (the same step's lanes), and every
probability table is computed by the same code on tensors of the same shapes, in float64, then
quantised by ``constriction`` to 24-bit integers. This is guaranteed on the same machine, torch build
and thread count; across machines it usually holds on CPUs of one kind but is not promised.

File format (all integers little-endian), see docs/compression.md:

    magic b"\\x89TVZ", version u16, checkpoint SHA-256 (32 bytes, of the safetensors file; zeros when
    unknown), weights SHA-256 (32 bytes, of the model's state dict), metadata length u32 + JSON
    (count, shapes, likelihood, latent bits, lanes, ...), per lane (stripped seed words u32, words u32),
    the ANS words (u32 each), CRC-32 of everything before it (u32).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, DataError, TurboVAEError
from .likelihoods import LIKELIHOODS, Likelihood, _logistic_log_mass
from .vae import VAE

MAGIC = b"\x89TVZ"
VERSION = 1
PRECISION_BITS = 24  # constriction's default AnsCoder: 24-bit probabilities, 32-bit words
DEFAULT_LATENT_BITS = 12
DEFAULT_LANES = 64
_HEAD = struct.Struct("<4sH32s32sI")
_LANE = struct.Struct("<II")
_SEED_KEY = 0xB1B5  # seed words of lane j: numpy PCG64 seeded with (_SEED_KEY, j)
# a latent probability table is lanes x latent dims x 2^latent_bits float64 (and its computation holds a
# few temporaries of that size): ``compress`` takes fewer lanes when the table would exceed this
TABLE_BYTES = 256 * 2**20
_TABLE_COPIES = 5  # the table and the temporaries of ``_Buckets.masses`` at their peak
MAX_METADATA_BYTES = 64 * 2**20
MAX_METADATA_DEPTH = 32


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


# ---- latents: buckets of equal prior mass ----------------------------------------------------------


class _Buckets:
    """``2**bits`` buckets of equal N(0, 1) mass: edges (B + 1,) with ±inf at the ends, centres (B,)."""

    def __init__(self, bits: int, device: torch.device) -> None:
        if not 2 <= bits <= 16:
            raise ConfigError(f"latent_bits must be in [2, 16], got {bits}")
        self.size = 2**bits
        u = torch.arange(self.size + 1, dtype=torch.float64) / self.size
        edges = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)  # Φ⁻¹(u), ±inf at 0 and 1
        self.edges = edges.to(device)
        mid = (torch.arange(self.size, dtype=torch.float64) + 0.5) / self.size
        self.centres = (math.sqrt(2.0) * torch.erfinv(2.0 * mid - 1.0)).float().to(device)

    def masses(self, loc: torch.Tensor, log_scale: torch.Tensor) -> np.ndarray:
        """(..., B) float64: the mass of every bucket under N(loc, e^log_scale), for loc (...,)."""
        loc, scale = loc.double().unsqueeze(-1), log_scale.double().exp().unsqueeze(-1)
        t = (self.edges - loc) / scale  # (..., B + 1) standardised edges
        # g = the normal's mass beyond |t|, one erfc per edge: below the mean the CDF, above it the
        # survival function, so that far buckets on either side keep their relative precision
        g = 0.5 * torch.erfc(t.abs() * (1.0 / math.sqrt(2.0)))
        lo, hi, g_lo, g_hi = t[..., :-1], t[..., 1:], g[..., :-1], g[..., 1:]
        mass = torch.where(hi <= 0, g_hi - g_lo, torch.where(lo >= 0, g_lo - g_hi, 1.0 - g_lo - g_hi))
        return mass.clamp(min=0.0).cpu().numpy()


# ---- the likelihoods: one table of V probabilities per symbol, coded in stages ----------------------


class _SymbolCoder:
    """How x is coded under p(x | z): ``stages`` groups of symbols, stage s's probabilities depending on
    the parameters and the symbols of the earlier stages (the RGB coupling's channels). Tables are
    computed for a step's images together, in chunks whose size depends only on the shapes, so that
    both directions run the same float64 operations on tensors of the same shapes."""

    stages = 1
    values = 2

    def __init__(self, likelihood: Likelihood) -> None:
        self.likelihood = likelihood

    def symbols(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Stage ``stage``'s symbols of images x (n, *event) int: (n, S)."""
        return x.flatten(1)

    def place(self, x: torch.Tensor, stage: int, symbols: torch.Tensor) -> None:
        x.view(len(x), -1).copy_(symbols)

    def tables(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> np.ndarray:
        """(n, S, V) float64 probabilities of stage ``stage`` for params (n, P, *event); ``x`` (n, *event)
        holds the symbols of the earlier stages (the rest is ignored)."""
        per_image = self.floats_per_image(params)
        chunk = max(1, 2**23 // max(1, per_image))
        parts = [
            self.table(params[i : i + chunk], x[i : i + chunk], stage).cpu().numpy()
            for i in range(0, len(params), chunk)
        ]
        return np.concatenate(parts)

    def floats_per_image(self, params: torch.Tensor) -> int:
        return params[0].numel() * self.values

    def table(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> torch.Tensor:
        raise NotImplementedError


class _BernoulliCoder(_SymbolCoder):
    values = 2

    def table(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> torch.Tensor:
        logits = params[:, 0].double().flatten(1)  # (n, D)
        return torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], -1)


class _Categorical256Coder(_SymbolCoder):
    values = 256

    def table(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> torch.Tensor:
        return torch.softmax(params.double().flatten(2), dim=1).transpose(1, 2)  # (n, D, 256)


_HALF = 1.0 / 255.0  # half a bin of the discretised logistic, in y = 2x − 1
_EDGES = torch.arange(255, dtype=torch.float64) * (2.0 / 255.0) - 1.0 + _HALF  # the 255 inner bin edges


def _mixture_table(log_weights: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """(n, S, 256) masses of mixtures of discretised logistics: log_weights, loc, log_scale (n, K, S)."""
    weights = torch.softmax(log_weights, dim=1).unsqueeze(-1)  # (n, K, S, 1)
    t = (_EDGES.to(loc.device) - loc.unsqueeze(-1)) * torch.exp(-log_scale).unsqueeze(-1)  # (n, K, S, 255)
    cdf = (weights * torch.sigmoid(t)).sum(1)  # (n, S, 255), the mixture's CDF at the inner edges
    sf = (weights * torch.sigmoid(-t)).sum(1)
    zero, one = cdf.new_zeros(*cdf.shape[:2], 1), cdf.new_ones(*cdf.shape[:2], 1)
    cdf, sf = torch.cat([zero, cdf, one], -1), torch.cat([one, sf, zero], -1)  # (n, S, 257)
    upper = cdf[..., :-1] > 0.5  # bins in the upper half: differences of the survival function
    return torch.where(upper, sf[..., :-1] - sf[..., 1:], cdf[..., 1:] - cdf[..., :-1]).clamp(min=0.0)


class _LogisticCoder(_SymbolCoder):
    """Uncoupled: one mixture per value (grey images and other shapes)."""

    values = 256

    def floats_per_image(self, params: torch.Tensor) -> int:
        return params[0].numel() * 255

    def table(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> torch.Tensor:
        like: Any = self.likelihood  # discretized-logistic
        logits, loc, log_scale = (t.double().flatten(2) for t in like._split(params))  # (n, K, S)
        return _mixture_table(torch.log_softmax(logits, 1), loc, log_scale)


class _CoupledLogisticCoder(_SymbolCoder):
    """RGB coupling: channels R, G, B in turn; G's and B's means move with the earlier channels' values
    and the mixture weights become the components' posterior given them (so the three stages multiply
    to the pixel's mass over its 256³ colours, as ``log_prob`` scores it)."""

    stages = 3
    values = 256

    def floats_per_image(self, params: torch.Tensor) -> int:
        return params[0].numel() * 255

    def symbols(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        return x[:, stage].flatten(1)

    def place(self, x: torch.Tensor, stage: int, symbols: torch.Tensor) -> None:
        x[:, stage] = symbols.view(x[:, stage].shape)

    def table(self, params: torch.Tensor, x: torch.Tensor, stage: int) -> torch.Tensor:
        like: Any = self.likelihood  # discretized-logistic on RGB images
        logits, loc, log_scale, coeff = (t.double() for t in like._split_coupled(params))
        # logits (n, K, H, W); loc, log_scale, coeff (n, K, 3, H, W)
        y = (2.0 * x.double() / 255.0 - 1.0).unsqueeze(1)  # (n, 1, 3, H, W), valid for the earlier stages
        y_r, y_g = y[:, :, 0], y[:, :, 1]
        mu = [
            loc[:, :, 0],
            loc[:, :, 1] + coeff[:, :, 0] * y_r,
            loc[:, :, 2] + coeff[:, :, 1] * y_r + coeff[:, :, 2] * y_g,
        ]
        log_w = torch.log_softmax(logits, dim=1)
        for c in range(stage):  # the components' posterior given the earlier channels' values
            log_w = log_w + _logistic_log_mass(y[:, :, c], mu[c], log_scale[:, :, c])
        return _mixture_table(log_w.flatten(2), mu[stage].flatten(2), log_scale[:, :, stage].flatten(2))


def _logistic_coder(likelihood: Likelihood) -> _SymbolCoder:
    coupled = bool(getattr(likelihood, "coupled", False))
    return _CoupledLogisticCoder(likelihood) if coupled else _LogisticCoder(likelihood)


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


# ---- the chains ------------------------------------------------------------------------------------


def _seed(lane: int, words: int) -> np.ndarray:
    seed = np.random.default_rng([_SEED_KEY, lane]).integers(0, 2**32, words, dtype=np.uint32)
    seed[-1] |= np.uint32(1 << 31)  # an ANS stack never ends in a zero word
    return seed


class _Codec:
    """The model side of the chain: tables for the latents and the data, shared by both directions."""

    def __init__(self, vae: VAE, latent_bits: int) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.buckets = _Buckets(latent_bits, self.device)
        self.symbols = _symbol_coder(vae.likelihood)
        self.binary = self.symbols.values == 2
        c = _constriction()
        self.categorical = c.stream.model.Categorical(perfect=False)
        self.uniform = c.stream.model.Uniform(self.buckets.size)
        check_model(vae)
        self.structure = vae.structure
        self.latent = int(vae.latent)
        # a pop of one symbol takes at most PRECISION_BITS bits: seed words enough for any first image
        self.seed_words = -(-self.latent * PRECISION_BITS // 32) + 2

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored symbols (n, *event) → the float input the model was trained on."""
        x = x.to(self.device, torch.float32)
        return x if self.binary else x / 255.0

    def _centres(self, idx: np.ndarray) -> torch.Tensor:
        return self.buckets.centres[torch.from_numpy(idx).long().to(self.device)]

    # latents: the structure walks its groups top-down (a flat model: one group whose prior is N(0, I));
    # every group on the same grid of buckets, a group's prior discretised on it too

    def pop_posterior(self, coders: list[Any], x: torch.Tensor) -> tuple[list[np.ndarray], torch.Tensor, Any]:
        """Encoder side: pop z ~ q(z | x) on every lane: (z indices per group, the likelihood params
        (n, P, *event), what ``push_prior`` needs: each group's prior masses, None for N(0, I))."""
        xf = self.model_input(x)
        chosen: list[np.ndarray] = []
        priors: list[np.ndarray | None] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            masses = self.buckets.masses(q.loc, q.log_scale)
            idx = np.stack([c.decode(self.categorical, masses[j]) for j, c in enumerate(coders)])
            chosen.append(idx)
            priors.append(None if p is None else self.buckets.masses(p.loc, p.log_scale))
            return self._centres(idx)

        params = self.structure.walk(self.vae, xf, len(xf), pick)
        return chosen, params, priors

    def push_prior(self, coders: list[Any], chosen: list[np.ndarray], priors: Any) -> None:
        for g in reversed(range(len(chosen))):  # bottom group first, so the top group pops first
            for j, c in enumerate(coders):
                sym = chosen[g][j].astype(np.int32)
                if priors[g] is None:
                    c.encode_reverse(sym, self.uniform)
                else:
                    c.encode_reverse(sym, self.categorical, priors[g][j])

    def pop_prior(self, coders: list[Any]) -> tuple[list[np.ndarray], torch.Tensor]:
        """Decoder side: pop z under p(z) on every lane; (z indices per group, params (n, P, *event))."""
        chosen: list[np.ndarray] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            if p is None:
                idx = np.stack([c.decode(self.uniform, self.structure.prior_size(self.vae)) for c in coders])
            else:
                masses = self.buckets.masses(p.loc, p.log_scale)
                idx = np.stack([c.decode(self.categorical, masses[j]) for j, c in enumerate(coders)])
            chosen.append(idx)
            return self._centres(idx)

        params = self.structure.walk(self.vae, None, len(coders), pick)
        return chosen, params

    def push_posterior(self, coders: list[Any], chosen: list[np.ndarray], x: torch.Tensor) -> None:
        """Decoder side: push z back under q(z | x) (undoing the encoder's pop), bottom group first."""
        xf = self.model_input(x)
        tables: list[np.ndarray] = []

        def pick(i: int, p: Any, q: Any) -> torch.Tensor:
            tables.append(self.buckets.masses(q.loc, q.log_scale))
            return self._centres(chosen[i])

        self.structure.walk(self.vae, xf, len(xf), pick, decode=False)
        for g in reversed(range(len(chosen))):
            for j, c in enumerate(coders):
                c.encode_reverse(chosen[g][j].astype(np.int32), self.categorical, tables[g][j])

    # the data

    def push_data(self, coders: list[Any], params: torch.Tensor, x: torch.Tensor) -> None:
        x = x.to(self.device)
        stages = range(self.symbols.stages)
        tables = [self.symbols.tables(params, x, s) for s in stages]
        symbols = [self.symbols.symbols(x, s).cpu().numpy().astype(np.int32) for s in stages]
        for j, c in enumerate(coders):
            for s in reversed(stages):  # the last stage first: the decoder pops stage 0 first
                c.encode_reverse(symbols[s][j], self.categorical, tables[s][j])

    def pop_data(self, coders: list[Any], params: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(len(coders), *self.vae.event_shape, dtype=torch.int64, device=self.device)
        for s in range(self.symbols.stages):
            tables = self.symbols.tables(params, x, s)
            sym = np.stack([c.decode(self.categorical, tables[j]) for j, c in enumerate(coders)])
            self.symbols.place(x, s, torch.from_numpy(sym.astype(np.int64)).to(self.device))
        return x


def _lane_counts(n: int, lanes: int) -> list[int]:
    """Images per step: step t holds images t·lanes … t·lanes + count − 1 (lane j has image t·lanes + j)."""
    return [min(lanes, n - start) for start in range(0, n, lanes)]


def table_bytes(lanes: int, latent: int, latent_bits: int) -> int:
    """Bytes of one latent probability table: lanes x latent dims x 2^latent_bits float64."""
    return lanes * latent * 2**latent_bits * 8


def lanes_for_tables(lanes: int, latent: int, latent_bits: int) -> int:
    """The most lanes, at most ``lanes``, whose latent table stays under TABLE_BYTES (at least 1)."""
    return max(1, min(lanes, TABLE_BYTES // max(1, table_bytes(1, latent, latent_bits))))


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
    """Stored values (N, *event) as int64 symbols: bytes 0..255, or bits 0/1 for a Bernoulli run."""
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


@torch.no_grad()
def compress(
    vae: VAE,
    x: torch.Tensor,
    *,
    lanes: int = DEFAULT_LANES,
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
            run), or the model's float inputs (bytes / 255, or 0/1).
        lanes: Independent chains coded side by side (the networks' batch); each costs initial bits.
        latent_bits: Buckets of equal prior mass per latent dimension, ``2**latent_bits``.
        checkpoint: The SHA-256 of the checkpoint the model was loaded from (``checkpoint_sha256``),
            recorded in the file; None records zeros (the weights' hash is always recorded).
        meta: Extra JSON-able metadata to store (the CLI keeps the input's layout there).
        stats: When given, filled with ``bits``, ``initial_bits``, ``net_bits`` and ``header_bytes``.
        progress: Called with the number of images coded after every step (a progress bar's update).

    Returns:
        The compressed file's bytes; ``decompress(vae, data)`` gives the images back as uint8.
    """
    if lanes < 1:
        raise ConfigError(f"lanes must be >= 1, got {lanes}")
    vae.eval()
    codec = _Codec(vae, latent_bits)
    sym = _as_symbols(vae, x, codec.binary)
    n = len(sym)
    # fewer lanes than asked when a latent table would be too large (the file records the lanes used)
    lanes = lanes_for_tables(lanes, codec.latent, latent_bits)
    counts = _lane_counts(n, lanes)
    lanes = counts[0] if counts else 1
    ans = _constriction().stream.stack.AnsCoder
    seeds = [_seed(j, codec.seed_words) for j in range(lanes)]
    coders = [ans(s.copy()) for s in seeds]
    start_bits = [c.num_valid_bits() for c in coders]
    for t, count in enumerate(counts):
        xb = sym[t * lanes : t * lanes + count]
        active = coders[:count]
        chosen, params, priors = codec.pop_posterior(active, xb)
        codec.push_data(active, params, xb)
        codec.push_prior(active, chosen, priors)
        if progress is not None:
            progress(count)
    lane_words, stripped = [], []
    for coder, seed in zip(coders, seeds, strict=True):
        words = coder.get_compressed()
        s = 0
        while s < min(len(words), len(seed)) and words[s] == seed[s]:
            s += 1
        stripped.append(s)
        lane_words.append(words[s:])
    info = {
        "format": "turbovae-bbans",
        "count": n,
        "event_shape": list(vae.event_shape),
        "values": "binary" if codec.binary else "bytes",
        "likelihood": vae.likelihood.name,
        "model": getattr(getattr(vae.config, "model", None), "name", None),
        "latent": codec.latent,
        "latent_bits": latent_bits,
        "lanes": lanes,
        "seed_words": codec.seed_words,
        **(meta or {}),
    }
    blob = json.dumps(info, separators=(",", ":")).encode()
    parts = [_HEAD.pack(MAGIC, VERSION, checkpoint or bytes(32), weights_sha256(vae), len(blob)), blob]
    parts += [_LANE.pack(s, len(w)) for s, w in zip(stripped, lane_words, strict=True)]
    header_bytes = sum(len(p) for p in parts) + 4
    parts += [np.ascontiguousarray(w, dtype="<u4").tobytes() for w in lane_words]
    body = b"".join(parts)
    data = body + struct.pack("<I", zlib.crc32(body))
    if stats is not None:
        payload = 32 * sum(len(w) for w in lane_words)
        # the chains' growth, exact to the bit (num_valid_bits); the rest of the payload is the seed words
        # kept and the rounding of every stack to whole words
        net = sum(c.num_valid_bits() - b for c, b in zip(coders, start_bits, strict=True))
        stats.update(
            bits=8 * len(data), header_bytes=header_bytes, initial_bits=payload - net, net_bits=net,
            lanes=lanes, latent_bits=latent_bits,
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
    """Check every metadata field the decoder and the writers read, against its type, its bounds and
    the others (raising CompressionError naming it), before anything is allocated from it. ``size``:
    the file's length in bytes."""
    if not isinstance(info, dict):
        raise _corrupt("its metadata is not a JSON object")
    for key in ("count", "lanes", "seed_words", "latent_bits", "latent"):
        if key in info and not _is_int(info[key]):
            raise _corrupt(f"its metadata's {key} is not an integer")
    for key in ("count", "lanes", "seed_words", "latent_bits"):
        if key not in info:
            raise _corrupt(f"its metadata lacks {key}")
    n, lanes = info["count"], info["lanes"]
    if n < 1:
        raise _corrupt(f"it claims {n} images")
    if not 1 <= lanes <= n:
        raise _corrupt(f"it claims {lanes} lanes for {n} images")
    if not 2 <= info["latent_bits"] <= 16:
        raise _corrupt(f"its latent_bits {info['latent_bits']} is outside [2, 16]")
    if size is not None and _HEAD.size + _LANE.size * lanes + 4 > size:
        raise CompressionError("compressed file is truncated (it claims more lanes than it holds)")
    shape = info.get("event_shape")
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        raise _corrupt("its event_shape is not a list of positive integers")
    dims = math.prod(shape)
    names = info.get("names")
    if names is not None:
        if not isinstance(names, list) or len(names) != n:
            how_many = len(names) if isinstance(names, list) else "no list of"
            raise _corrupt(f"it names {how_many} images for {n}")
        for name in names:
            if not isinstance(name, str) or not name or "\0" in name or len(name) > 4096:
                raise _corrupt(f"an image name is not a file name: {str(name)[:80]!r}")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise DataError(f"compressed file names an image outside the output folder: {name[:200]}")
        if len(set(names)) != len(names):
            raise _corrupt("two of its images have the same name")
    modes = info.get("modes")
    if modes is not None and not (
        isinstance(modes, list) and len(modes) == n and all(m in ("L", "RGB", "1") for m in modes)
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
    """(metadata, checkpoint SHA-256, weights SHA-256) of a compressed file; checks magic, version, the
    CRC, the length and every metadata field, raising CompressionError for a corrupt or truncated
    file."""
    if len(data) < _HEAD.size + 4 or data[:4] != MAGIC:
        raise CompressionError("not a turbovae compressed file (.tvz): no TVZ header")
    _, version, ckpt, weights, meta_len = _HEAD.unpack_from(data)
    if version != VERSION:
        raise CompressionError(f"compressed file version {version}; this turbovae reads version {VERSION}")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise CompressionError("compressed file is corrupt or truncated (its CRC-32 does not match)")
    if meta_len > min(MAX_METADATA_BYTES, len(data) - _HEAD.size - 4):
        raise _corrupt(f"its metadata length {meta_len} runs past the file")
    blob = data[_HEAD.size : _HEAD.size + meta_len]
    if _depth(blob) > MAX_METADATA_DEPTH:
        raise _corrupt(f"its metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
    try:
        info = json.loads(blob)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CompressionError("compressed file is corrupt: its metadata is not valid JSON") from None
    return check_info(info, len(data)), ckpt, weights


@torch.no_grad()
def decompress(
    vae: VAE, data: bytes, *, checkpoint: bytes | None = None, progress: Any = None
) -> torch.Tensor:
    """The images of a file written by ``compress``, as uint8 (N, *event_shape): bytes, or bits 0/1.

    Raises CompressionError (a DataError) for a corrupt or truncated file, WrongModelError (a
    CheckpointError) for a file written with another model or checkpoint (``checkpoint``: the
    SHA-256 of the checkpoint ``vae`` was loaded from, checked when both it and the file record one)."""
    info, ckpt, weights = read_header(data)
    if checkpoint is not None and any(ckpt) and ckpt != checkpoint:
        raise WrongModelError(
            f"the file was compressed with checkpoint {ckpt.hex()[:12]}…, not this run's "
            f"{checkpoint.hex()[:12]}…: decompress it with the run that compressed it"
        )
    if weights != weights_sha256(vae):
        raise WrongModelError(
            f"the file was compressed with another model (weights {weights.hex()[:12]}…): decompress it "
            "with the run that compressed it"
        )
    vae.eval()
    n, lanes, seed_words = info["count"], info["lanes"], info["seed_words"]
    latent_bits = info["latent_bits"]
    codec = _Codec(vae, latent_bits)
    if list(info.get("event_shape", [])) != list(vae.event_shape) or codec.seed_words != seed_words:
        raise WrongModelError("the file was compressed for another model shape")
    # before anything is allocated from the header: the images, and the latent tables of a step
    _check_fits(n * math.prod(vae.event_shape) * 2, f"decoding {n:,} images")
    _check_fits(_TABLE_COPIES * table_bytes(lanes, codec.latent, latent_bits), f"decoding {lanes} lanes at "
                f"{latent_bits} latent bits")  # fmt: skip
    offset = _HEAD.size + struct.unpack_from("<I", data, _HEAD.size - 4)[0]
    table_end = offset + _LANE.size * lanes
    if table_end > len(data) - 4:
        raise CompressionError("compressed file is truncated")
    lane_info = [_LANE.unpack_from(data, offset + _LANE.size * j) for j in range(lanes)]
    if _lane_counts(n, lanes)[:1] not in ([lanes], []) or table_end + 4 * sum(w for _, w in lane_info) != (
        len(data) - 4
    ):
        raise CompressionError("compressed file is corrupt or truncated (its lengths do not add up)")
    ans = _constriction().stream.stack.AnsCoder
    seeds = [_seed(j, seed_words) for j in range(lanes)]
    coders, pos = [], table_end
    for (stripped, count), seed in zip(lane_info, seeds, strict=True):
        words = np.frombuffer(data, dtype="<u4", count=count, offset=pos).astype(np.uint32)
        pos += 4 * count
        if stripped > seed_words:
            raise CompressionError("compressed file is corrupt (a lane strips more seed words than it has)")
        try:
            coders.append(ans(np.concatenate([seed[:stripped], words])))
        except Exception as e:
            raise CompressionError(f"compressed file is corrupt: {e}") from None
    counts = _lane_counts(n, lanes)
    out = torch.empty(n, *vae.event_shape, dtype=torch.uint8)
    try:
        for t in reversed(range(len(counts))):
            active = coders[: counts[t]]
            chosen, params = codec.pop_prior(active)
            x = codec.pop_data(active, params)
            codec.push_posterior(active, chosen, x)
            out[t * lanes : t * lanes + counts[t]] = x.cpu().to(torch.uint8)
            if progress is not None:
                progress(counts[t])
    except TurboVAEError:
        raise
    except Exception as e:  # constriction refuses a state a corrupt file can lead to
        raise CompressionError(f"compressed file is corrupt: {e}") from None
    for coder, seed in zip(coders, seeds, strict=True):
        rest = coder.get_compressed()
        if len(rest) != len(seed) or not np.array_equal(rest, seed):
            raise CompressionError("compressed file is corrupt: a chain did not end on its seed words")
    return out
