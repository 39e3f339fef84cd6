"""The bounds on a model where log p(x) has a closed form: a linear-Gaussian VAE (probabilistic PCA)."""

import itertools
import math

import torch
from torch import nn

from turbovae.distributions import DiagonalGaussian
from turbovae.evaluation import iwae_nll, nelbo
from turbovae.likelihoods import build_likelihood
from turbovae.objectives import elbo, iwae, log_weights
from turbovae.vae import VAE

D, L, SIGMA = 6, 2, 0.5


class LinearGaussianNet(nn.Module):
    """p(x|z) = N(Wz + b, σ²I) with orthogonal columns of W, and a diagonal q(z|x) that is the exact
    posterior's mean shifted by ``shift`` with its scale multiplied by ``inflate`` (so ELBO < log p(x))."""

    def __init__(self, shift: float = 0.3, inflate: float = 1.6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, L, generator=g))
        self.W = nn.Parameter(q * torch.tensor([2.0, 1.2]))  # orthogonal columns → diagonal posterior
        self.b = nn.Parameter(torch.randn(D, generator=g) * 0.1)
        self.shift, self.inflate = shift, inflate

    def posterior_exact(self, x):
        m = self.W.T @ self.W + SIGMA**2 * torch.eye(L)  # diagonal by construction
        loc = (x - self.b) @ self.W @ torch.linalg.inv(m).T
        var = SIGMA**2 / torch.diagonal(m)
        return loc, 0.5 * torch.log(var).expand_as(loc)

    def encode(self, x):
        loc, log_scale = self.posterior_exact(x)
        return DiagonalGaussian(loc + self.shift, log_scale + math.log(self.inflate))

    def decode(self, z):
        return (z @ self.W.T + self.b).unsqueeze(-2)  # (..., 1, D)

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(D)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def make_vae(**kw) -> tuple[VAE, torch.Tensor]:
    net = LinearGaussianNet(**kw)
    vae = VAE(net, build_likelihood("gaussian", (D,), scale=SIGMA), L)
    with torch.no_grad():
        z = torch.randn(2000, L, generator=torch.Generator().manual_seed(1))
        x = z @ net.W.T + net.b + SIGMA * torch.randn(2000, D, generator=torch.Generator().manual_seed(2))
    return vae, x


def identity(x):
    return x


def test_exact_posterior_makes_elbo_and_iwae_exact():
    vae, x = make_vae(shift=0.0, inflate=1.0)
    exact = -vae.net.exact_log_px(x).mean().item()
    # log p(x, z) − log q(z | x) = log p(x) for every z: the importance estimate has no variance
    assert abs(iwae_nll(vae, x, identity, k=3)["nll"] - exact) < 1e-3
    # the NELBO estimate uses one sample for the reconstruction and the analytic KL: exact in expectation
    assert abs(nelbo(vae, x, identity)["nelbo"] - exact) < 0.05


def test_iwae_converges_to_the_exact_log_likelihood():
    vae, x = make_vae()
    x = x[:500]
    exact = -vae.net.exact_log_px(x).mean().item()
    g = torch.Generator().manual_seed(3)
    gap_elbo = nelbo(vae, x, identity, generator=g)["nelbo"] - exact
    assert gap_elbo > 0.3  # the approximate posterior leaves a real gap
    est = iwae_nll(vae, x, identity, k=5000, batch_size=100, generator=g)
    assert abs(est["nll"] - exact) < 0.05
    assert est["k"] == 5000 and est["n"] == 500


def test_iwae_bound_is_non_decreasing_in_k_and_above_the_elbo():
    vae, x = make_vae()
    x = x[:1000]
    g = torch.Generator().manual_seed(4)
    nlls = [iwae_nll(vae, x, identity, k=k, generator=g)["nll"] for k in (1, 2, 10, 100)]
    assert all(a > b for a, b in itertools.pairwise(nlls)), nlls
    # with the same samples, log-mean-exp ≥ mean of logs (Jensen): IWAE_k ≥ the average ELBO
    with torch.no_grad():
        lw = log_weights(vae, x, 20, torch.Generator().manual_seed(5)).double()
    assert torch.all(torch.logsumexp(lw, 0) - math.log(20) >= lw.mean(0) - 1e-9)


def test_k1_iwae_is_the_elbo():
    vae, x = make_vae()
    # with one sample, the IWAE bound is the ELBO with a Monte-Carlo KL: same noise, same value
    b = iwae(vae, x, k=1, generator=torch.Generator().manual_seed(6))
    lw = log_weights(vae, x, 1, torch.Generator().manual_seed(6))
    torch.testing.assert_close(b["loss"], -lw.mean())
    # and in expectation it equals the analytic-KL ELBO
    a = elbo(vae, x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a["nelbo"], a["rec"] + a["kl"])
    assert abs(a["loss"].item() - b["loss"].item()) < 4 * lw.std().item() / math.sqrt(len(x))


def test_beta_weights_only_the_kl():
    vae, x = make_vae()
    a = elbo(vae, x[:50], generator=torch.Generator().manual_seed(7), beta=1.0)
    b = elbo(vae, x[:50], generator=torch.Generator().manual_seed(7), beta=0.25)
    torch.testing.assert_close(b["loss"], a["rec"] + 0.25 * a["kl"])
    torch.testing.assert_close(a["nelbo"], b["nelbo"])
    assert a["kl"] > 0
