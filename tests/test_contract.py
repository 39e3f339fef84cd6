"""The contract every registered model keeps (timm's test_models.py over list_models(); diffusers' tiny
config + shared mixins): registering a model in ``MODELS`` enrols it here.

For each model: a tiny run through the real training path (build, forward, finite loss, backward,
checkpoint), then on the loaded model: a finite loss whose gradients are finite, the same loss twice
under one seed, a save/load round trip (the Hub layout) that reproduces its outputs bit for bit,
samples and encodings of the right shapes, the export graphs its latent structure declares run
against the model's own methods, and a lossless round trip through the codec where the structure and
the likelihood support one.
"""

from __future__ import annotations

import pytest
import torch

import turbovae
from turbovae.engine.setup import setup
from turbovae.models import MODELS
from turbovae.objectives import elbo

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song",
    "we walk to the shop",
    "she reads a good book",
    "he drinks hot tea",
] * 20


def _tiny(name: str, tmp_path) -> turbovae.Config:
    """The smallest config that trains ``name``: digits (8×8) for images, a made-up corpus for text."""
    spec = MODELS[name]
    overrides = [f"model.name={name}", "train.max_steps=3", "train.epochs=1", "train.threads=1",
                 "train.compile=off", "train.precision=fp32", "eval.iwae_k=0", "model.latent=4"]  # fmt: skip
    if spec.width is not None:
        overrides.append(f"model.{spec.width}=[8,8]")
    if spec.text:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(LINES) + "\n")
        text = [f"data.name=text:{corpus}", "train.batch_size=16"]
        return turbovae.resolve("text", overrides=[*text, *overrides])
    return turbovae.resolve("digits-mlp", overrides=["train.batch_size=32", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run per registered model (built lazily, shared by the tests of this file)."""
    runs: dict[str, turbovae.VAE] = {}

    def get(name: str) -> tuple[turbovae.VAE, torch.Tensor]:
        if name not in runs:
            tmp = tmp_path_factory.mktemp(name)
            turbovae.fit(_tiny(name, tmp), tmp / "run")
            runs[name] = turbovae.load(tmp / "run")
        vae = runs[name]
        x, prepare = setup(vae.config, torch.device("cpu"), vae.data_meta).split("test")
        return vae, prepare(x[:6])

    return get


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_to_a_finite_loss_with_finite_gradients(name, trained):
    vae, x = trained(name)
    vae.train()
    terms = elbo(vae, x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"]) and terms["rec"] >= 0 and terms["kl"] >= 0
    vae.zero_grad()
    terms["loss"].backward()
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    vae.zero_grad()
    vae.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_deterministic_under_a_seed(name, trained):
    vae, x = trained(name)
    with torch.no_grad():
        a = elbo(vae, x, generator=torch.Generator().manual_seed(3))["loss"]
        b = elbo(vae, x, generator=torch.Generator().manual_seed(3))["loss"]
        c = vae.sample(4, generator=torch.Generator().manual_seed(1))
        d = vae.sample(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_round_trips_through_save_and_load(name, trained, tmp_path):
    vae, x = trained(name)
    turbovae.hub.save_pretrained(vae, tmp_path / "hub")
    again = turbovae.from_pretrained(tmp_path / "hub")
    assert again.structure is vae.structure
    for key, value in vae.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(vae.reconstruct(x), again.reconstruct(x))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(elbo(vae, x, generator=g1)["nelbo"], elbo(again, x, generator=g2)["nelbo"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_samples_and_encodes_with_the_declared_shapes(name, trained):
    vae, x = trained(name)
    with torch.no_grad():
        samples = vae.sample(5, generator=torch.Generator().manual_seed(0))
        q = vae.encode(x)
        recon = vae.reconstruct(x)
    assert samples.shape == (5, *vae.event_shape) and recon.shape == x.shape
    assert q.mean.shape == (len(x), vae.structure.prior_size(vae))
    assert torch.isfinite(q.mean).all() and torch.isfinite(q.stddev).all()
    if samples.is_floating_point():
        assert torch.isfinite(samples).all() and torch.isfinite(recon).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_models_export_graphs_compute_what_the_model_computes(name, trained):
    """The graphs ``turbovae export`` writes, run eagerly: the encoder gives the posterior of
    ``vae.encode`` (every group's, for a hierarchy), a decoder the model's own likelihood parameters.
    (The ONNX files themselves are checked in tests/test_export.py.)"""
    vae, _ = trained(name)
    graphs = {g.name: g for g in vae.structure.export_graphs(vae)}
    assert {"encoder", "decoder"} <= set(graphs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for graph in graphs.values():
            outputs = graph.module(*graph.inputs(3, gen))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            assert len(outputs) == len(graph.output_names)
            assert all(torch.isfinite(o).all() for o in outputs)
        (inputs,) = graphs["encoder"].inputs(3, torch.Generator().manual_seed(1))
        mean, _ = graphs["encoder"].module(inputs)
        top = vae.structure.prior_size(vae)
        assert torch.allclose(mean[:, :top], vae.encode(inputs).mean, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_codes_losslessly_where_its_structure_and_likelihood_allow(name, trained):
    vae, x = trained(name)
    refusal = vae.structure.codec_refusal(vae)
    if refusal is not None or vae.likelihood.codec is None:
        with pytest.raises(turbovae.ConfigError):
            turbovae.compress(vae, x)
        return
    symbols = x.round().to(torch.uint8)  # the run's binarised test images
    symbols = symbols[:4]  # one step of four lanes: the codec is exercised, not timed
    data = turbovae.compress(vae, symbols, batch=4)
    assert torch.equal(turbovae.decompress(vae, data), symbols)
