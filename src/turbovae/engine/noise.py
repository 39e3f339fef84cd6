"""The gradient-noise scale: the estimator (:class:`NoiseScale`, shared with ``turbovae tune``) and the
probe that measures it during training (:class:`NoiseProbe`)."""

from __future__ import annotations

import math

import torch

from .. import runtime
from ..config import Config
from ..vae import VAE
from .step import Task

Number = float | torch.Tensor  # a Python float or a 0-dim tensor (kept on its device)


class NoiseScale:
    """The simple gradient-noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model
    of Large-Batch Training", section 2.2 and appendix A).

    G is the true gradient and Σ the covariance of the per-example gradients. A batch gradient g_B (the mean
    of B per-example gradients) has E|g_B|² = |G|² + tr(Σ)/B, so squared norms measured at two batch sizes
    B_small < B_big give unbiased estimates of both terms:

        |G|²  ≈ (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
        tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

    Each single estimate is very noisy (|G|² can come out negative), so, as in the paper's appendix A, the
    numerator and the denominator are smoothed separately with an exponential moving average and divided
    only when ``value`` is read. On one device, g_small can be the gradient of one chunk of a batch and
    g_big the mean over its chunks; averaging |g_small|² over the chunks lowers the variance.

    ``update`` takes floats or 0-dim tensors and never reads a tensor back to the host; ``value`` does.

    Args:
        decay: the moving average's decay per update, in [0, 1); 0 keeps only the last update.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._g2: Number = 0.0  # moving averages, not yet divided by the bias correction _weight
        self._trace: Number = 0.0
        self._weight = 0.0  # 1 − decay^updates: the zero start's bias, which cancels in the ratio

    def update(self, g2_small: Number, b_small: float, g2_big: Number, b_big: float) -> None:
        """Add one measurement: squared gradient norms ``g2_small`` at batch ``b_small`` and ``g2_big`` at
        batch ``b_big`` (for the mean loss over the batch, at about the same parameters)."""
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
        trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
        d = self.decay
        self._g2 = d * self._g2 + (1.0 - d) * g2
        self._trace = d * self._trace + (1.0 - d) * trace
        self._weight = d * self._weight + (1.0 - d)
        self.updates += 1

    @property
    def g2(self) -> float | None:
        """The smoothed estimate of |G|², the squared norm of the true gradient (None before any update)."""
        return float(self._g2) / self._weight if self.updates else None

    @property
    def trace(self) -> float | None:
        """The smoothed estimate of tr(Σ), the per-example gradient variance (None before any update)."""
        return float(self._trace) / self._weight if self.updates else None

    @property
    def value(self) -> float | None:
        """B_simple = tr(Σ)/|G|², in examples; None before any update, ``inf`` while the smoothed |G|² is not
        positive (the noise swamps the signal: no batch is too large yet)."""
        if not self.updates:
            return None
        g2, trace = float(self._g2), float(self._trace)
        if not g2 > 0:
            return math.inf
        return max(trace, 0.0) / g2

    def state_dict(self) -> dict[str, float]:
        """Plain floats, for a checkpoint's JSON (reads tensors back to the host)."""
        return {"decay": self.decay, "updates": self.updates, "g2": float(self._g2),
                "trace": float(self._trace), "weight": self._weight}  # fmt: skip

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self._g2, self._trace, self._weight = (
            float(state["g2"]),
            float(state["trace"]),
            float(state["weight"]),
        )


class NoiseProbe:
    """The gradient-noise scale B_simple = tr(Σ)/|G|² during training (McCandlish et al. 2018): every
    ``train.noise_scale_every`` steps (default: the log interval) one extra backward pass on half the
    batch, before the step, gives |G_small|²; the step's own gradient norm gives |G_big|² at the same
    parameters. The estimator (:class:`NoiseScale`) smooths both and logs ``noise_scale``, an
    estimate of the critical batch size. Costs one half-batch backward per probe (1% at every 50 steps)."""

    def __init__(self, cfg: Config, vae: VAE, device: torch.device, precision: str) -> None:
        every = cfg.train.noise_scale_every or cfg.train.log_every
        self.every = max(every, 0)
        # not DDP's: the probe's gradient is this rank's own
        self.forward = runtime.with_precision(Task(vae, cfg), device, precision)
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.estimator = NoiseScale()
        self.g2_small: torch.Tensor | None = None
        self.b_small = 0

    def due(self, step: int, batch: int) -> bool:
        return bool(self.every) and step % self.every == 0 and batch >= 4

    def small(
        self, x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor | None, y: torch.Tensor | None = None
    ) -> None:
        h = len(x) // 2
        if y is None:
            loss = self.forward(x[:h], eps.narrow(-2, 0, h), beta)["loss"]
        else:  # a conditional run: the half batch's class ids too
            loss = self.forward(x[:h], eps.narrow(-2, 0, h), beta, y[:h])["loss"]
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.g2_small = sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(()))
        self.b_small = h

    def big(self, norm: torch.Tensor, batch: int) -> None:
        g2_big = norm.square()
        if self.g2_small is not None and torch.isfinite(self.g2_small) & torch.isfinite(g2_big):
            self.estimator.update(self.g2_small, self.b_small, g2_big, batch)

    def log(self) -> dict[str, float]:
        value = self.estimator.value if self.every else None
        value = None if value is None else float(value)
        return {"noise_scale": value} if value is not None and math.isfinite(value) else {}
