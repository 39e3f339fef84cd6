import math

import pytest
import torch

from turbovae.errors import DataError
from turbovae.likelihoods import LIKELIHOODS, ContinuousBernoulli, build_likelihood

SHAPE = (1, 4, 4)


def params_for(name: str, batch: int = 3) -> torch.Tensor:
    cls = LIKELIHOODS[name]
    return torch.randn(batch, cls.params_per_dim, *SHAPE)


# likelihoods built from the data's description (Dataset.meta: mixed for tables, categorical for text)
# are tested with their data
@pytest.mark.parametrize(
    "name", sorted(n for n, cls in LIKELIHOODS.items() if not getattr(cls, "uses_data_meta", False))
)
def test_every_likelihood_shapes_and_sampling(name):
    lik = build_likelihood(name, SHAPE)
    params = params_for(name)
    x = torch.rand(3, *SHAPE).round() if lik.support == "binary" else torch.rand(3, *SHAPE)
    assert lik.log_prob(x, params).shape == (3,)
    assert torch.isfinite(lik.log_prob(x, params)).all()
    # importance samples in front broadcast against x
    assert lik.log_prob(x, torch.randn(5, 3, lik.params_per_dim, *SHAPE)).shape == (5, 3)
    assert lik.mean(params).shape == (3, *SHAPE)
    g = torch.Generator().manual_seed(0)
    sample = lik.sample(params, g)
    assert sample.shape == (3, *SHAPE)
    assert torch.equal(sample, lik.sample(params, torch.Generator().manual_seed(0)))
    if lik.support in ("binary", "unit"):
        assert sample.min() >= 0 and sample.max() <= 1


def test_bernoulli_matches_torch():
    lik = build_likelihood("bernoulli", SHAPE)
    params = params_for("bernoulli")
    x = torch.rand(3, *SHAPE).round()
    ref = torch.distributions.Bernoulli(logits=params[:, 0]).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, params), ref)


@pytest.mark.parametrize("name", ["gaussian", "gaussian-learned"])
def test_gaussian_matches_torch(name):
    lik = build_likelihood(name, SHAPE, scale=0.3)
    params = params_for(name)
    x = torch.rand(3, *SHAPE)
    ref = torch.distributions.Normal(params[:, 0], 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, params), ref, rtol=1e-4, atol=1e-4)


def test_gaussian_pixel_uses_its_scale_channel_and_floors_it():
    lik = build_likelihood("gaussian-pixel", (2,), scale=0.5)
    params = torch.zeros(1, 2, 2)  # zero outputs: mean 0, σ = 0.5
    ref = torch.distributions.Normal(0.0, 0.5).log_prob(torch.tensor([0.1, -0.2])).sum()
    torch.testing.assert_close(
        lik.log_prob(torch.tensor([[0.1, -0.2]]), params)[0], ref, rtol=1e-4, atol=1e-4
    )
    very_small = torch.tensor([[[0.0, 0.0], [-1e4, -1e4]]])
    assert torch.isfinite(lik.log_prob(torch.zeros(1, 2), very_small)).all()  # σ ≥ 1e-3, no +inf


@pytest.mark.parametrize("logit", [-40.0, -5.0, -0.3, -1e-3, 0.0, 2e-3, 0.7, 6.0, 40.0])
def test_continuous_bernoulli_is_a_density_with_the_stated_mean(logit):
    lik = ContinuousBernoulli((1,))
    n = 200_001
    x = torch.linspace(0, 1, n, dtype=torch.float64).float().unsqueeze(-1)  # (n, 1)
    params = torch.full((n, 1, 1), logit)
    density = lik.log_prob(x, params).double().exp()
    dx = 1.0 / (n - 1)
    total = ((density[1:] + density[:-1]) / 2).sum().item() * dx  # trapezoid rule
    mean = ((density * x[:, 0].double())[1:] + (density * x[:, 0].double())[:-1]).sum().item() / 2 * dx
    tol = 2e-3 if abs(logit) < 20 else 2e-2  # very peaked densities need finer grids
    assert abs(total - 1.0) < tol
    assert abs(mean - lik.mean(params[:1]).item()) < tol


def test_continuous_bernoulli_matches_torch_in_its_stable_range():
    lik = ContinuousBernoulli(SHAPE)
    params = params_for("continuous-bernoulli") * 2
    x = torch.rand(3, *SHAPE)
    ref = torch.distributions.ContinuousBernoulli(logits=params[:, 0]).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(x, params), ref, rtol=1e-4, atol=1e-3)


def test_continuous_bernoulli_samples_have_the_right_mean():
    lik = ContinuousBernoulli((1,))
    for logit in (-3.0, 0.0, 0.5, 4.0):
        params = torch.full((200_000, 1, 1), logit)
        s = lik.sample(params, torch.Generator().manual_seed(0))
        assert abs(s.mean().item() - lik.mean(params[:1]).item()) < 5e-3


def test_support_checks():
    bern = build_likelihood("bernoulli", SHAPE)
    bern.check_data(0.0, 1.0, True, "d")
    with pytest.raises(DataError, match=r"needs binary data.*--binarize"):
        bern.check_data(0.0, 1.0, False, "d")
    with pytest.raises(DataError, match=r"needs data in \[0, 1\]"):
        build_likelihood("continuous-bernoulli", SHAPE).check_data(-1.0, 1.0, False, "d")
    build_likelihood("bernoulli-grey", SHAPE).check_data(0.0, 1.0, False, "d")
    build_likelihood("gaussian", SHAPE).check_data(-5.0, 7.0, False, "d")
    assert math.isclose(build_likelihood("gaussian", SHAPE, 0.2).log_scale.exp().item(), 0.2, rel_tol=1e-6)


def test_unknown_likelihood_suggests_the_closest():
    from turbovae.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'bernoulli'"):
        build_likelihood("bernouli", SHAPE)
