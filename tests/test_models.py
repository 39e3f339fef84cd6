"""Every registered model: shapes, gradients, no NaN, learning on a fixed batch."""

import pytest
import torch

from turbovae.errors import ConfigError
from turbovae.likelihoods import build_likelihood
from turbovae.models import MODELS, TEXT_MODELS, ConvConfig, MLPConfig, build_network
from turbovae.objectives import elbo
from turbovae.vae import VAE

# image and vector models; the text models (token ids, categorical likelihood) are tested in test_text.py
SHAPES = {"mlp": [(12,), (1, 8, 8)], "conv": [(1, 8, 8), (3, 32, 32), (1, 28, 28)]}
LATENT = 4
SMALL = {"mlp": MLPConfig(hidden=[32], latent=LATENT), "conv": ConvConfig(channels=[8, 16], latent=LATENT)}


def make(name, shape, likelihood="bernoulli", device="cpu"):
    lik = build_likelihood(likelihood, shape)
    net = build_network(name, shape, LATENT, lik.params_per_dim, SMALL[name])
    return VAE(net, lik, LATENT).to(device)


def batch(shape, n=6, device="cpu"):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)).round().to(device)


def test_every_model_has_test_shapes():
    # hvae's latents are groups with conditional priors, not one N(0, I) vector: tests/test_hvae.py;
    # the autoencoders' spatial latents and losses: tests/test_autoencoder.py
    autoencoders = {name for name in MODELS if name.startswith("autoencoder-")}
    assert autoencoders and set(SHAPES) | set(TEXT_MODELS) | {"hvae"} | autoencoders == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_carries_its_own_options(name):
    spec = MODELS[name]
    cfg = spec.config()
    assert cfg.name == name  # the family's dataclass defaults to its own name
    assert set(spec.fields) <= set(type(cfg).__dataclass_fields__) and "name" not in spec.fields
    assert spec.width is None or spec.width in spec.config.options()
    with pytest.raises(AttributeError):  # an option the family does not have cannot be set by mistake
        cfg.no_such_option = 1


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-pixel"])
def test_shapes_gradients_and_finiteness(name, likelihood, device):
    for shape in SHAPES[name]:
        vae = make(name, shape, likelihood, device)
        x = batch(shape, device=device)
        q = vae.encode(x)
        assert q.mean.shape == (6, 4) and q.stddev.shape == (6, 4)
        assert vae.decode_params(q.mean).shape == (6, vae.likelihood.params_per_dim, *shape)
        assert vae.decode_params(torch.randn(3, 6, 4, device=device)).shape[:2] == (3, 6)
        assert vae.decode(q.mean).shape == (6, *shape)
        assert vae.sample(5).shape == (5, *shape)
        terms = elbo(vae, x)
        assert all(torch.isfinite(v) for v in terms.values())
        terms["loss"].backward()
        for pname, p in vae.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, f"{name} {shape}: {pname} receives no gradient"


@pytest.mark.slow  # torch.compile of a forward and backward (about 20 s)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_compiled_bf16_gradients_match_eager(name):
    """torch.compile under bf16 autocast on the CPU gives the eager gradients, for every parameter (with
    nn.Upsample in the conv decoder, torch 2.13's inductor gave zeros for every layer before it: a compiled
    conv VAE stopped learning)."""
    import copy

    shape = SHAPES[name][0]
    eager = make(name, shape)
    compiled = copy.deepcopy(eager)
    x = batch(shape, n=16)
    eps = torch.randn(16, LATENT, generator=torch.Generator().manual_seed(1))

    def backward(vae):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = elbo(vae, x, eps=eps)
        terms["loss"].backward()

    backward(eager)
    torch.compile(lambda: backward(compiled), dynamic=False)()
    for (pname, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert b.grad is not None and b.grad.abs().sum() > 0, f"{name}: {pname} has no compiled gradient"
        torch.testing.assert_close(b.grad, a.grad, rtol=0.05, atol=0.05 * a.grad.abs().max().item())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_one_step_lowers_the_loss_on_a_fixed_batch(name, device):
    shape = SHAPES[name][0]
    vae = make(name, shape, device=device)
    x = batch(shape, device=device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def loss():
        return elbo(vae, x, generator=torch.Generator(device=device).manual_seed(1))["loss"]

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_tiny_batch_can_be_overfitted(name, device):
    shape = SHAPES[name][0]
    vae = make(name, shape, device=device)
    x = batch(shape, n=4, device=device)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator(device=device).manual_seed(2)
    first = None
    for _ in range(300):
        terms = elbo(vae, x, generator=g)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["rec"].item()
    with torch.no_grad():
        rec = (vae.reconstruct(x) > 0.5).float()
    assert terms["rec"].item() < 0.25 * first
    assert (rec == x).float().mean() > 0.95


def test_conv_rejects_vectors_and_odd_sizes():
    with pytest.raises(ConfigError, match="needs images"):
        build_network("conv", (12,), 4, 1, SMALL["conv"])
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_network("conv", (1, 30, 30), 4, 1, SMALL["conv"])


def test_unknown_model_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'conv'"):
        build_network("cnv", (1, 8, 8), 4, 1, SMALL["conv"])
