"""The report's pictures of one model: samples, reconstructions, interpolations, traversals, the KL per
dimension and the latent map, written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import evaluation
from . import barcodes
from .grids import (
    as_images,
    class_sample_grid,
    grid_image,
    interpolation_grid,
    label_rows,
    reconstruction_picture,
    sample_grid,
    save_class_grid,
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
    grey: torch.Tensor | None = None,
    barcode: str | None = None,
) -> dict[str, Path]:
    """Every picture of a trained model on prepared test inputs ``x`` (N, *event_shape), into ``out_dir``.

    ``stats`` are evaluate's posterior statistics (``kl_per_dim``, ``posterior_mean_variance``,
    ``active_threshold``) and ``means`` (N, L) of q(z | x); they are computed when not given. ``grey``:
    the inputs before binarisation (in [0, 1]), drawn above their binarised draw. Returns
    {name: path} for samples, reconstructions, interpolations, traversals, kl_per_dim, latent_map.

    ``barcode``: the palette (``barcodes.PALETTES``) of data drawn as barcodes, one row per example (a
    data kind's ``barcode``: tables, text), instead of image grids (None). A conditional VAE
    (``vae.n_classes``) takes the inputs' class ids from ``labels``: its image samples are one row per
    class, and the other pictures encode and decode with the inputs' classes.
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
    if barcode is not None:
        paths = _barcode_pictures(vae, x, out_dir, barcode, stats, seed, cond)
    else:
        paths = _image_pictures(vae, x, out_dir, stats, seed, grey, cond)
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


def _top_dims(stats: dict[str, Any], n: int) -> tuple[np.ndarray, list[int]]:
    kl = np.asarray(stats["kl_per_dim"], dtype=float)
    return kl, [int(d) for d in np.argsort(-kl, kind="stable")[: min(n, len(kl))]]


def _barcode_pictures(
    vae: Any,
    x: torch.Tensor,
    out_dir: Path,
    palette: str,
    stats: dict[str, Any],
    seed: int,
    cond: torch.Tensor | None = None,
) -> dict[str, Path]:
    """Samples, reconstructions, interpolations and traversals as barcodes in ``palette`` (a conditional
    run's with the inputs' classes ``cond``)."""
    paths = {name: out_dir / f"{name}.png" for name in ("samples", "reconstructions")}
    device = next(vae.parameters()).device
    g = torch.Generator(device=device).manual_seed(7 + seed)
    barcodes.sample_barcode(vae.sample(32, generator=g), palette).save(paths["samples"])
    xr = x[:12]
    recon = vae.reconstruct(xr, None if cond is None else cond[: len(xr)])
    barcodes.reconstruction_barcode(xr, recon, palette).save(paths["reconstructions"])
    pairs = min(4, len(x) // 2)
    steps = 8
    if pairs >= 1:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: 2 * pairs]
        order = order.to(x.device)
        ya, yb = (None, None) if cond is None else (cond[order[:pairs]], cond[order[pairs:]])
        za, zb = vae.encode(x[order[:pairs]], ya).mean, vae.encode(x[order[pairs:]], yb).mean
        t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
        y_path = None if ya is None else ya.repeat_interleave(steps)  # each pair at its first's class
        decoded = vae.decode((za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t).flatten(0, 1), y_path)
        ends_a, middle, ends_b = barcodes.same_width(x[order[:pairs]], decoded, x[order[pairs:]])
        rows = torch.cat([ends_a.unsqueeze(1).to(middle.dtype), middle.unflatten(0, (pairs, steps)),
                          ends_b.unsqueeze(1).to(middle.dtype)], dim=1).flatten(0, 1)  # fmt: skip
        colours = barcodes.colours_of(rows, palette)
        between = [f"{j / (steps - 1):.2f}" for j in range(steps)]
        labels = [text for i in range(pairs) for text in (f"pair {i + 1}: a", *between, "b")]
        paths["interpolations"] = out_dir / "interpolations.png"
        barcodes.barcode(colours, group=steps + 2, labels=labels).save(paths["interpolations"])
    _, top = _top_dims(stats, 4)
    values = np.linspace(-3, 3, 9).tolist()
    base = torch.as_tensor(stats["means"][0], dtype=torch.float32, device=device)
    v = torch.tensor(values, device=device)
    z = base.repeat(len(top), len(v), 1)
    for row, d in enumerate(top):
        z[row, :, d] = v
    flat = z.flatten(0, 1)
    first = None if cond is None else cond[:1].expand(len(flat))  # every traversal at the first input's class
    decoded = vae.decode(flat, first)
    colours = barcodes.colours_of(decoded, palette)
    labels = [f"z{d} = {value:+.1f}" for d in top for value in values]
    paths["traversals"] = out_dir / "traversals.png"
    barcodes.barcode(colours, group=len(values), labels=labels).save(paths["traversals"])
    return paths


def _image_pictures(
    vae: Any,
    x: torch.Tensor,
    out_dir: Path,
    stats: dict[str, Any],
    seed: int,
    grey: torch.Tensor | None,
    cond: torch.Tensor | None = None,
) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    shape = vae.event_shape
    vector = len(shape) != 3 and as_images(x[:1], shape).shape[2] == 1  # shown as strips

    paths["samples"] = out_dir / "samples.png"
    if vae.n_classes:  # one row of 8 per class, named on the left
        images = class_sample_grid(vae, 8, seed=7 + seed)
        save_class_grid(vae, images, [i // 8 for i in range(len(images))], paths["samples"], 8)
    else:
        save_grid(sample_grid(vae, 64, seed=7 + seed), paths["samples"], nrow=8)

    n_recon = min(16, len(x))
    paths["reconstructions"] = out_dir / "reconstructions.png"
    grey = grey[:n_recon] if grey is not None else None
    recon_y = None if cond is None else cond[:n_recon]
    reconstruction_picture(vae, x[:n_recon], grey, recon_y).save(paths["reconstructions"], format="PNG")

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

    kl, top = _top_dims(stats, 8)
    values = np.linspace(-3, 3, 9).tolist()
    base = torch.as_tensor(stats["means"][0], dtype=torch.float32, device=x.device)
    images = traversal_grid(vae, base, top, values, None if cond is None else cond[0])
    picture = grid_image(images, nrow=len(values), min_side=512 if not vector else 256)
    picture = label_rows(picture, [f"z{d} · KL {kl[d]:.2f}" for d in top], width=130)
    paths["traversals"] = out_dir / "traversals.png"
    picture.save(paths["traversals"], format="PNG")
    return paths


# names of the classes of the built-in labelled data, for legends
FASHION = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"


CLASS_NAMES: dict[str, list[str]] = {"fashion-mnist": FASHION.split(",")}
