"""PixelCNN++'s colour-channel coupling in the discretized-logistic likelihood (3-channel images), and
the uncoupled behaviour it must leave alone (grey images, other channel counts, tables)."""

import math

import pytest
import torch
import torch.nn.functional as F

from turbovae.config import Config
from turbovae.engine.setup import build_vae
from turbovae.likelihoods import DiscretizedLogistic, build_likelihood
from turbovae.models import MODELS
from turbovae.objectives import elbo

K = 3
KP = 2  # components of the pixel whose 256³ colours are enumerated (the cost is linear in it)
PIXEL = (3, 1, 1)  # one colour pixel


def coupled_pixel_params() -> torch.Tensor:
    """(4·KP, 3, 1, 1) params of one colour pixel: per channel [logits KP, loc KP, log_scale KP, coeff KP].

    Strong coupling (|tanh| up to ~0.8), a sharp component and a location past the top edge (so the
    255 bin of R holds real mass); the unused logit slots of channels 1 and 2 are far from channel 0's."""
    logits = torch.tensor([[0.4, 9.0, -9.0], [-0.3, -9.0, 9.0]])  # (KP, C): rows components, only C=0 read
    loc = torch.tensor([[-0.4, 0.1, -0.2], [1.05, -0.5, 0.2]])
    log_scale = torch.tensor([[-2.0, -1.5, -2.5], [-4.5, -1.0, -2.0]])
    coeff = torch.tensor([[1.2, -0.7, 0.9], [-1.0, 0.5, 0.6]])  # raw α, β, γ (channels 0, 1, 2)
    return torch.cat([logits, loc, log_scale, coeff]).view(4 * KP, 3, 1, 1)


def reference_log_prob(x: torch.Tensor, params: torch.Tensor, k: int) -> torch.Tensor:
    """The coupled mass in float64, written directly: log Σ_k π_k Π_c (σ(upper) − σ(lower)).

    x (..., 3, H, W), params (..., 4k, 3, H, W) -> (...,)."""
    p = params.double()
    logits, loc, log_scale, coeff = p.chunk(4, dim=-4)
    pi = torch.softmax(logits[..., 0, :, :], dim=-3)  # (..., k, H, W)
    s = log_scale.clamp(min=-7.0).exp()
    a = torch.tanh(coeff)
    y = 2.0 * x.double().unsqueeze(-4) - 1.0  # (..., 1, 3, H, W)
    means = [
        loc[..., 0, :, :],
        loc[..., 1, :, :] + a[..., 0, :, :] * y[..., 0, :, :],
        loc[..., 2, :, :] + a[..., 1, :, :] * y[..., 0, :, :] + a[..., 2, :, :] * y[..., 1, :, :],
    ]
    h = 1.0 / 255.0
    prob = torch.ones_like(pi)
    for c in range(3):
        yc, sc = y[..., c, :, :], s[..., c, :, :]
        cdf_up = torch.where(yc > 1 - h, torch.ones_like(yc), torch.sigmoid((yc + h - means[c]) / sc))
        cdf_lo = torch.where(yc < -1 + h, torch.zeros_like(yc), torch.sigmoid((yc - h - means[c]) / sc))
        prob = prob * (cdf_up - cdf_lo)
    return (pi * prob).sum(-3).log().flatten(-2).sum(-1)


@pytest.fixture(scope="module")
def enumerated() -> dict[str, torch.Tensor]:
    """Every one of the 256³ colours of the pixel of ``coupled_pixel_params``, scored by log_prob, in
    chunks over R: the total mass, the R marginal, the moments and a coarse 4×4×4 histogram."""
    lik = DiscretizedLogistic(PIXEL, components=KP)
    params = coupled_pixel_params().unsqueeze(0)  # broadcast over the colours
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    gb = torch.stack([g, b], -1).view(1, 256 * 256, 2)
    chunk = 16
    total = torch.zeros((), dtype=torch.float64)
    marginal_r = torch.zeros(256, dtype=torch.float64)
    joint_rg = torch.zeros(256, 256, dtype=torch.float64)  # P(r, g)
    joint_gb = torch.zeros(256, 256, dtype=torch.float64)  # P(g, b)
    joint_rb = torch.zeros(256, 256, dtype=torch.float64)  # P(r, b)
    coarse = torch.zeros(4, 4, 4, dtype=torch.float64)  # P over cells of 64×64×64 colours
    for r0 in range(0, 256, chunk):
        r = levels[r0 : r0 + chunk].view(chunk, 1, 1).expand(chunk, 256 * 256, 1)
        x = torch.cat([r, gb.expand(chunk, -1, -1)], -1).view(-1, 3, 1, 1)  # (chunk·256², 3, 1, 1)
        with torch.no_grad():
            p = lik.log_prob(x, params).double().exp().view(chunk, 256, 256)  # P(r, g, b)
        total += p.sum()
        marginal_r[r0 : r0 + chunk] = p.sum((1, 2))
        joint_rg[r0 : r0 + chunk] = p.sum(2)
        joint_rb[r0 : r0 + chunk] = p.sum(1)
        joint_gb += p.sum(0)
        coarse[r0 // 64] += p.view(chunk, 4, 64, 4, 64).sum((0, 2, 4))
    v = levels.double()
    mean = torch.stack([marginal_r @ v, joint_gb.sum(1) @ v, joint_gb.sum(0) @ v])
    cross = torch.stack(
        [v @ joint_rg @ v, v @ joint_rb @ v, v @ joint_gb @ v]
    )  # E[x_R x_G], E[x_R x_B], E[x_G x_B]
    return {"total": total, "marginal_r": marginal_r, "mean": mean, "cross": cross, "coarse": coarse}


def test_layout_params_per_dim_and_coupled_only_for_3_channel_images():
    lik = DiscretizedLogistic((3, 8, 8), components=5)
    assert lik.coupled and lik.params_per_dim == 20  # per channel [logits, loc, log_scale, coeff] × 5
    for shape in [(1, 8, 8), (2, 8, 8), (4, 8, 8), (3,), (30,), (3, 8)]:
        lik = DiscretizedLogistic(shape, components=5)
        assert not lik.coupled and lik.params_per_dim == 15, shape
    assert build_likelihood("discretized-logistic", (3, 8, 8), components=2).params_per_dim == 8


@pytest.mark.slow  # the 256³ colours enumerated once: about 8 s
def test_the_256_cubed_colours_of_a_coupled_pixel_sum_to_one(enumerated):
    assert abs(enumerated["total"].item() - 1.0) < 1e-4
    assert abs(enumerated["coarse"].sum().item() - 1.0) < 1e-4


@pytest.mark.slow  # the 256³ colours enumerated once: about 8 s
def test_r_marginal_of_the_coupled_mass_is_the_shared_mixture_of_r(enumerated):
    # Σ_{g,b} P(r, g, b) = Σ_k π_k P_k(r): G and B's conditionals each sum to 1 for any coupling, so the
    # marginal of R is a 1-channel mixture with channel 0's logits, locations and scales
    params = coupled_pixel_params()
    grey_params = torch.cat([params[0:KP, 0], params[KP : 2 * KP, 0], params[2 * KP : 3 * KP, 0]]).view(
        3 * KP, 1, 1, 1
    )
    grey = DiscretizedLogistic((1, 1, 1), components=KP)
    levels = (torch.arange(256) / 255.0).view(256, 1, 1, 1)
    marginal = grey.log_prob(levels, grey_params.expand(256, *grey_params.shape)).double().exp()
    assert torch.allclose(enumerated["marginal_r"], marginal, atol=2e-6, rtol=1e-4)


def test_log_prob_matches_a_direct_float64_computation_with_leading_dims():
    gen = torch.Generator().manual_seed(3)
    lik = DiscretizedLogistic((3, 2, 2), components=K)
    params = torch.randn(4, 5, 4 * K, 3, 2, 2, generator=gen)  # (samples, batch, P, C, H, W)
    params[:, :, 2 * K : 3 * K] = params[:, :, 2 * K : 3 * K] - 2.0  # scales around e^-2
    params[:, :, 3 * K :] *= 2.0  # strong coupling
    x = torch.randint(0, 256, (5, 3, 2, 2), generator=gen).float() / 255.0
    x[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # the edge bins
    x[1, :, 1, 1] = torch.tensor([1.0, 1.0, 1.0])
    got = lik.log_prob(x, params)
    assert got.shape == (4, 5) and got.dtype == torch.float32
    assert torch.allclose(got.double(), reference_log_prob(x, params, K), atol=1e-4, rtol=1e-5)
    # channel 1 and 2's logit slots are not read: a mixture shared by the three channels
    other = params.clone()
    other[:, :, :K, 1:] = torch.randn(4, 5, K, 2, 2, 2, generator=gen)
    assert torch.equal(lik.log_prob(x, other), got)


def grey_log_prob(
    x: torch.Tensor, logit: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) of a single logistic (K = 1) per value, from the uncoupled grey likelihood: x (N,)."""
    grey = DiscretizedLogistic((1, 1, 1), components=1)
    params = torch.stack([logit, loc, log_scale], -1).view(-1, 3, 1, 1, 1)
    return grey.log_prob(x.view(-1, 1, 1, 1), params)


def test_coupling_shifts_g_by_alpha_times_r_and_vanishes_with_zero_coefficients():
    lik = DiscretizedLogistic(PIXEL, components=1)
    loc, log_scale = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-2.0, -2.5, -1.5])
    g_value, b_value = 140 / 255.0, 60 / 255.0
    rs = torch.tensor([10.0, 128.0, 240.0]) / 255.0
    x = torch.stack([rs, torch.full_like(rs, g_value), torch.full_like(rs, b_value)], -1).view(3, 3, 1, 1)
    n = len(rs)

    def params_with(raw: list[float]) -> torch.Tensor:  # K = 1: per channel [logit, loc, log_scale, coeff]
        p = torch.stack([torch.zeros(3), loc, log_scale, torch.tensor(raw)]).view(4, 3, 1, 1)
        return p.expand(n, 4, 3, 1, 1)

    def channel(c: int, values: torch.Tensor, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
        return grey_log_prob(values, torch.zeros(n), loc[c] + shift + torch.zeros(n), log_scale[c].expand(n))

    log_r = channel(0, rs)
    log_b = channel(2, torch.full_like(rs, b_value))
    # raw coefficients 0 and K = 1: the product of the three uncoupled channels
    uncoupled = log_r + channel(1, torch.full_like(rs, g_value)) + log_b
    assert torch.allclose(lik.log_prob(x, params_with([0.0, 0.0, 0.0])), uncoupled, atol=1e-5, rtol=0)
    # α ≠ 0 (β = γ = 0): G's logistic is centred at μ'_G + α·y_R, so G's term moves with R
    raw_alpha = 0.9
    coupled = lik.log_prob(x, params_with([raw_alpha, 0.0, 0.0]))
    y_r = 2.0 * rs - 1.0
    expected = log_r + channel(1, torch.full_like(rs, g_value), math.tanh(raw_alpha) * y_r) + log_b
    assert torch.allclose(coupled, expected, atol=1e-5, rtol=0)
    log_g_given_r = coupled - log_r - log_b
    assert (log_g_given_r.max() - log_g_given_r.min()).item() > 1.0  # R changes G's log-mass
    # and β, γ move B: with all three on, B's term depends on R and G
    full = lik.log_prob(x, params_with([raw_alpha, 0.5, -0.7]))
    log_b_given = full - coupled + log_b
    assert (log_b_given.max() - log_b_given.min()).item() > 0.1


def test_zero_coefficients_with_identical_components_equal_the_uncoupled_product():
    # K > 1 with the raw coefficients at 0: the shared mixture Σ_k π_k Π_c P_k(x_c) is not the product
    # of per-channel mixtures Π_c Σ_k π_k P_k(x_c) in general, but it is when the components are equal
    # across k (whatever the logits), and then it is also the K = 1 product
    gen = torch.Generator().manual_seed(5)
    lik = DiscretizedLogistic((3, 2, 2), components=K)
    logits = torch.randn(6, K, 3, 2, 2, generator=gen)
    loc = torch.randn(6, 1, 3, 2, 2, generator=gen).expand(6, K, 3, 2, 2) * 0.5
    log_scale = (torch.randn(6, 1, 3, 2, 2, generator=gen) - 2.0).expand(6, K, 3, 2, 2)
    params = torch.cat([logits, loc, log_scale, torch.zeros(6, K, 3, 2, 2)], 1)
    x = torch.randint(0, 256, (6, 3, 2, 2), generator=gen).float() / 255.0
    grey = DiscretizedLogistic((3, 2, 2, 1), components=1)  # a 4-D event: uncoupled, one logistic each
    grey_params = torch.stack([torch.zeros(6, 3, 2, 2), loc[:, 0], log_scale[:, 0]], 1).unsqueeze(-1)
    product = grey.log_prob(x.unsqueeze(-1), grey_params)
    assert torch.allclose(lik.log_prob(x, params), product, atol=1e-4, rtol=0)
    # distinct components: the shared mixture differs from the product of per-channel mixtures
    loc2 = loc + torch.randn(6, K, 3, 2, 2, generator=gen)
    params2 = torch.cat([logits, loc2, log_scale, torch.zeros(6, K, 3, 2, 2)], 1)
    per_channel = DiscretizedLogistic((3, 2, 2, 1), components=K)
    shared_logits = logits[:, :, :1].expand(6, K, 3, 2, 2)  # the same weights for every channel
    product2 = per_channel.log_prob(
        x.unsqueeze(-1), torch.cat([shared_logits, loc2, log_scale], 1).unsqueeze(-1)
    )
    assert (lik.log_prob(x, params2) - product2).abs().max().item() > 0.1


def chi2_against(draws: torch.Tensor, coarse: torch.Tensor) -> tuple[float, int]:
    """Pearson's χ² of draws (n, 3) against the 4×4×4 coarse cell masses, cells with fewer than 10
    expected draws merged into one; (statistic, degrees of freedom)."""
    n = draws.shape[0]
    cells = torch.round(draws * 255).long() // 64
    counts = torch.zeros(4, 4, 4, dtype=torch.float64)
    counts.index_put_(
        (cells[:, 0], cells[:, 1], cells[:, 2]), torch.ones(n, dtype=torch.float64), accumulate=True
    )
    expected = coarse * n
    big = expected >= 10
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expect = torch.cat([expected[big], expected[~big].sum().view(1)])
    return ((observed - expect) ** 2 / expect.clamp(min=1e-9)).sum().item(), len(expect) - 1


@pytest.mark.slow  # the 256³ colours enumerated once: about 8 s
def test_samples_follow_the_coupled_mass_and_average_to_mean(enumerated):
    lik = DiscretizedLogistic(PIXEL, components=KP)
    params = coupled_pixel_params()
    n = 40000
    draws = lik.sample(params.expand(n, *params.shape), torch.Generator().manual_seed(1)).view(n, 3)
    assert draws.dtype == torch.float32 and torch.equal(
        draws, torch.round(draws * 255) / 255
    )  # the 8-bit grid
    assert draws.min() >= 0 and draws.max() <= 1
    draws = draws.double()
    exact = enumerated["mean"]
    standard_error = (draws.var(0) / n).sqrt()
    assert ((draws.mean(0) - exact).abs() <= 4 * standard_error + 1e-4).all(), (draws.mean(0), exact)
    # the coupling reaches the samples: their second moments match the mass's
    sample_cross = torch.stack([(draws[:, i] * draws[:, j]).mean() for i, j in ((0, 1), (0, 2), (1, 2))])
    assert torch.allclose(sample_cross, enumerated["cross"], atol=4e-3), (sample_cross, enumerated["cross"])
    # and their joint distribution: a χ² test over the 4×4×4 coarse cells (deterministic seed)
    chi2, df = chi2_against(draws, enumerated["coarse"])
    assert df >= 10 and chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)
    # mean(): the per-component recursion, close to the exact mean of the mass
    mean = lik.mean(params.unsqueeze(0)).view(3).double()
    assert torch.allclose(mean, exact, atol=3e-3), (mean, exact)
    # and the sample average matches mean() itself within its statistical error plus that gap
    assert ((draws.mean(0) - mean).abs() <= 4 * standard_error + 3e-3).all()


@pytest.mark.slow  # the 256³ colours enumerated once: about 8 s
def test_the_sampling_check_would_catch_a_sampler_without_coupling(enumerated):
    # the same pixel drawn with its raw coefficients set to 0 (channels independent within a component)
    # fails the χ² test against the coupled mass by far: the check above has power
    params = coupled_pixel_params()
    off = params.clone()
    off[3 * KP :] = 0.0
    lik = DiscretizedLogistic(PIXEL, components=KP)
    n = 40000
    draws = lik.sample(off.expand(n, *off.shape), torch.Generator().manual_seed(1)).view(n, 3).double()
    chi2, df = chi2_against(draws, enumerated["coarse"])
    assert chi2 > 10 * (df + 6 * math.sqrt(2 * df)), (chi2, df)


# ---- the uncoupled behaviour, kept as it was ---------------------------------------------------------


def frozen_uncoupled(event_shape, params, x, generator):
    """The likelihood's code before the coupling was added (copied verbatim): log_prob, mean, sample."""
    axis = -len(event_shape) - 1
    logits, loc, log_scale = params.float().chunk(3, dim=axis)
    log_scale = log_scale.clamp(min=-7.0)
    y = (2.0 * x.float() - 1.0).unsqueeze(axis)
    inv_scale = torch.exp(-log_scale)
    half = 1.0 / 255
    upper = inv_scale * (y - loc + half)
    lower = inv_scale * (y - loc - half)
    log_mass = -F.softplus(-upper) - F.softplus(lower) + torch.log(-torch.expm1(lower - upper))
    log_mass = torch.where(y < -1.0 + half, -F.softplus(-upper), log_mass)
    log_mass = torch.where(y > 1.0 - half, -F.softplus(lower), log_mass)
    log_p = torch.logsumexp(log_mass + F.log_softmax(logits, dim=axis), dim=axis)
    log_prob = log_p.flatten(-len(event_shape)).sum(-1)
    s = log_scale.exp()
    clipped = 1.0 - s * (F.softplus((1.0 - loc) / s) - F.softplus((-1.0 - loc) / s))
    mean = (((torch.softmax(logits, dim=axis) * clipped).sum(axis) + 1.0) / 2.0).clamp(0.0, 1.0)
    u = torch.rand(logits.shape, generator=generator).clamp(1e-20, 1.0)
    choice = (logits - torch.log(-torch.log(u))).argmax(axis, keepdim=True)
    mu, log_s = loc.gather(axis, choice).squeeze(axis), log_scale.gather(axis, choice).squeeze(axis)
    u = torch.rand(mu.shape, generator=generator).clamp(1e-5, 1.0 - 1e-5)
    yy = (mu + log_s.exp() * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
    sample = torch.round((yy + 1.0) / 2.0 * 255) / 255
    return log_prob, mean, sample


def direct_uncoupled_log_prob(event_shape, params, x):
    """Σ over values of log Σ_k π_k (σ(upper) − σ(lower)), in float64, per value independent."""
    axis = -len(event_shape) - 1
    logits, loc, log_scale = params.double().chunk(3, dim=axis)
    s = log_scale.clamp(min=-7.0).exp()
    y = (2.0 * x.double() - 1.0).unsqueeze(axis)
    h = 1.0 / 255
    up = torch.where(y > 1 - h, torch.ones_like(y + loc), torch.sigmoid((y + h - loc) / s))
    lo = torch.where(y < -1 + h, torch.zeros_like(y + loc), torch.sigmoid((y - h - loc) / s))
    prob = (torch.softmax(logits, dim=axis) * (up - lo)).sum(axis)
    return prob.log().flatten(-len(event_shape)).sum(-1)


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 3, 3), (3,), (30,), (3, 5), (4, 2, 2)])
def test_other_events_keep_the_uncoupled_per_value_mixture_exactly(shape):
    gen = torch.Generator().manual_seed(7)
    lik = build_likelihood("discretized-logistic", shape, components=K)
    assert lik.params_per_dim == 3 * K
    params = torch.randn(5, 3 * K, *shape, generator=gen)
    params[:, 2 * K :] -= 2.0
    x = torch.randint(0, 256, (5, *shape), generator=gen).float() / 255.0
    x.view(5, -1)[:, 0] = 0.0
    x.view(5, -1)[:, -1] = 1.0
    log_prob, mean, sample = frozen_uncoupled(shape, params, x, torch.Generator().manual_seed(11))
    assert torch.equal(lik.log_prob(x, params), log_prob)
    assert torch.equal(lik.mean(params), mean)
    assert torch.equal(lik.sample(params, torch.Generator().manual_seed(11)), sample)
    assert torch.allclose(
        lik.log_prob(x, params).double(), direct_uncoupled_log_prob(shape, params, x), atol=1e-4
    )


# ---- end to end: a VAE on 3-channel 8×8 bytes ----------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "conv", "hvae"])
def test_a_colour_vae_with_the_coupled_likelihood_trains(model):
    options = {
        "mlp": {"hidden": [32]},
        "conv": {"channels": [8, 16]},
        "hvae": {
            "channels": [8, 16, 16],
            "groups": [1, 1, 1],
            "enc_blocks": [1, 1, 1],
            "latent_channels": [2, 2, 2],
        },
    }[model]
    cfg = Config(
        model=MODELS[model].config(likelihood="discretized-logistic", mixtures=2, latent=4, **options)
    )
    vae = build_vae(cfg, (3, 8, 8), {"levels": 256})
    assert vae.likelihood.coupled and vae.likelihood.params_per_dim == 8  # 4K per channel
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=gen).float() / 255.0
    q = vae.encode(x)
    z = q.mean if not vae.structure.groups(vae) else torch.zeros(4, vae.latent)
    assert vae.decode_params(z).shape == (4, 8, 3, 8, 8)
    terms = elbo(vae, x, generator=gen)
    assert all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].backward()
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        sample = vae.sample(3, mean=False)
    assert sample.shape == (3, 3, 8, 8) and torch.equal(sample, torch.round(sample * 255) / 255)
    assert sample.min() >= 0 and sample.max() <= 1
