"""Latent diffusion's autoencoders (models/autoencoder.py, structures/perceptual.py): photos as crops,
the losses, the two players in one step, and diffusers interop with the real diffusers package."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from turbovae.cli import main
from turbovae.commands.export import export_diffusers
from turbovae.config import resolve
from turbovae.data.images import crop_tiles, load_photo_folder
from turbovae.engine.setup import build_vae
from turbovae.errors import ConfigError
from turbovae.likelihoods import build_likelihood

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SMALL = {"model.name": "autoencoder-kl", "model.channels": "16,32", "model.latent": "4"}


def small_vae(shape=(3, 16, 16), **overrides):
    flags = {**SMALL, **{f"model.{k}": str(v) for k, v in overrides.items()}}
    cfg = resolve("digits-mlp", flags, ["model.likelihood=laplace-learned"])
    vae = build_vae(cfg, shape)
    with torch.no_grad():  # off the init, so that a swapped weight would show
        for p in vae.net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return vae


def diffusers_kl(channels=(16, 32), groups=16):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
        layers_per_block=1, latent_channels=4, norm_num_groups=groups, sample_size=16,
    ).eval()  # fmt: skip


@pytest.mark.slow  # diffusers' from_pretrained: about 3 s of imports the first time
def test_export_loads_in_diffusers_with_the_same_latents_and_decodings(tmp_path):
    vae = small_vae().eval()
    export_diffusers(vae, tmp_path)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, post = vae.encode(x), theirs.encode(x * 2 - 1).latent_dist
        assert (q.mean - post.mean.flatten(1)).abs().max() < TOL
        assert (q.stddev - post.std.flatten(1)).abs().max() < TOL
        mine, want = vae.decode(q.mean), (theirs.decode(post.mean).sample + 1) / 2
    assert (mine - want).abs().max() < TOL
    assert mine.std() > 1e-3  # not a constant picture
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 1.0


def test_init_from_a_diffusers_directory_reproduces_its_outputs(tmp_path):
    theirs = diffusers_kl()
    theirs.save_pretrained(tmp_path)
    vae = small_vae(init=tmp_path)
    vae.net.init_from_data(None)
    vae.eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = theirs.encode(x * 2 - 1).latent_dist
        q = vae.encode(x)
        assert (q.mean - post.mean.flatten(1)).abs().max() < TOL
        want = (theirs.decode(post.mean).sample + 1) / 2
        assert (vae.decode(q.mean) - want).abs().max() < TOL


def test_init_refuses_a_directory_of_another_shape(tmp_path):
    diffusers_kl(channels=(32, 64), groups=32).save_pretrained(tmp_path)
    vae = small_vae(init=tmp_path)
    with pytest.raises(ConfigError, match="block_out_channels"):
        vae.net.init_from_data(None)


def test_freeze_encoder_trains_the_decoder_only(tmp_path):
    vae = small_vae(freeze="encoder")
    vae.net.init_from_data(None)
    groups = vae.structure.param_groups(vae)
    trained = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trained for p in vae.net.encoder.parameters())
    assert all(id(p) in trained for p in vae.net.decoder.parameters())
    vae.train()
    assert not vae.net.encoder.training and vae.net.decoder.training


def test_laplace_likelihood_is_the_laplace_density():
    like = build_likelihood("laplace-learned", (3, 2, 2), 0.3)
    x, loc = torch.rand(4, 3, 2, 2), torch.rand(4, 1, 3, 2, 2)
    scale = like._loc_log_scale(loc)[1].exp()[0, 0, 0, 0]
    want = torch.distributions.Laplace(loc[:, 0], scale).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(like.log_prob(x, loc), want, atol=1e-4)


def test_crops_of_photos_of_any_size(tmp_path):
    tiles = crop_tiles(np.zeros((40, 50, 3), np.uint8), 16, 8)
    assert tiles.shape == (4 * 5, 3, 16, 16)
    assert crop_tiles(np.zeros((10, 30, 1), np.uint8), 16, 16).shape == (3, 1, 16, 16)  # enlarged
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 33)), ("b.jpg", (20, 64)), ("c.png", (48, 48))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    ds = load_photo_folder(tmp_path, 16, test_fraction=0.34)
    assert ds.x_train.shape[1:] == (3, 16, 16) and ds.x_test.shape[1:] == (3, 16, 16)
    assert len(ds.x_test) >= 1 and len(ds.x_train) > len(ds.x_test)


def test_gan_gradients_do_not_cross_between_players():
    """One backward of the joint loss gives the discriminator exactly the gradient of its own loss,
    and the autoencoder exactly that of its terms (the generator's GAN term sees frozen disc weights)."""
    from turbovae.structures.perceptual import hinge_d_loss

    vae = small_vae(disc_weight=0.5, disc_channels=8, disc_layers=2, adaptive_weight="false").train()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(4, vae.latent, generator=torch.Generator().manual_seed(4))
    disc = vae.net.discriminator
    state = {k: v.clone() for k, v in disc.state_dict().items()}
    vae.structure.elbo(vae, x, eps=eps, beta=1e-6)["loss"].backward()
    joint = [p.grad.clone() for p in disc.parameters()]
    dec_joint = vae.net.decoder.conv_out.weight.grad.clone()
    vae.zero_grad(set_to_none=True)
    disc.load_state_dict(state)  # the batch norms' running statistics as before
    params = vae.net.decode(vae.net.encode(x).rsample(eps=eps))
    x_rec = vae.likelihood.mean(params)
    hinge_d_loss(disc(x * 2 - 1), disc(x_rec.detach() * 2 - 1)).backward()
    for a, p in zip(joint, disc.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)
    assert vae.net.decoder.conv_out.weight.grad is None  # the disc loss reached no AE weight
    assert dec_joint.abs().sum() > 0


def _photos(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, size in enumerate(((40, 36), (36, 52), (33, 33))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.slow  # a training run, its evaluation and an export (about 10 s)
def test_train_crop_summary_and_diffusers_export(tmp_path):
    data, run, out = _photos(tmp_path / "photos"), tmp_path / "run", tmp_path / "dif"
    args = ["train", "--data", str(data), "--crop", "16", "--model", "autoencoder-kl", "--channels", "8,16",
            "--latent", "2", "--batch-size", "4", "--epochs", "1", "--out", str(run), "train.max_steps=3",
            "eval.iwae_k=0", "data.validation=0", "model.ms_ssim=0.1", "train.threads=1",
            "model.disc_weight=0.5", "model.disc_channels=8", "model.disc_layers=2"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_psnr", "test_ssim", "test_ms_ssim", "latent_std"):
        assert math.isfinite(summary[key]), key
    assert summary["test_psnr"] > 0
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    theirs = diffusers.AutoencoderKL.from_pretrained(out)
    assert abs(theirs.config.scaling_factor - 1 / summary["latent_std"]) < 1e-6


def _ae_args(data: Path, steps: int, *extra: str) -> list[str]:
    return ["--data", str(data), "--crop", "16", "--model", "autoencoder-kl", "--channels", "8,16",
            "--latent", "2", "--batch-size", "4", "--epochs", "100", "--progress", "off", "train.threads=1",
            "eval.iwae_k=0", "data.validation=0", f"train.max_steps={steps}", "model.disc_weight=0.5",
            "model.disc_channels=8", "model.disc_layers=2", "model.ms_ssim=0.1", *extra]  # fmt: skip


@pytest.mark.slow  # killed and resumed CLI processes (about 40 s)
def test_two_players_resume_bitwise_after_a_kill(tmp_path):
    """SIGKILL after a checkpoint, resume: both players' weights, both optimiser groups' moments, the
    weight average and the GAN's start counter end bitwise equal to an uninterrupted run's; the
    discriminator switches on (disc_start) between the checkpoint and the end."""
    import signal

    from test_resume import run as run_killable

    from turbovae.engine import checkpoint

    data = _photos(tmp_path / "photos")
    args = _ae_args(data, 12, "--checkpoint-every", "5", "model.disc_start=7", "train.ema=0.99")

    def state(out: Path) -> dict[str, torch.Tensor]:
        path = checkpoint.latest(out)
        assert path is not None
        tensors = checkpoint.load(path)[0]
        return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim.", "ema.", "guard."))}

    ref = run_killable(tmp_path, ["train", *args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    killed = run_killable(tmp_path, ["train", *args, "--out", str(tmp_path / "k")], plan="step:9")
    assert killed.returncode == -signal.SIGKILL
    done = run_killable(tmp_path, ["train", "--resume", str(tmp_path / "k")])
    assert done.returncode == 0, done.stderr
    a, b = state(tmp_path / "ref"), state(tmp_path / "k")
    assert a.keys() == b.keys() and any("discriminator" in k for k in a)
    assert any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["model.net.steps"]) >= 12  # the GAN start counter (training passes) was resumed too


@pytest.mark.slow  # 30 bf16 steps with the discriminator on (about 10 s)
def test_bf16_with_the_discriminator_keeps_finite_weights(tmp_path):
    from turbovae import load

    data, run = _photos(tmp_path / "photos"), tmp_path / "run"
    assert main(["train", *_ae_args(data, 30, "--precision", "bf16"), "--out", str(run)]) == 0
    vae = load(run)
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"


def small_vq(shape=(3, 16, 16), **overrides):
    flags = {**SMALL, "model.name": "autoencoder-vq", "model.latent": "3", "model.codebook_size": "16",
             "model.codebook_dim": "5", **{f"model.{k}": str(v) for k, v in overrides.items()}}  # fmt: skip
    cfg = resolve("digits-mlp", flags, ["model.likelihood=laplace-learned"])
    return build_vae(cfg, shape)


@pytest.mark.slow  # diffusers' from_pretrained: about 3 s of imports the first time
def test_vq_export_loads_in_diffusers_vqmodel_with_the_same_latents_and_decodings(tmp_path):
    vae = small_vq()
    with torch.no_grad():
        for p in vae.net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    vae.eval()
    export_diffusers(vae, tmp_path)
    theirs = diffusers.VQModel.from_pretrained(tmp_path).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = theirs.encode(x * 2 - 1).latents
        z = vae.encode(x).mean
        assert (z - h.flatten(1)).abs().max() < TOL
        mine, want = vae.decode(z), (theirs.decode(h).sample + 1) / 2
    assert (mine - want).abs().max() < TOL and mine.std() > 1e-3


def test_vq_straight_through_commitment_and_honest_kl():
    vae = small_vq().train()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    terms = vae.structure.elbo(vae, x, beta=1.0)
    positions = 8 * 8
    assert torch.allclose(terms["kl"], torch.tensor(positions * math.log(16)))
    assert torch.allclose(terms["nelbo"], terms["rec"] + terms["kl"])
    terms["loss"].backward()
    enc = vae.net.encoder.conv_in.weight.grad
    assert enc is not None and enc.abs().sum() > 0  # through the quantiser, straight through
    assert vae.net.quantize.embedding.weight.grad is None  # the EMA moves the codebook, not the gradient


def test_vq_ema_moves_codes_to_their_outputs_and_restarts_dead_ones():
    from turbovae.models.autoencoder import VectorQuantizer

    vq = VectorQuantizer(4, 2, decay=0.5, dead_after=2, commitment=0.25).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]))
        vq.embed_sum.copy_(vq.embedding.weight)
    z = torch.tensor([[1.0, 1.0], [1.2, 1.0], [9.0, 9.0], [9.0, 11.0]]).view(1, 2, 2, 2).permute(0, 3, 1, 2)
    z.requires_grad_(True)
    for _ in range(2):
        vq(z)
    w = vq.embedding.weight
    assert w[0, 0] > 0.3 and w[1, 0] < 10.0  # pulled towards the outputs assigned to them
    used = vq.codes(z.detach().permute(0, 2, 3, 1).reshape(-1, 2)).unique()
    assert set(used.tolist()) - {0, 1}  # codes 2 and 3, unused twice, restarted among the outputs
    assert all(any(torch.allclose(w[c], r) for r in z.detach().permute(0, 2, 3, 1).reshape(-1, 2))
               for c in (2, 3))  # fmt: skip


@pytest.mark.slow  # a training run on the photos and its evaluation (about 60 s)
def test_vq_on_photos_uses_its_codebook(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", "photos", "--crop", "32", "--model", "autoencoder-vq", "--channels", "16,32",
            "--latent", "3", "--batch-size", "8", "--epochs", "1", "--out", str(run), "--progress", "off",
            "train.max_steps=120", "eval.iwae_k=0", "data.validation=0", "model.codebook_size=32",
            "model.dead_after=20", "train.threads=1"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["codebook_usage"] >= 0.9, summary["codebook_usage"]
    assert 1.0 < summary["codebook_perplexity"] <= 32.0
