"""The report's pictures of one model: samples, reconstructions, interpolations, traversals, the KL per
dimension and the latent map, written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import evaluation
from .grids import (
    as_images,
    class_sample_grid,
    grid_image,
    interpolation_grid,
    label_rows,
    reconstruction_grid,
    sample_grid,
    save_grid,
    traversal_grid,
)
from .plots import plot_kl_per_dim, plot_latent_map


@torch.no_grad()
def write_pictures(
    vae: Any,
    x: torch.Tensor,
    out_dir: Path,
    *,
    labels: torch.Tensor | None = None,
    data_name: str = "",
    stats: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Every picture of a trained model on prepared test inputs ``x`` (N, *event_shape), into ``out_dir``.

    ``stats`` are evaluate's posterior statistics (``kl_per_dim``, ``posterior_mean_variance``,
    ``active_threshold``) and ``means`` (N, L) of q(z | x); they are computed when not given. Returns
    {name: path} for samples, reconstructions, interpolations, traversals, kl_per_dim, latent_map.

    A conditional VAE (``vae.n_classes``) takes the inputs' class ids from ``labels``: its samples are
    one row per class, and the other pictures encode and decode with the inputs' classes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = vae.training
    vae.eval()
    cond = labels.to(x.device) if vae.n_classes and labels is not None else None
    if stats is None:
        q = evaluation.encode_all(vae, x, lambda t: t, y=cond)
        _, variance = evaluation.active_units(q)
        stats = {
            "kl_per_dim": evaluation.kl_per_dim(q),
            "posterior_mean_variance": variance,
            "active_threshold": evaluation.ACTIVE_THRESHOLD,
            "means": q.mean,
        }
    paths: dict[str, Path] = {}
    shape = vae.event_shape
    vector = len(shape) != 3 and as_images(x[:1], shape).shape[2] == 1  # shown as strips

    paths["samples"] = out_dir / "samples.png"
    if vae.n_classes:  # one row of 8 per class
        save_grid(class_sample_grid(vae, 8, seed=7 + seed), paths["samples"], nrow=8)
    else:
        save_grid(sample_grid(vae, 64, seed=7 + seed), paths["samples"], nrow=8)

    n_recon = min(16, len(x))
    paths["reconstructions"] = out_dir / "reconstructions.png"
    recon_y = None if cond is None else cond[:n_recon]
    save_grid(reconstruction_grid(vae, x[:n_recon], recon_y), paths["reconstructions"], nrow=n_recon)

    g = torch.Generator().manual_seed(seed)
    pairs = min(8, len(x) // 2)
    if pairs >= 1:
        order = torch.randperm(len(x), generator=g)[: 2 * pairs].to(x.device)
        steps = 8
        pair_y = None if cond is None else (cond[order[:pairs]], cond[order[pairs:]])
        images = interpolation_grid(vae, x[order[:pairs]], x[order[pairs:]], steps=steps, condition=pair_y)
        picture = grid_image(images, nrow=steps + 2, min_side=512 if not vector else 256)
        paths["interpolations"] = out_dir / "interpolations.png"
        picture.save(paths["interpolations"], format="PNG")

    kl = np.asarray(stats["kl_per_dim"], dtype=float)
    top = [int(d) for d in np.argsort(-kl, kind="stable")[: min(8, len(kl))]]
    values = np.linspace(-3, 3, 9).tolist()
    base = torch.as_tensor(stats["means"][0], dtype=torch.float32, device=x.device)
    images = traversal_grid(vae, base, top, values, None if cond is None else cond[0])
    picture = grid_image(images, nrow=len(values), min_side=512 if not vector else 256)
    picture = label_rows(picture, [f"z{d} · KL {kl[d]:.2f}" for d in top], width=130)
    paths["traversals"] = out_dir / "traversals.png"
    picture.save(paths["traversals"], format="PNG")

    paths["kl_per_dim"] = out_dir / "kl_per_dim.png"
    plot_kl_per_dim(
        stats["kl_per_dim"], stats["posterior_mean_variance"], stats["active_threshold"], paths["kl_per_dim"]
    )

    paths["latent_map"] = out_dir / "latent_map.png"
    y = labels.cpu().numpy() if labels is not None else None
    means = torch.as_tensor(stats["means"]).cpu().numpy()
    names = vae.condition["names"] if vae.condition is not None else CLASS_NAMES.get(data_name)
    stats["latent_map_axes"] = plot_latent_map(means, y, paths["latent_map"], names)
    vae.train(was_training)
    return paths


# names of the classes of the built-in labelled data, for legends
FASHION = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"


CLASS_NAMES: dict[str, list[str]] = {"fashion-mnist": FASHION.split(",")}
