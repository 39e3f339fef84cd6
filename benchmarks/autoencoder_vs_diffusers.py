"""turbovae's autoencoder-kl against diffusers' AutoencoderKL trained the way diffusers' example script
(examples/research_projects/autoencoderkl/train_autoencoderkl.py) trains it, side by side in one run.

Both sides: the same architecture (turbovae's modules carry diffusers' names, so both start from the
same weights, copied), the same patch-GAN discriminator (taming's NLayerDiscriminator, same weights),
L1 + MS-SSIM (the script's LPIPS needs downloaded VGG weights; MS-SSIM is the offline perceptual term
here, with gradient on both sides), KL weight 1e-6, hinge loss, LDM's adaptive weight, AdamW for both
players at the same learning rate and betas, the same batches of crops of scikit-image's photos, fp32.

The peer alternates as the script does: each batch encodes and decodes, then either steps the
autoencoder (even batches) or the discriminator (odd batches; with its optimiser step, which the
merged script lacked until diffusers PR #11113). turbovae updates both players on every batch from one
forward and one backward (structures/perceptual.py). One *update* below is one autoencoder update and
one discriminator update: a batch for turbovae, two for the peer.

Measured: images/s of the whole step (batches processed per second × batch) and updates/s, at 64x64
and 128x128 crops; PSNR and MS-SSIM of the held-out photos (chelsea, rocket: non-overlapping crops) at
equal updates and at equal wall-clock. ``--quick`` ran in 1 min 45 s on a quiet 2-core AMD EPYC.

    PYTHONPATH=src python benchmarks/autoencoder_vs_diffusers.py --quick
    PYTHONPATH=src python benchmarks/autoencoder_vs_diffusers.py --stability 2000   # bf16, disc on
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from turbovae.config import resolve
from turbovae.data.images import load_photos
from turbovae.engine.optim import make_optimizer
from turbovae.engine.setup import build_vae
from turbovae.engine.step import make_step
from turbovae.structures.perceptual import hinge_d_loss, ms_ssim


def turbovae_vae(crop: int, channels: str, precision: str = "fp32") -> tuple[Any, Any]:
    flags = {"model.name": "autoencoder-kl", "model.channels": channels, "model.latent": "4",
             "train.optimizer": "adamw", "train.lr": "2e-4", "train.beta": "1e-6",
             "train.precision": precision}  # fmt: skip
    overrides = ["model.ms_ssim=0.1", "model.disc_weight=0.5", "model.disc_start=0",
                 "model.disc_betas=[0.9,0.999]", "train.betas=[0.9,0.999]", "train.weight_decay=0.01",
                 "model.disc_weight_decay=0.01", "model.likelihood=laplace-learned"]  # fmt: skip
    cfg = resolve("digits-mlp", flags, overrides)
    vae = build_vae(cfg, (3, crop, crop))
    vae.net.init_from_data(None)
    return cfg, vae.train()


class Peer:
    """diffusers' AutoencoderKL and the discriminator, trained as the example script trains them."""

    def __init__(self, vae: Any, lr: float = 2e-4) -> None:
        import diffusers

        net = vae.net
        config = {k: v for k, v in net.to_diffusers_config(1.0).items() if not k.startswith("_")}
        self.ae = diffusers.AutoencoderKL(**config)
        self.ae.load_state_dict(net.diffusers_state())  # the same start as turbovae's
        self.disc = copy.deepcopy(net.discriminator)
        self.ae.train(), self.disc.train()
        self.opt = torch.optim.AdamW(self.ae.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.disc_opt = torch.optim.AdamW(
            self.disc.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01
        )
        self.batch = 0

    def iteration(self, x01: torch.Tensor) -> None:
        targets = x01 * 2 - 1
        posterior = self.ae.encode(targets).latent_dist
        reconstructions = self.ae.decode(posterior.sample()).sample
        if self.batch % 2 == 0:
            rec_loss = F.l1_loss(reconstructions.float(), targets.float(), reduction="none")
            p_loss = 1 - ms_ssim((reconstructions + 1) / 2, x01)  # (B,), with gradient
            rec_loss = rec_loss + 0.1 * p_loss[:, None, None, None]
            nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
            kl_loss = torch.sum(posterior.kl()) / x01.shape[0]
            g_loss = -torch.mean(self.disc(reconstructions))
            last = self.ae.decoder.conv_out.weight
            nll_grads = torch.autograd.grad(nll_loss, last, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            weight = (torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)).clamp(0.0, 1e4).detach() * 0.5
            loss = nll_loss + 1e-6 * kl_loss + weight * g_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            d_loss = hinge_d_loss(self.disc(targets), self.disc(reconstructions))
            d_loss.backward()
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
            self.ae.zero_grad(set_to_none=True)  # the graph reached the AE's weights too
        self.batch += 1

    def update(self, batches: list[torch.Tensor]) -> None:
        for x in batches:
            self.iteration(x)

    def as_turbovae(self, vae: Any) -> Any:
        twin = copy.deepcopy(vae)
        twin.net.load_state_dict({**twin.net.state_dict(), **self.ae.state_dict()})
        return twin.eval()


def evaluate(vae: Any, x_test: torch.Tensor) -> dict[str, float]:
    was = vae.training
    vae.eval()
    out = vae.structure.final_metrics(vae, x_test, lambda b: b.float() / 255.0)
    vae.train(was)
    return {"psnr": round(out["test_psnr"], 3), "ms_ssim": round(out["test_ms_ssim"], 4)}


class Batches:
    def __init__(self, x: torch.Tensor, batch: int, seed: int = 0) -> None:
        self.x, self.batch, self.g = x, batch, torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        idx = torch.randint(len(self.x), (self.batch,), generator=self.g)
        return self.x[idx].float() / 255.0


def turbovae_step(cfg: Any, vae: Any, precision: str = "fp32") -> Any:
    opt = make_optimizer(cfg, vae)
    step = make_step(vae, opt, None, cfg, torch.device("cpu"), precision)
    g = torch.Generator().manual_seed(1)
    return lambda x: step(x, torch.randn(len(x), vae.latent, generator=g))


def speed(crop: int, channels: str, batch: int, updates: int, data: Any) -> dict[str, Any]:
    """Updates/s and images/s of both sides on the same batches, interleaved in rounds (a loaded
    machine slows both alike), after a warm-up."""
    cfg, vae = turbovae_vae(crop, channels)
    peer = Peer(vae)
    step = turbovae_step(cfg, vae)
    src = Batches(data.x_train, batch)
    for _ in range(2):  # warm-up
        step(src.next())
        peer.update([src.next(), src.next()])
    t_ours = t_peer = 0.0
    for _ in range(updates):
        x1, x2 = src.next(), src.next()
        t0 = time.perf_counter()
        step(x1)
        t1 = time.perf_counter()
        peer.update([x1, x2])
        t2 = time.perf_counter()
        t_ours, t_peer = t_ours + t1 - t0, t_peer + t2 - t1
    return {
        "crop": crop, "batch": batch, "updates": updates,
        "turbovae_updates_s": round(updates / t_ours, 3), "peer_updates_s": round(updates / t_peer, 3),
        "turbovae_images_s": round(updates * batch / t_ours, 2),
        "peer_images_s": round(2 * updates * batch / t_peer, 2),  # two batches per update
        "speedup_updates": round(t_peer / t_ours, 3),
        "speedup_images": round((updates * batch / t_ours) / (2 * updates * batch / t_peer), 3),
    }  # fmt: skip


def quality(crop: int, channels: str, batch: int, updates: int, data: Any) -> dict[str, Any]:
    """Equal updates: both sides run ``updates``; equal wall-clock: the peer continues (or stops) at
    turbovae's training time."""
    cfg, vae = turbovae_vae(crop, channels)
    peer = Peer(vae)
    step = turbovae_step(cfg, vae)
    ours_src, peer_src = Batches(data.x_train, batch, 7), Batches(data.x_train, batch, 7)
    t0 = time.perf_counter()
    for _ in range(updates):
        step(ours_src.next())
    t_ours = time.perf_counter() - t0
    t0, done, at_equal_time = time.perf_counter(), 0, None
    while done < updates or at_equal_time is None:
        peer.update([peer_src.next(), peer_src.next()])
        done += 1
        if at_equal_time is None and time.perf_counter() - t0 >= t_ours:
            at_equal_time = (done, evaluate(peer.as_turbovae(vae), data.x_test))
        if done == updates:
            at_equal_updates = evaluate(peer.as_turbovae(vae), data.x_test)
            t_peer = time.perf_counter() - t0
    return {
        "crop": crop, "updates": updates, "turbovae": evaluate(vae, data.x_test),
        "turbovae_seconds": round(t_ours, 1), "peer_equal_updates": at_equal_updates,
        "peer_seconds": round(t_peer, 1), "peer_equal_time": at_equal_time[1],
        "peer_updates_in_that_time": at_equal_time[0],
    }  # fmt: skip


def stability(steps: int, crop: int = 32) -> dict[str, Any]:
    """``steps`` bf16 steps with the discriminator on from the start: are the weights finite?"""
    data = load_photos(crop)
    cfg, vae = turbovae_vae(crop, "32,64", precision="bf16")
    step = turbovae_step(cfg, vae, "bf16")
    src = Batches(data.x_train, 8)
    skipped = 0.0
    for _ in range(steps):
        skipped += float(step(src.next())[5])
    finite = all(bool(torch.isfinite(p).all()) for p in vae.parameters())
    return {
        "bf16_steps": steps,
        "finite_weights": finite,
        "skipped_steps": skipped,
        **evaluate(vae, data.x_test),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small widths, few updates: about 2 min")
    p.add_argument("--stability", type=int, default=0, help="only the bf16 stability run of N steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stability:
        print(json.dumps(stability(args.stability)))
        return
    channels, batch = ("32,64", 4) if args.quick else ("64,128,128", 8)
    n_speed, n_quality = (4, 30) if args.quick else (20, 300)
    print(json.dumps({"threads": torch.get_num_threads(), "channels": channels, "quick": args.quick}))
    for crop in (64, 128):
        data = load_photos(crop)
        print(json.dumps(speed(crop, channels, batch, n_speed, data)), flush=True)
    data = load_photos(64)
    print(json.dumps(quality(64, channels, batch, n_quality, data)), flush=True)


if __name__ == "__main__":
    main()
