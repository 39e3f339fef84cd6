"""Evaluation numbers against closed forms: the IWAE estimate and its standard error on a linear-Gaussian
model, active units and KL per dimension on a model with known unused dimensions, the mutual
information of a Gaussian channel, the fast Bernoulli likelihood, chunking, and `turbovae eval`."""

import itertools
import json
import math

import pytest
import torch
from test_objectives import LinearGaussianNet, make_vae
from torch import nn

from turbovae import evaluation as evaluate
from turbovae import runtime
from turbovae.cli import main
from turbovae.distributions import DiagonalGaussian
from turbovae.evaluation import floor, likelihood
from turbovae.likelihoods import Bernoulli, build_likelihood
from turbovae.models.conv import ConvNet
from turbovae.models.mlp import MLPNet
from turbovae.vae import VAE


def identity(x):
    return x


def model_entropy(net: LinearGaussianNet) -> float:
    """E_{x ~ p(x)}[−log p(x)] = ½ log det(2πe Σ) for the model's marginal N(b, WWᵀ + σ²I)."""
    d = net.b.numel()
    cov = net.W @ net.W.T + 0.25 * torch.eye(d)  # σ = 0.5 in test_objectives
    return 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(cov.double()).item())


def draw(net: LinearGaussianNet, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, net.W.shape[1], generator=g)
        return z @ net.W.T + net.b + 0.5 * torch.randn(n, net.b.numel(), generator=g)


def test_the_estimate_converges_to_the_exact_value_per_example():
    vae, x = make_vae()
    x = x[:200]
    exact = vae.net.exact_log_px(x).double()  # (N,)
    errors = []
    for k in (1, 10, 100, 1000):
        r = evaluate.iwae_log_likelihood(vae, x, identity, k=k, generator=torch.Generator().manual_seed(k))
        assert r["log_px"].shape == (200,) and r["k"] == k
        assert torch.all(r["ess"] >= 1 - 1e-9) and torch.all(r["ess"] <= k + 1e-9)
        errors.append((r["log_px"] - exact).abs().mean().item())
    # the per-example error shrinks with k (bias ~ 1/k), down to Monte-Carlo noise
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.06 and errors[0] > 0.5, errors


def test_the_standard_error_measures_the_spread_over_examples():
    """The s.e. is the uncertainty from which examples are in the test set: it should equal the spread
    of the exact per-example values over √n, and over fresh test sets the estimate should fall within
    2 s.e. of the population value E[−log p(x)] about 95% of the time."""
    net = LinearGaussianNet()
    vae = VAE(net, build_likelihood("gaussian", (6,), scale=0.5), 2)
    population = model_entropy(net)
    z_scores = []
    for seed in range(20):
        x = draw(net, 400, seed=100 + seed)
        est = evaluate.iwae_nll(vae, x, identity, k=200, generator=torch.Generator().manual_seed(seed))
        exact = -net.exact_log_px(x).double()
        # same examples: the estimate is close to their exact mean, much closer than the s.e. ...
        assert abs(est["nll"] - exact.mean().item()) < 0.25 * est["stderr"]
        # ... because the s.e. is the spread of the exact values over examples
        assert est["stderr"] == pytest.approx(exact.std().item() / math.sqrt(400), rel=0.05)
        z_scores.append((est["nll"] - population) / est["stderr"])
    z = torch.tensor(z_scores)
    assert z.abs().max() < 3.5, z_scores
    assert (z.abs() < 2).float().mean() >= 0.8, z_scores  # nominally 95%; 20 draws leave slack
    assert 0.3 < z.pow(2).mean() < 2.0, z_scores  # the s.e. is neither far too small nor far too large


def test_k_5000_with_small_chunks_is_exact_within_noise():
    vae, x = make_vae()
    x = x[:100]
    exact = -vae.net.exact_log_px(x).mean().item()
    est = evaluate.iwae_nll(vae, x, identity, k=5000, sample_chunk=700, batch_size=7)
    assert abs(est["nll"] - exact) < 0.02 and est["k"] == 5000 and est["n"] == 100


def test_chunks_are_bounded_and_large():
    vae = VAE(MLPNet((1, 28, 28), 20, 1, [400]), Bernoulli((1, 28, 28)), 20)
    for k in (1, 5, 100, 1000, 5000, 100_000):
        batch, chunk = evaluate.plan_chunks(vae, 10_000, k)
        rows = batch * chunk
        assert rows * 784 <= likelihood.CHUNK_VALUES  # memory bounded for any k
        assert rows >= 4000  # matmuls stay large
        assert chunk <= k and math.ceil(k / chunk) * chunk - k < math.ceil(k / chunk)  # equal chunks


class KnownPosterior(nn.Module):
    """q(z|x): dims 0 and 1 follow x with known scales, dim 2 is unused (the prior), dim 3 is constant
    but not the prior (a KL > 0 that carries no information)."""

    def encode(self, x):
        n = len(x)
        loc = torch.stack([x[:, 0], 0.05 * x[:, 1], torch.zeros(n), torch.full((n,), 0.5)], dim=1)
        log_scale = torch.log(torch.tensor([0.2, 0.5, 1.0, 0.3])).expand(n, 4)
        return DiagonalGaussian(loc, log_scale)

    def decode(self, z):
        return z[..., :2].unsqueeze(-2)


def test_active_units_and_kl_per_dimension_match_hand_computed_values():
    vae = VAE(KnownPosterior(), build_likelihood("gaussian", (2,)), 4)
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    q = evaluate.encode_all(vae, x, identity, batch_size=128)
    active, variance = evaluate.active_units(q)
    expected_var = [x[:, 0].var().item(), (0.05 * x[:, 1]).var().item(), 0.0, 0.0]
    assert variance == pytest.approx(expected_var, rel=1e-5, abs=1e-9)
    assert active == 1  # dim 1 varies, but by 0.0025 < 0.01: not active by Burda's criterion
    kl = evaluate.kl_per_dim(q)
    m0, m1 = x[:, 0].double(), 0.05 * x[:, 1].double()
    hand = [
        (0.5 * (m0**2 + 0.04 - 1) - math.log(0.2)).mean().item(),
        (0.5 * (m1**2 + 0.25 - 1) - math.log(0.5)).mean().item(),
        0.0,
        0.5 * (0.25 + 0.09 - 1) - math.log(0.3),
    ]
    assert kl == pytest.approx(hand, rel=1e-5, abs=1e-6)
    # the same numbers reach `evaluate`, with the mutual information of the unused dims at 0
    r = evaluate.evaluate(vae, x, identity, k=2, generator=torch.Generator().manual_seed(1))
    assert r["active_units"] == 1 and r["latent"] == 4 and r["kl_per_dim"] == pytest.approx(hand, rel=1e-5)
    assert r["kl"] == pytest.approx(sum(hand), rel=1e-4)


def test_mutual_information_of_a_gaussian_channel():
    """x ~ N(0, 1), q(z|x) = N(a·x, s²): I(x; z) = ½ log(1 + a²/s²)."""
    x = torch.randn(3000, 1, generator=torch.Generator().manual_seed(0))
    for a, s in ((2.0, 1.0), (1.0, 1.0), (0.5, 1.0)):
        q = DiagonalGaussian(a * x, torch.full_like(x, math.log(s)))
        r = evaluate.mutual_information(q, generator=torch.Generator().manual_seed(1), max_values=50_000)
        assert r["mutual_info"] == pytest.approx(0.5 * math.log(1 + a * a / s / s), abs=0.04)
        # ELBO surgery: E_x KL(q(z|x) || p) = I + KL(q(z) || p), up to Monte-Carlo noise
        assert r["mutual_info"] + r["marginal_kl"] == pytest.approx(q.kl().mean().item(), abs=0.05)
    # a posterior that ignores x carries no information, exactly
    same = DiagonalGaussian(torch.full((500, 3), 0.7), torch.full((500, 3), -0.5))
    assert abs(evaluate.mutual_information(same)["mutual_info"]) < 1e-9
    # well-separated posteriors identify their example: I = log N, the estimator's ceiling
    sharp = DiagonalGaussian(torch.arange(200.0).unsqueeze(1), torch.full((200, 1), math.log(1e-3)))
    assert evaluate.mutual_information(sharp)["mutual_info"] == pytest.approx(math.log(200), abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 28, 28), (10,), (7,), (3, 5, 5)])
def test_the_fast_bernoulli_likelihood_is_exact(shape):
    lik = Bernoulli(shape)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, *shape, generator=g) < 0.4).float()
    params = torch.randn(6, 4, 1, *shape, generator=g) * 8
    eta = params.double().select(-len(shape) - 1, 0)
    reference = (x.double() * eta - torch.nn.functional.softplus(eta)).flatten(-len(shape)).sum(-1)
    fast = lik.log_prob_eval(x, params)
    assert fast.dtype == torch.float32 and fast.shape == (6, 4)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=2e-3)
    low = params.bfloat16()  # bf16 logits (the autocast path): same values, scored in float32
    torch.testing.assert_close(lik.log_prob_eval(x, low), lik.log_prob(x, low), rtol=1e-6, atol=2e-3)


def test_bf16_is_used_only_where_it_moves_the_estimate_little():
    torch.manual_seed(0)
    vae = VAE(MLPNet((1, 8, 8), 4, 1, [32]), Bernoulli((1, 8, 8)), 4)
    x = (torch.rand(80, 1, 8, 8) < 0.3).float()
    ref = evaluate.iwae_nll(vae, x, identity, k=50, generator=torch.Generator().manual_seed(0))
    auto = evaluate.iwae_nll(
        vae, x, identity, k=50, precision="auto", generator=torch.Generator().manual_seed(0)
    )
    assert ref["precision"] == "fp32"
    if not runtime.fast_bf16(torch.device("cpu")):
        assert auto["precision"] == "fp32" and "bf16_delta" not in auto
        return
    assert auto["bf16_delta_bound"] < likelihood.BF16_TOLERANCE and auto["precision"] == "bf16"
    assert abs(auto["nll"] - ref["nll"]) < 0.05


def test_the_matmul_floor_counts_the_decoder():
    vae = VAE(MLPNet((1, 28, 28), 20, 1, [400]), Bernoulli((1, 28, 28)), 20)
    assert floor.decoder_linears(vae, 64) == [(64, 20, 400), (64, 400, 784)]
    measured = floor.matmul_floor(vae, n=100, k=10, rows=64, repeats=2)
    assert measured is not None and measured["floor_seconds"] > 0
    assert measured["floor_flops"] == pytest.approx(2 * 100 * 10 * (20 * 400 + 400 * 784))
    conv = VAE(ConvNet((1, 28, 28), 8, 1, [8, 16]), Bernoulli((1, 28, 28)), 8)
    assert floor.matmul_floor(conv, n=10, k=2, rows=8) is None


def test_eval_cli_json_carries_everything(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        "digits",
        "--hidden",
        "32",
        "--latent",
        "4",
        "--epochs",
        "2",
        "--progress",
        "off",
    ]
    assert main([*argv, "--out", str(run), "eval.iwae_k=5"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--iwae-k", "20", "--json", "--floor"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"nelbo", "rec", "kl", "nll_iwae", "nll_iwae_stderr", "k", "bpd", "n", "split", "active_units",
            "kl_per_dim", "mutual_info", "marginal_kl", "seconds", "iwae_seconds", "precision",
            "floor_ratio"}  # fmt: skip
    assert keys <= set(result)
    assert (result["k"], result["n"], result["split"], result["latent"]) == (20, 180, "test", 4)
    assert len(result["kl_per_dim"]) == 4 and sum(result["kl_per_dim"]) == pytest.approx(
        result["kl"], rel=1e-4
    )
    assert json.loads((run / "eval.json").read_text())["nll_iwae"] == result["nll_iwae"]
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--iwae-k", "3", "--out", str(out), "--precision", "fp32"]) == 0
    assert "active" in capsys.readouterr().out
    assert json.loads(out.read_text())["precision"] == "fp32"
    assert main(["eval", str(run), "--iwae-k", "3", "--out", str(tmp_path / "e.txt")]) == 2
