import math

import torch

from turbovae.distributions import DiagonalGaussian


def test_log_prob_matches_torch_normal():
    loc, log_scale = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    q = DiagonalGaussian(loc, log_scale)
    z = torch.randn(4, 3)
    ref = torch.distributions.Normal(loc, log_scale.exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(q.log_prob(z), ref)


def test_analytic_kl_matches_monte_carlo_against_standard_normal():
    loc, log_scale = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[-0.3, 0.4, -1.2]])
    q = DiagonalGaussian(loc, log_scale)
    g = torch.Generator().manual_seed(0)
    z = q.rsample((400_000,), generator=g)  # (S, 1, 3)
    log_ratio = q.log_prob(z) - DiagonalGaussian.standard((3,)).log_prob(z)
    mc, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(len(log_ratio))
    assert abs(mc - q.kl().item()) < 4 * se
    assert q.kl().item() > 0


def test_analytic_kl_between_two_gaussians_matches_torch_and_monte_carlo():
    p = DiagonalGaussian(torch.tensor([0.3, -0.2]), torch.tensor([0.1, -0.5]))
    q = DiagonalGaussian(torch.tensor([-0.4, 0.9]), torch.tensor([0.2, 0.3]))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.loc, q.stddev), torch.distributions.Normal(p.loc, p.stddev)
    ).sum()
    torch.testing.assert_close(q.kl(p), ref)
    z = q.rsample((400_000,), generator=torch.Generator().manual_seed(1))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    assert abs(log_ratio.mean().item() - q.kl(p).item()) < 4 * log_ratio.std().item() / math.sqrt(len(z))
    assert q.kl(q).abs().item() < 1e-6


def test_rsample_is_reparameterised_and_seeded():
    loc = torch.zeros(2, 3, requires_grad=True)
    log_scale = torch.zeros(2, 3, requires_grad=True)
    q = DiagonalGaussian(loc, log_scale)
    a = q.rsample(generator=torch.Generator().manual_seed(3))
    b = q.rsample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    a.sum().backward()
    assert loc.grad is not None and torch.all(loc.grad == 1)
    assert log_scale.grad is not None and log_scale.grad.abs().sum() > 0
    assert q.rsample((5,)).shape == (5, 2, 3)


def test_mean_stddev_and_standard():
    q = DiagonalGaussian(torch.tensor([1.0]), torch.tensor([math.log(2.0)]))
    assert q.mean.item() == 1.0 and abs(q.stddev.item() - 2.0) < 1e-6 and abs(q.variance.item() - 4.0) < 1e-5
    s = DiagonalGaussian.standard((4,))
    assert torch.equal(s.kl(), torch.tensor(0.0))
