"""Plug-ins: a latent structure registered in STRUCTURES and named by a network is what the objectives,
the evaluation, sampling, export and the codec call; a model family registered in MODELS trains,
evaluates and samples; neither needs an edit anywhere else (data kinds: tests/test_kinds.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import turbovae
from turbovae import objectives
from turbovae.distributions import DiagonalGaussian
from turbovae.evaluation import evaluate, iwae_nll, nelbo
from turbovae.likelihoods import Bernoulli
from turbovae.models import MODELS, MLPNet, ModelSpec
from turbovae.models.base import ModelConfig
from turbovae.structures import STRUCTURES, structure_of
from turbovae.structures.gaussian import FlatGaussian
from turbovae.vae import VAE


class Counting(FlatGaussian):
    """The flat Gaussian, counting which of its methods were called."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    def elbo(self, *args, **kwargs):
        self._count("elbo")
        return super().elbo(*args, **kwargs)

    def terms(self, *args, **kwargs):
        self._count("terms")
        return super().terms(*args, **kwargs)

    def log_weights(self, *args, **kwargs):
        self._count("log_weights")
        return super().log_weights(*args, **kwargs)

    def sample(self, *args, **kwargs):
        self._count("sample")
        return super().sample(*args, **kwargs)

    def export_graphs(self, *args, **kwargs):
        self._count("export_graphs")
        return super().export_graphs(*args, **kwargs)

    def walk(self, *args, **kwargs):
        self._count("walk")
        return super().walk(*args, **kwargs)


class CountingNet(MLPNet):
    structure = "counting"


@pytest.fixture
def counting(monkeypatch):
    structure = Counting()
    monkeypatch.setitem(STRUCTURES, "counting", structure)
    torch.manual_seed(0)
    vae = VAE(CountingNet((1, 4, 4), 3, 1, [16], "relu"), Bernoulli((1, 4, 4)), 3)
    x = (torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return structure, vae, x


def test_a_registered_structure_is_what_every_part_calls(counting):
    structure, vae, x = counting
    assert vae.structure is structure and structure_of(CountingNet((1, 4, 4), 3, 1, [8], "relu")) is structure
    objectives.elbo(vae, x)
    objectives.iwae(vae, x, k=3)
    nelbo(vae, x)
    iwae_nll(vae, x, k=4)
    evaluate(vae, x, k=4)
    vae.sample(5)
    vae.structure.export_graphs(vae)
    data = turbovae.compress(vae, x.to(torch.uint8), batch=4)
    assert torch.equal(turbovae.decompress(vae, data), x.to(torch.uint8))
    for method in ("elbo", "terms", "log_weights", "sample", "export_graphs", "walk"):
        assert structure.calls.get(method, 0) > 0, method


def test_an_unknown_structure_is_one_clear_error(monkeypatch):
    class Stranger(MLPNet):
        structure = "no-such-structure"

    with pytest.raises(turbovae.ConfigError, match="latent structure"):
        structure_of(Stranger((1, 4, 4), 3, 1, [8], "relu"))


def test_training_and_evaluation_share_the_structures_terms(counting):
    """The NELBO that evaluation reports is the training terms' NELBO: one code path, same numbers."""
    _, vae, x = counting
    train = objectives.elbo(vae, x, generator=torch.Generator().manual_seed(4))
    ev = nelbo(vae, x, batch_size=len(x), generator=torch.Generator().manual_seed(4))
    assert ev["nelbo"] == pytest.approx(train["nelbo"].item(), rel=1e-6)
    assert ev["kl"] == pytest.approx(train["kl"].item(), rel=1e-6)


# ---- a model family is one file and one registry entry ----------------------------------------------------


@dataclass(slots=True)
class LinearConfig(ModelConfig):
    """``model.*`` of a toy family: one linear map each way."""

    name: str = "linear"


class LinearNet(torch.nn.Module):
    def __init__(self, event_shape: tuple[int, ...], latent: int, params_per_dim: int) -> None:
        super().__init__()
        self.event_shape, self.params_per_dim = tuple(event_shape), params_per_dim
        dims = math.prod(event_shape)
        self.enc, self.dec = torch.nn.Linear(dims, 2 * latent), torch.nn.Linear(latent, params_per_dim * dims)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        loc, log_scale = self.enc(x.flatten(1)).chunk(2, -1)
        return DiagonalGaussian(loc, log_scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z).view(*z.shape[:-1], self.params_per_dim, *self.event_shape)


def test_a_model_family_registered_in_models_trains_evaluates_and_samples_with_no_other_edit(
    monkeypatch, tmp_path
):
    def build(event_shape, latent, params_per_dim, cfg):
        return LinearNet(event_shape, latent, params_per_dim)

    monkeypatch.setitem(MODELS, "linear", ModelSpec(build, LinearConfig, "one linear map each way"))
    cfg = turbovae.resolve("digits-mlp", overrides=["model.name=linear", "train.epochs=1", "eval.iwae_k=5",
                                                   "train.threads=1", "train.compile=off"])  # fmt: skip
    assert isinstance(cfg.model, LinearConfig)
    summary = turbovae.fit(cfg, tmp_path / "run")
    assert summary["model"] == "linear" and math.isfinite(summary["test_nelbo"])
    vae = turbovae.load(tmp_path / "run")
    assert isinstance(vae.net, LinearNet) and vae.sample(3).shape == (3, 1, 8, 8)
