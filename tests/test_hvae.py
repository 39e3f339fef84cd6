"""The top-down hierarchical VAE (models/hvae.py), its objectives and evaluation; the 8-bit likelihoods."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from turbovae import evaluation as evaluate
from turbovae.cli import main
from turbovae.errors import ConfigError, DataError
from turbovae.likelihoods import build_likelihood
from turbovae.models import HVAEConfig, build_network
from turbovae.objectives import elbo, iwae, log_weights
from turbovae.structures import kl_balance_weights, posterior_pass
from turbovae.vae import VAE

SHAPE = (1, 8, 8)  # levels at 8×8, 4×4, 2×2


def small(shape=SHAPE, likelihood="bernoulli", device="cpu", n_classes=0, **options) -> VAE:
    structure = {
        "channels": [8, 16, 16],
        "groups": [1, 2, 1],
        "enc_blocks": [1, 1, 1],
        "latent_channels": [2, 2, 4],
    }
    cfg = HVAEConfig(latent=2, activation="silu", **{**structure, **options})
    lik = build_likelihood(likelihood, shape, components=3)
    net = build_network("hvae", shape, cfg.latent, lik.params_per_dim, cfg, n_classes=n_classes)
    return VAE(net, lik, net.latent_size).to(device)


def test_temperature_scales_every_groups_prior():
    """Hierarchical sampling at T = 0 takes every group's prior mean (all draws equal); colder draws
    from the same noise lie nearer that mode than T = 1 draws."""
    vae = small().eval()
    mode = vae.sample(5, generator=torch.Generator().manual_seed(0), temperature=0.0)
    assert torch.allclose(mode, mode[:1].expand_as(mode))
    warm = vae.sample(5, generator=torch.Generator().manual_seed(1))
    cold = vae.sample(5, generator=torch.Generator().manual_seed(1), temperature=0.2)
    assert (cold - mode).abs().mean() < (warm - mode).abs().mean()
    with pytest.raises(ConfigError, match="temperature"):
        vae.sample(2, temperature=float("nan"))


def binary(n=6, shape=SHAPE, device="cpu") -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)).round().to(device)


def test_layout_shapes_and_gradients_through_every_level(device):
    vae = small(device=device)
    net = vae.net
    # top-down: 1 group at 2×2 (4 channels, N(0, I) prior), 2 at 4×4, 1 at 8×8
    assert net.group_level == [2, 1, 1, 0]
    assert net.group_sizes == [4 * 2 * 2, 2 * 4 * 4, 2 * 4 * 4, 2 * 8 * 8]
    assert vae.latent == net.latent_size == sum(net.group_sizes) and vae.structure.name == "hierarchical"
    x = binary(device=device)
    assert vae.encode(x).mean.shape == (6, net.top_size)  # the top group's posterior
    z = torch.randn(3, 6, vae.latent, device=device)
    assert vae.decode_params(z).shape == (3, 6, 1, *SHAPE)
    assert vae.decode(z[0]).shape == vae.decode(z[0, :, : net.top_size]).shape == (6, *SHAPE)
    assert vae.sample(5).shape == vae.sample(5, mean=False).shape == (5, *SHAPE)
    assert vae.reconstruct(x).shape == (6, *SHAPE)
    with pytest.raises(ValueError, match="decodes z of"):
        vae.decode(torch.zeros(2, 7, device=device))
    # the heads start at (or near) zero, so after one update every parameter of every level, encoder
    # and decoder, must receive a finite, non-zero gradient
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        terms = elbo(vae, x)
        assert all(torch.isfinite(v).all() for v in terms.values())
        terms["loss"].backward()
        opt.step()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} receives no gradient"


@pytest.mark.parametrize("options", [{"patch": 2, "groups": [2, 1, 0]}, {"softplus_scales": False},
                                     {"residual_posterior": False}])  # fmt: skip
def test_options_build_finite_models(options):
    shape = (3, 16, 16) if "patch" in options else SHAPE
    vae = small(shape, **options)
    x = binary(shape=shape)
    terms = elbo(vae, x)
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert vae.decode(torch.randn(2, vae.latent)).shape == (2, *shape)
    if "patch" in options:  # 16×16 over a patch of 2: levels at 8×8, 4×4, 2×2; groups at 8×8 and 4×4 only
        assert vae.net.group_level == [1, 0, 0] and vae.net.top_size == 2 * 4 * 4


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("top", [True, False])
def test_the_fused_group_sample_has_exact_gradients(softplus, top):
    """A group's sample and KL as one autograd node (``_GroupSample``): its hand-written backward is
    the gradient of its forward (float64 gradcheck), and its forward is the sample and the KL of the
    distributions it stands for, q = N(μ_p + Δμ, σ_p·Δσ) against p, computed in float64."""
    from turbovae.models.hvae import _GroupSample

    gen = torch.Generator().manual_seed(0)

    def leaf():
        return torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64).requires_grad_()

    p_loc, p_raw, d_loc, d_raw = leaf(), leaf(), leaf(), leaf()
    eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)

    def fused(*xs):
        prior = (None, None) if top else xs[:2]
        return _GroupSample.apply(*prior, xs[-2], xs[-1], eps, softplus)

    inputs = (d_loc, d_raw) if top else (p_loc, p_raw, d_loc, d_raw)
    assert torch.autograd.gradcheck(fused, inputs)
    z, neg_kl = fused(*inputs)

    def scale(raw):  # σ and log σ
        s = torch.nn.functional.softplus(raw, beta=math.log(2)) if softplus else raw.exp()
        return s, s.log()

    log_p = torch.zeros_like(p_raw) if top else scale(p_raw)[1]
    log_d = scale(d_raw)[1]
    m_p = torch.zeros_like(p_loc) if top else p_loc
    m_q, log_q = m_p + d_loc, log_p + log_d
    kl = log_p - log_q + (torch.exp(2 * log_q) + (m_q - m_p) ** 2) / (2 * torch.exp(2 * log_p)) - 0.5
    torch.testing.assert_close(z, m_q + eps * log_q.exp())
    torch.testing.assert_close(-neg_kl.flatten(), kl.sum((1, 2, 3)))


@pytest.mark.parametrize("options", [{}, {"softplus_scales": False}, {"n_classes": 3}])
def test_the_training_pass_is_the_distributions_pass(options):
    """The training terms' pass (``kl_pass``: each group's sample and KL fused) against the pass that
    builds every group's distributions and calls ``q.kl(p)``: the same likelihood parameters, KLs and
    gradients, float32 rounding apart."""
    torch.manual_seed(1)
    vae = small(**options)
    with torch.no_grad():  # posteriors away from their priors: non-trivial KLs
        for p in vae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, net = binary(4), vae.net
    eps = torch.randn(4, vae.latent, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 2]) if options.get("n_classes") else None
    extra = {} if y is None else {"y": y}
    results = []
    for fused in (True, False):
        vae.zero_grad(set_to_none=True)
        feats = net.features(x)
        if fused:
            params, kl_groups = net.kl_pass(feats, eps, **extra)
        else:
            params, records = net.posterior(feats, eps, **extra)
            kl_groups = torch.stack([q.kl(p) for q, p, _ in records], -1)
        assert kl_groups.shape == (4, len(net.group_sizes)) and (kl_groups > 0).all()
        (kl_groups.sum() - vae.likelihood.log_prob(x, params).sum()).backward()
        results.append((params.detach(), kl_groups.detach(), [p.grad.clone() for p in vae.parameters()]))
    (params_a, kl_a, grads_a), (params_b, kl_b, grads_b) = results
    torch.testing.assert_close(params_a, params_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_a, kl_b, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_a_training_step_runs_no_operator_per_parameter_tensor_and_reads_nothing_back():
    """The whole training step (forward, backward, guard, Adamax, EMA) of an hvae whose top level is
    1×1: no operator kind runs once per parameter tensor (each conv's weight and bias: two tensors,
    one conv2d), nothing is read back to the host, and every gradient has its parameter's strides (the
    multi-tensor kernels' fast path on a GPU)."""
    from torch.profiler import profile

    from turbovae.config import resolve
    from turbovae.engine.optim import GradGuard, make_optimizer, weight_average
    from turbovae.engine.step import make_step

    vae = small(channels=[8, 16, 16, 16], groups=[1, 1, 1, 2], enc_blocks=[1, 1, 1, 1],
                latent_channels=[2, 2, 2, 4])  # fmt: skip
    assert vae.net.sizes[-1] == (1, 1)
    cfg = resolve("fmnist-hvae-gpu", overrides=["train.compile=off"])
    params = list(vae.parameters())
    cpu = torch.device("cpu")
    opt = make_optimizer(cfg, vae, cpu)
    step = make_step(
        vae, opt, None, cfg, cpu, guard=GradGuard(cfg, params, cpu), ema=weight_average(cfg, vae, opt)
    )
    x, eps = binary(4), torch.randn(4, vae.latent)
    for _ in range(2):
        step(x, eps)
    with profile() as prof:
        step(x, eps)
    counts: dict[str, int] = {}
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            counts[e.name] = counts.get(e.name, 0) + 1
    assert "aten::item" not in counts and "aten::_local_scalar_dense" not in counts
    assert max(counts.values()) < 0.6 * len(params), sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert all(p.grad.stride() == p.stride() for p in params)


def test_bf16_steps_with_weight_copies_are_the_autocast_steps_bit_for_bit():
    """The hvae's bf16 step reading bf16 copies of its convolutions' weights (engine/step.py) is the
    step under autocast alone, bit for bit."""
    from test_optim import bf16_steps_with_and_without_weight_copies

    from turbovae.config import resolve

    cfg = resolve("fmnist-hvae", overrides=["train.compile=off", "train.ema=0.9"])
    torch.manual_seed(0)
    (stats_a, params_a, grads_a, _), (stats_b, params_b, grads_b, _) = (
        bf16_steps_with_and_without_weight_copies(small(), cfg, SHAPE)
    )
    assert torch.equal(stats_a, stats_b)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_kl_of_every_group_is_reported_and_sums_to_the_total():
    torch.manual_seed(1)
    vae = small()
    with torch.no_grad():  # a model whose posteriors differ from its priors: non-trivial KLs
        for p in vae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = binary(4)
    terms = elbo(vae, x, generator=torch.Generator().manual_seed(0))
    groups = terms["kl_groups"]
    assert groups.shape == (4,) and (groups > 0).all()
    torch.testing.assert_close(groups.sum(), terms["kl"])
    torch.testing.assert_close(terms["nelbo"], terms["rec"] + terms["kl"])
    # the analytic KLs given z_<l, averaged over samples, are the Monte-Carlo KL of the whole hierarchy:
    # E_q[Σ_l KL_l(z_<l)] = E_q[log q(z|x) − log p(z)]
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        _, kl_groups, log_ratio = posterior_pass(vae, x[:1], None, g, 4000, None)
    analytic, monte_carlo = kl_groups.sum(-1).mean(), -log_ratio.mean()
    spread = log_ratio.std() / math.sqrt(4000)
    assert abs(analytic - monte_carlo) < 4 * spread + 1e-3
    # the evaluation reports them too, per group, summing to its KL
    ev = evaluate.nelbo(vae, x, lambda t: t, generator=torch.Generator().manual_seed(0))
    assert len(ev["kl_groups"]) == 4 and math.isclose(sum(ev["kl_groups"]), ev["kl"], rel_tol=1e-5)


def test_free_bits_apply_to_each_group_and_kl_balance_only_during_warm_up():
    vae = small()
    x = binary(4)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4, vae.latent, generator=g)
    plain = elbo(vae, x, eps=eps)
    # λ above every group's KL: each of the 4 groups is charged λ, not each of the latent dims
    free = elbo(vae, x, eps=eps, free_bits=50.0)
    torch.testing.assert_close(free["loss"], plain["rec"] + 4 * 50.0)
    torch.testing.assert_close(free["nelbo"], plain["nelbo"])  # reported unclipped
    # KL balancing acts while β < 1 only (the net's kl_balance is on by default)
    at_one = elbo(vae, x, eps=eps, beta=torch.tensor(1.0))
    torch.testing.assert_close(at_one["loss"], plain["loss"])
    half = elbo(vae, x, eps=eps, beta=torch.tensor(0.5))
    weights = kl_balance_weights(plain["kl_groups"], vae.net.group_dims)
    torch.testing.assert_close(half["loss"], plain["rec"] + 0.5 * (weights * plain["kl_groups"]).sum())
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6)
    unbalanced = small(kl_balance=False)
    unbalanced.load_state_dict(vae.state_dict())
    torch.testing.assert_close(
        elbo(unbalanced, x, eps=eps, beta=torch.tensor(0.5))["loss"], plain["rec"] + 0.5 * plain["kl"]
    )


def test_iwae_is_at_least_the_elbo_and_its_weights_match_the_elbo():
    torch.manual_seed(3)
    vae = small()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = binary(8)
    with torch.no_grad():
        lw = log_weights(vae, x, 2000, generator=torch.Generator().manual_seed(0))  # (k, B)
        gens = [torch.Generator().manual_seed(s) for s in range(50)]
        nelbo = torch.stack([elbo(vae, x, generator=g)["nelbo"] for g in gens])
        bound = iwae(vae, x, k=256, generator=torch.Generator().manual_seed(1))["loss"]
    # the mean log-weight is the ELBO (analytic KLs against sampled log-ratios)
    tolerance = 4 * lw.std() / math.sqrt(lw.numel()) + 4 * nelbo.std() / math.sqrt(50)
    assert abs(-lw.mean() - nelbo.mean()) < tolerance
    assert bound < nelbo.mean() - 0.1  # −IWAE_256 is well below the NELBO on a model that is not exact


@pytest.mark.parametrize("name", ["discretized-logistic", "categorical-256"])
def test_8bit_likelihoods_sum_to_one_over_the_256_values_of_a_pixel(name):
    lik = build_likelihood(name, (1, 1, 1), components=4)
    values = (torch.arange(256) / 255.0).view(256, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0):
        params = scale * torch.randn(lik.params_per_dim, 1, 1, 1, generator=g)
        if name == "discretized-logistic":  # also very sharp and very flat components, locations out of range
            params[4:8] = torch.tensor([-1.5, 0.0, 1.0, 1.7]).view(4, 1, 1, 1)
            params[8:12] = torch.tensor([-9.0, -5.0, 0.0, 3.0]).view(4, 1, 1, 1)
        log_p = lik.log_prob(values, params.expand(256, *params.shape))  # (256,)
        assert torch.isfinite(log_p).all()
        assert abs(log_p.double().exp().sum().item() - 1.0) < 1e-4
        exact_mean = (log_p.double().exp() * values.flatten()).sum().item()
        assert abs(lik.mean(params.unsqueeze(0)).item() - exact_mean) < 2e-3
        draws = lik.sample(params.expand(4000, *params.shape), torch.Generator().manual_seed(1)).flatten()
        assert torch.equal(draws, torch.round(draws * 255) / 255)  # on the 8-bit grid
        assert abs(draws.double().mean().item() - exact_mean) < 0.03


def test_8bit_likelihoods_refuse_data_that_are_not_8_bit():
    lik = build_likelihood("discretized-logistic", SHAPE, data_meta={"levels": 256})
    lik.check_data(0.0, 1.0, False, "fashion-mnist")  # bytes: fine
    with pytest.raises(DataError, match="'digits' has 17 levels"):
        lik = build_likelihood("categorical-256", SHAPE, data_meta={"levels": 17})
        lik.check_data(0.0, 1.0, False, "digits")
    with pytest.raises(DataError, match="floating-point values"):
        build_likelihood("discretized-logistic", (30,), data_meta={}).check_data(0.0, 1.0, False, "t")
    with pytest.raises(DataError, match=r"values in \[-2, 3\]"):
        lik = build_likelihood("discretized-logistic", (30,), data_meta={"table": {}})
        lik.check_data(-2.0, 3.0, False, "t")
    with pytest.raises(ConfigError, match="mixtures"):
        build_likelihood("discretized-logistic", SHAPE, components=0)


def test_bad_structures_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.groups needs one entry per resolution level"):
        small(groups=[1, 1])
    with pytest.raises(ConfigError, match="reach 1×1 after 2 levels"):
        small((1, 2, 2))
    with pytest.raises(ConfigError, match="needs images"):
        small((12,))
    with pytest.raises(ConfigError, match=r"model\.patch"):
        small(patch=3)


# ---- end to end: the CPU preset through the command line -------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny 8-bit dataset of 28×28 images (blobs on a dark background), like Fashion-MNIST's."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, size=(2, 224, 1, 1))
    blobs = 255 * np.exp(-((yy - centres[0]) ** 2 + (xx - centres[1]) ** 2) / 40.0)
    x = np.clip(blobs + rng.normal(0, 10, blobs.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x_train=x[:192], x_test=x[192:])
    return path


TINY = ["--progress", "off", "train.epochs=1", "train.batch_size=32", "train.log_every=2",
        "train.warmup_steps=2", "eval.iwae_k=4", "eval.batch_size=64"]  # fmt: skip


@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized-logistic"])
def test_the_cpu_preset_trains_evaluates_and_samples(images, tmp_path, capsys, likelihood):
    out = tmp_path / "run"
    extra = ["--likelihood", likelihood, "--binarize", "none", "model.mixtures=3"]
    args = ["train", "--config", "fmnist-hvae", "--data", str(images), "--out", str(out), *TINY]
    assert main(args + (extra if likelihood != "bernoulli" else [])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "hvae" and summary["steps"] == 5
    assert math.isfinite(summary["test_nelbo"]) and math.isfinite(summary["test_nll_iwae"])
    assert summary["test_bpd"] is not None  # a probability mass on the data: bits/dim
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in losses if e["event"] == "train")
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "16", "--json", "--out", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    # top-down: two groups at 1×1 (32 channels), 2×2 (16), 4×4 (8), 7×7 (4)
    assert result["latent_groups"] == [32, 32, 64, 128, 196] and result["latent"] == 452
    assert result["posterior_stats"] == "top group"
    assert len(result["kl_per_dim"]) == result["top_latent"] == 32
    assert math.isclose(sum(result["kl_groups"]), result["kl"], rel_tol=1e-5)
    assert result["nll_iwae"] < result["nelbo"] + 1.0
    assert math.isclose(result["bpd_iwae"], result["nll_iwae"] / (784 * math.log(2)))
    assert math.isclose(result["bpd"], result["nelbo"] / (784 * math.log(2)))
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (4, 1, 28, 28) and np.isfinite(samples).all()
    assert samples.min() >= 0 and samples.max() <= 1


def test_8bit_likelihoods_on_data_that_are_not_8_bit_end_with_one_line(capsys, tmp_path):
    code = main(["train", "--data", "digits", "--likelihood", "categorical-256", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "17 levels" in err
