"""Latent structures are plug-ins: a structure registered in STRUCTURES and named by a network is what
the objectives, the evaluation, sampling, export and the codec call, with no other edit."""

from __future__ import annotations

import pytest
import torch

import turbovae
from turbovae import objectives
from turbovae.evaluation import evaluate, iwae_nll, nelbo
from turbovae.likelihoods import Bernoulli
from turbovae.models import MLPNet
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
    data = turbovae.compress(vae, x.to(torch.uint8), lanes=4)
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
