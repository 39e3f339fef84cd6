"""Pictures and the HTML report of a run.

Image grids (samples, reconstructions, interpolations, traversals) are drawn with Pillow; curves, the
KL-per-dimension chart and the latent map with matplotlib's Agg backend (imported lazily: the
training loop does not pay for it). ``build_report`` writes one self-contained HTML page for one run
or a side-by-side comparison of several; ``write_tensorboard`` turns a finished run into TensorBoard
event files.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GRID_BACKGROUND = 64  # the grey between grid cells
FIGURE_SIZE = (6.4, 4.0)  # inches; at FIGURE_DPI this is 960 × 600 pixels
FIGURE_DPI = 150
# names of the classes of the built-in labelled data, for legends
FASHION = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
CLASS_NAMES: dict[str, list[str]] = {"fashion-mnist": FASHION.split(",")}


# ---- image grids (Pillow) --------------------------------------------------------------------------


def as_images(x: torch.Tensor, event_shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *event_shape) values → (N, C, H, W) in [0, 1] for display.

    Vectors whose length is a square are shown as square images (flattened pictures); other vectors
    as one-pixel-high strips, min-max scaled over the batch.
    """
    x = x.detach().float().cpu()
    if len(event_shape) == 3:
        return x.clamp(0, 1)
    dims = math.prod(event_shape)
    x = x.reshape(len(x), dims)
    side = math.isqrt(dims)
    if side * side == dims and float(x.min()) >= 0 and float(x.max()) <= 1:
        return x.reshape(len(x), 1, side, side)
    low, high = x.min(), x.max()
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return x.reshape(len(x), 1, 1, dims)


def grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → one uint8 array (rows of ``nrow`` images), with a 1-pixel border."""
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), GRID_BACKGROUND, dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = pixels[i]
    return out[..., 0] if c == 1 else out


def grid_image(images: torch.Tensor, nrow: int, min_side: int = 256) -> Image.Image:
    """A grid as a Pillow image, upscaled with nearest-neighbour so that small images stay readable.

    Strips (images one pixel high, from vector data) are stretched to at least 8 pixels high."""
    array = grid(images, nrow)
    picture = Image.fromarray(array)
    scale = max(1, math.ceil(min_side / max(array.shape[0], array.shape[1])))
    height_scale = max(scale, 8) if images.shape[2] == 1 else scale
    if scale > 1 or height_scale > 1:
        size = (array.shape[1] * scale, array.shape[0] * height_scale)
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return picture


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, min_side: int = 256) -> None:
    """Write a PNG grid, upscaled with nearest-neighbour so that small images stay readable."""
    grid_image(images, nrow, min_side).save(path, format="PNG")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_rows(picture: Image.Image, labels: Sequence[str], width: int = 120) -> Image.Image:
    """Add a white margin on the left with one label centred on each of ``len(labels)`` equal rows."""
    rows = len(labels)
    out = Image.new("RGB", (picture.width + width, picture.height), "white")
    out.paste(picture.convert("RGB"), (width, 0))
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(16, picture.height // max(rows, 1) // 3)))
    for i, text in enumerate(labels):
        y = (i + 0.5) * picture.height / rows
        draw.text((width - 8, y), text, fill=(40, 40, 40), font=font, anchor="rm")
    return out


@torch.no_grad()
def sample_grid(vae: Any, n: int = 64, seed: int = 7) -> torch.Tensor:
    """n samples from the prior, shown as E[x | z]: (n, C, H, W) in [0, 1]."""
    device = next(vae.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    return as_images(vae.sample(n, generator=g), vae.event_shape)


@torch.no_grad()
def reconstruction_grid(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Inputs (first row) above their reconstructions E[x | z = mean of q(z | x)] (second row)."""
    return torch.cat([as_images(x, vae.event_shape), as_images(vae.reconstruct(x), vae.event_shape)])


@torch.no_grad()
def interpolation_grid(vae: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """One row per pair: x_a, the decoded points on the line between the posterior means of x_a and
    x_b (``steps`` of them, ends included), then x_b. Shape (pairs · (steps + 2), C, H, W)."""
    za, zb = vae.encode(x_a).mean, vae.encode(x_b).mean  # (P, L)
    t = torch.linspace(0, 1, steps, device=za.device).view(1, steps, 1)
    path = za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t  # (P, steps, L)
    decoded = as_images(vae.decode(path.flatten(0, 1)), vae.event_shape).unflatten(0, (len(za), steps))
    ends_a = as_images(x_a, vae.event_shape).unsqueeze(1)
    ends_b = as_images(x_b, vae.event_shape).unsqueeze(1)
    # the decoded strips are min-max scaled on their own for vector data; inputs likewise
    return torch.cat([ends_a, decoded, ends_b], dim=1).flatten(0, 1)


@torch.no_grad()
def traversal_grid(
    vae: Any, base: torch.Tensor, dims: Sequence[int], values: Sequence[float]
) -> torch.Tensor:
    """One row per latent dimension in ``dims``: ``base`` (L,) with that coordinate set to each of
    ``values``, decoded. Shape (len(dims) · len(values), C, H, W)."""
    v = torch.tensor(list(values), device=base.device, dtype=base.dtype)
    z = base.repeat(len(dims), len(v), 1)  # (D, V, L)
    for row, d in enumerate(dims):
        z[row, :, d] = v
    return as_images(vae.decode(z.flatten(0, 1)), vae.event_shape)


# ---- charts (matplotlib, Agg) ----------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "figure.dpi": FIGURE_DPI,
            "savefig.dpi": FIGURE_DPI,
        }
    )
    return plt


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", dpi=FIGURE_DPI)  # no bbox_inches: the size is the figure's
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The events of metrics.jsonl; a half-written last line (a run still going) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


# (file stem, title, y-axis label, [(event, key, line label, style)], log y)
CURVES: list[tuple[str, str, str, list[tuple[str, str, str, str]], bool]] = [
    (
        "curve_loss",
        "Loss",
        "nats per example",
        [("train", "loss", "train loss", "-"), ("eval", "test_nelbo", "test NELBO", "--")],
        False,
    ),
    (
        "curve_kl",
        "KL(q(z|x) ‖ p(z))",
        "nats per example",
        [("train", "kl", "train KL", "-"), ("eval", "test_kl", "test KL", "--")],
        False,
    ),
    ("curve_lr", "Learning rate", "learning rate", [("train", "lr", "learning rate", "-")], True),
    (
        "curve_speed",
        "Training throughput",
        "samples / s",
        [("train", "samples_per_second", "samples / s", "-")],
        False,
    ),
]


def _series(events: list[dict[str, Any]], event: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in events:
        if e.get("event") == event and isinstance(e.get(key), int | float) and "epoch" in e:
            xs.append(float(e["epoch"]))
            ys.append(float(e[key]))
    return xs, ys


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], out_dir: Path) -> dict[str, Path]:
    """Loss, KL, learning-rate and samples/s over training (x: epoch), one line per run and series.

    Returns {stem: path} of the PNGs written (FIGURE_SIZE × FIGURE_DPI pixels each); a curve with no
    data in any run still gets a figure that says so."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = {}
    for stem, title, ylabel, series, log_y in CURVES:
        fig, ax = plt.subplots(figsize=FIGURE_SIZE)
        drawn = 0
        for r, (name, events) in enumerate(runs):
            for event, key, label, style in series:
                xs, ys = _series(events, event, key)
                if not xs:
                    continue
                full = label if len(runs) == 1 else f"{name}: {label}"
                marker = "o" if event == "eval" and len(xs) < 30 else None
                colour = colours[r % len(colours)]
                ax.plot(xs, ys, style, color=colour, label=full, marker=marker, ms=3, lw=1.5)
                drawn += 1
        if drawn == 0:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        if log_y and drawn:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if drawn > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        _save_figure(fig, path)
        written[stem] = path
    return written


def plot_kl_per_dim(
    kl: Sequence[float], mean_variance: Sequence[float], threshold: float, path: Path, title: str = ""
) -> None:
    """Two panels over the latent dimensions: the average KL per dimension (nats) and Burda's activity
    Cov_x(E_q[z_u]) on a log scale with the threshold; active dimensions in colour."""
    plt = _pyplot()
    kl_a, var_a = np.asarray(kl, dtype=float), np.maximum(np.asarray(mean_variance, dtype=float), 1e-12)
    dims = np.arange(len(kl_a))
    active = var_a > threshold
    colour = np.where(active, "#1f77b4", "#c7c7c7")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=FIGURE_SIZE, sharex=True)
    ax1.bar(dims, kl_a, color=colour)
    ax1.set_ylabel("KL (nats)")
    ax1.set_title(title or f"KL per latent dimension ({int(active.sum())} of {len(kl_a)} units active)")
    ax2.bar(dims, var_a, color=colour)
    ax2.axhline(threshold, color="#d62728", lw=1, ls="--")
    ax2.set_yscale("log")
    ax2.set_ylabel("Cov$_x$(E$_q$[z$_u$])")
    ax2.set_xlabel("latent dimension u")
    ax2.set_title(f"activity; dashed: the threshold {threshold:g} (active above, in colour)", fontsize=9,
                  fontweight="normal", loc="left")  # fmt: skip
    if len(dims) <= 40:
        ax2.set_xticks(dims)
        ax2.tick_params(axis="x", labelsize=7 if len(dims) > 20 else 9)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_latent_map(
    means: np.ndarray, labels: np.ndarray | None, path: Path, class_names: Sequence[str] | None = None
) -> str:
    """Scatter of posterior means in 2-D (the first two principal components when the latent has more
    than two dimensions), coloured by label when there are labels. Returns how the axes were made."""
    plt = _pyplot()
    means = np.asarray(means, dtype=np.float64)
    if means.shape[1] == 1:
        points = np.concatenate([means, np.zeros_like(means)], axis=1)
        axes, how = ("z₁", ""), "the single latent dimension"
    elif means.shape[1] == 2:
        points, axes, how = means, ("z₁", "z₂"), "the two latent dimensions"
    else:
        centred = means - means.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T
        share = s**2 / max(float((s**2).sum()), 1e-30)
        axes = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
        how = "the first two principal components of the posterior means"
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    size = 4 if len(points) > 2000 else 10
    if labels is not None and len(labels) == len(points):
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "viridis")
        for i, c in enumerate(classes):
            sel = labels == c
            name = class_names[int(c)] if class_names and 0 <= int(c) < len(class_names) else str(c)
            colour = cmap(i % 10) if len(classes) <= 10 else cmap(i / max(len(classes) - 1, 1))
            ax.scatter(points[sel, 0], points[sel, 1], s=size, color=colour, label=name, alpha=0.7, lw=0)
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.scatter(points[:, 0], points[:, 1], s=size, color="#1f77b4", alpha=0.6, lw=0)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1] or "")
    ax.set_title(f"Posterior means of {len(points):,} test examples")
    fig.tight_layout()
    _save_figure(fig, path)
    return how


# ---- the pictures of one run -----------------------------------------------------------------------


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
    """
    from . import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = vae.training
    vae.eval()
    if stats is None:
        q = evaluate.encode_all(vae, x, lambda t: t)
        _, variance = evaluate.active_units(q)
        stats = {
            "kl_per_dim": evaluate.kl_per_dim(q),
            "posterior_mean_variance": variance,
            "active_threshold": evaluate.ACTIVE_THRESHOLD,
            "means": q.mean,
        }
    paths: dict[str, Path] = {}
    shape = vae.event_shape
    vector = len(shape) != 3 and as_images(x[:1], shape).shape[2] == 1  # shown as strips

    paths["samples"] = out_dir / "samples.png"
    save_grid(sample_grid(vae, 64, seed=7 + seed), paths["samples"], nrow=8)

    n_recon = min(16, len(x))
    paths["reconstructions"] = out_dir / "reconstructions.png"
    save_grid(reconstruction_grid(vae, x[:n_recon]), paths["reconstructions"], nrow=n_recon)

    g = torch.Generator().manual_seed(seed)
    pairs = min(8, len(x) // 2)
    if pairs >= 1:
        order = torch.randperm(len(x), generator=g)[: 2 * pairs].to(x.device)
        steps = 8
        images = interpolation_grid(vae, x[order[:pairs]], x[order[pairs:]], steps=steps)
        picture = grid_image(images, nrow=steps + 2, min_side=512 if not vector else 256)
        paths["interpolations"] = out_dir / "interpolations.png"
        picture.save(paths["interpolations"], format="PNG")

    kl = np.asarray(stats["kl_per_dim"], dtype=float)
    top = [int(d) for d in np.argsort(-kl, kind="stable")[: min(8, len(kl))]]
    values = np.linspace(-3, 3, 9).tolist()
    base = torch.as_tensor(stats["means"][0], dtype=torch.float32, device=x.device)
    images = traversal_grid(vae, base, top, values)
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
    stats["latent_map_axes"] = plot_latent_map(means, y, paths["latent_map"], CLASS_NAMES.get(data_name))
    vae.train(was_training)
    return paths


# ---- one run, as the report sees it ------------------------------------------------------------------


@dataclass
class RunInfo:
    """What the report knows about one run directory."""

    path: Path
    name: str
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json, or what the report computed
    fidelity: dict[str, Any] = field(default_factory=dict)  # fidelity.json of a table run (eval --fidelity)
    events: list[dict[str, Any]] = field(default_factory=list)
    pictures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@torch.no_grad()
def collect_run(
    run_dir: Path, figures: Path, *, device: torch.device | None = None, pictures: bool = True
) -> RunInfo:
    """Read a run directory and draw its pictures into ``figures``.

    The evaluation table comes from ``eval.json`` (written by ``turbovae eval``) when present; the
    posterior statistics (active units, KL per dimension, mutual information) are computed here on
    the test split either way, since the pictures need them."""
    import yaml

    from . import evaluate
    from .errors import CheckpointError, TurboVAEError
    from .train import load, setup

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a turbovae run directory (no config.yaml)")
    info = RunInfo(path=run_dir, name=run_dir.resolve().name)
    info.config_text = (run_dir / "config.yaml").read_text()
    try:
        info.config = yaml.safe_load(info.config_text) or {}
    except yaml.YAMLError:
        info.notes.append("config.yaml is not valid YAML")
    info.summary = _read_json(run_dir / "summary.json")
    info.evaluation = _read_json(run_dir / "eval.json")
    info.fidelity = _read_json(run_dir / "fidelity.json")
    info.events = read_metrics(run_dir)
    if not info.summary:
        info.notes.append("no summary.json: the run has not finished")
    if not pictures:
        return info
    device = device or torch.device("cpu")
    try:
        vae = load(run_dir, device)
        s = setup(vae.config, device, vae.data_meta)
    except TurboVAEError as e:
        info.notes.append(f"pictures skipped: {e}")
        return info
    s.vae = vae
    x = s.x_test
    xp = torch.cat([s.prepare_test(b) for b in x.split(1000)])
    q = evaluate.encode_all(vae, xp, lambda t: t)
    active, variance = evaluate.active_units(q)
    stats: dict[str, Any] = {
        "kl_per_dim": evaluate.kl_per_dim(q),
        "posterior_mean_variance": variance,
        "active_threshold": evaluate.ACTIVE_THRESHOLD,
        "active_units": active,
        "means": q.mean,
        "latent": vae.latent,
        "n": len(xp),
    }
    stats.update(evaluate.mutual_information(q, generator=torch.Generator(device=device).manual_seed(0)))
    labels = s.data.y_test
    info.pictures = write_pictures(vae, xp, figures, labels=labels, data_name=s.data.name, stats=stats)
    computed = {k: v for k, v in stats.items() if k != "means"}
    # eval.json wins for what it has; the posterior statistics fill in what it lacks
    info.evaluation = {**computed, "split": "test", **info.evaluation}
    info.evaluation["latent_map_axes"] = stats.get("latent_map_axes", "")
    return info


# ---- HTML --------------------------------------------------------------------------------------------

CSS = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #e3e6ec; --accent: #2f5fb3; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 28px 0 18px; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 28px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 19px; margin: 0 0 14px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; color: var(--muted); }
.sub { color: var(--muted); font-size: 13.5px; }
nav { margin-top: 14px; font-size: 13.5px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
nav a:hover { text-decoration: underline; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 22px 24px;
  margin: 22px 0; }
table { border-collapse: collapse; font-size: 14px; width: auto; min-width: 50%; }
th, td { padding: 6px 14px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #c9ced8; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { font-weight: 700; color: #17663a; }
tr.differs td { background: #fff7e0; }
.unit { color: var(--muted); font-weight: normal; font-size: 12.5px; }
.grid { display: grid; gap: 18px; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); }
.grid.two { grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); }
figure { margin: 0; }
.single figure { max-width: 760px; }
figure img { width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 4px;
  background: #fff; }
figure img.pixels { image-rendering: pixelated; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
pre { background: #f3f4f7; border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  font: 12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-x: auto; margin: 0; }
.note { color: #8a5a00; font-size: 13.5px; }
p.lead { margin: 0 0 14px; color: var(--muted); font-size: 14px; }
footer { color: var(--muted); font-size: 12.5px; padding: 8px 0 36px; }
"""

SECTIONS = [
    ("summary", "Summary"),
    ("evaluation", "Evaluation"),
    ("curves", "Training curves"),
    ("samples", "Samples from the prior"),
    ("reconstructions", "Reconstructions"),
    ("interpolations", "Interpolations"),
    ("traversals", "Latent traversals"),
    ("latent-space", "Latent space"),
    ("config", "Configuration"),
]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** (-digits)):
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _model_text(cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    model = cfg.get("model", {})
    name = model.get("name", summary.get("model", "?"))
    if name == "mlp":
        return f"MLP {'-'.join(str(h) for h in model.get('hidden', []))}, latent {model.get('latent', '?')}"
    if name == "conv":
        channels = ",".join(str(c) for c in model.get("channels", []))
        return f"conv {channels}, latent {model.get('latent', '?')}"
    return f"{name}, latent {model.get('latent', '?')}"


# row label, unit, function of a run → value, lower is better (None: not compared)
def _summary_rows() -> list[tuple[str, str, Any, Any]]:
    def s(key: str) -> Any:
        return lambda r: r.summary.get(key)

    def ev(key: str, fallback: str | None = None) -> Any:
        return lambda r: r.evaluation.get(key, r.summary.get(fallback) if fallback else None)

    def nll(r: RunInfo) -> Any:
        if "nll_iwae" in r.evaluation:
            return r.evaluation["nll_iwae"]
        return r.summary.get("test_nll_iwae")

    def nll_text(r: RunInfo) -> str:
        value = nll(r)
        if value is None:
            return "—"
        se = r.evaluation.get("nll_iwae_stderr", r.summary.get("test_nll_iwae_stderr"))
        k = r.evaluation.get("k", r.summary.get("iwae_k"))
        return f"{value:,.2f} ± {se:.2f} (k = {k:,})" if se is not None and k else _fmt(value)

    def bpd(r: RunInfo) -> Any:
        if "nll_iwae" in r.evaluation:
            return r.evaluation.get("bpd")
        return r.summary.get("test_bpd_iwae", r.summary.get("test_bpd"))

    def active(r: RunInfo) -> Any:
        if "active_units" not in r.evaluation:
            return None
        return f"{r.evaluation['active_units']} of {r.evaluation.get('latent', '?')}"

    return [
        ("Data", "", lambda r: r.summary.get("data", r.config.get("data", {}).get("name")), None),
        ("Model", "", lambda r: _model_text(r.config, r.summary), None),
        ("Likelihood", "", lambda r: r.config.get("model", {}).get("likelihood"), None),
        ("Objective", "", lambda r: r.config.get("train", {}).get("objective"), None),
        ("Parameters", "", s("params"), None),
        ("Epochs / steps", "", lambda r: f"{_fmt(r.summary.get('epochs'))} / {_fmt(r.summary.get('steps'))}",
         None),
        ("Test NELBO", "nats", ev("nelbo", "test_nelbo"), True),
        ("  reconstruction", "nats", ev("rec", "test_rec"), None),
        ("  KL", "nats", ev("kl", "test_kl"), None),
        ("Test NLL (IWAE)", "nats", nll_text, "nll"),
        ("Bits per dim", "bits", bpd, True),
        ("Active units", "", active, None),
        ("Mutual information I(x; z)", "nats", ev("mutual_info"), None),
        ("Training time", "", lambda r: _seconds(r.summary.get("train_seconds")), None),
        ("Throughput", "samples/s", lambda r: _fmt(r.summary.get("samples_per_second"), 0), None),
        ("Device", "", s("device"), None),
        ("Training precision", "", s("precision"), None),
    ]  # fmt: skip


def _summary_table(runs: list[RunInfo]) -> str:
    head = "".join(f'<th class="num">{_e(r.name)}</th>' for r in runs)
    rows = []
    for label, unit, get, better in _summary_rows():
        values = [get(r) for r in runs]
        compare = [nll_value(r) for r in runs] if better == "nll" else values
        best = None
        if better and len(runs) > 1:
            numbers = [v for v in compare if isinstance(v, int | float)]
            best = min(numbers) if numbers else None
        cells = []
        for v, c in zip(values, compare, strict=True):
            cls = "num best" if best is not None and c == best else "num"
            cells.append(f'<td class="{cls}">{_e(_fmt(v))}</td>')
        unit_html = f' <span class="unit">({_e(unit)})</span>' if unit else ""
        indent = "&emsp;" if label.startswith("  ") else ""
        rows.append(f"<tr><th>{indent}{_e(label.strip())}{unit_html}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def nll_value(r: RunInfo) -> Any:
    return r.evaluation.get("nll_iwae", r.summary.get("test_nll_iwae"))


EVAL_ROWS: list[tuple[str, str, str]] = [
    ("split", "Split", ""),
    ("n", "Examples", ""),
    ("nelbo", "NELBO", "nats"),
    ("rec", "Reconstruction −E_q[log p(x|z)]", "nats"),
    ("kl", "KL(q(z|x) ‖ p(z))", "nats"),
    ("k", "Importance samples k", ""),
    ("nll_iwae", "NLL, IWAE estimate", "nats"),
    ("nll_iwae_stderr", "  standard error over examples", "nats"),
    ("ess", "  effective sample size (mean)", "of k"),
    ("bpd", "Bits per dim (IWAE)", "bits"),
    ("active_units", "Active units (Cov_x E_q[z_u] > 0.01)", ""),
    ("latent", "Latent dimensions", ""),
    ("mutual_info", "Mutual information I(x; z)", "nats"),
    ("marginal_kl", "KL(q(z) ‖ p(z)), aggregate posterior", "nats"),
    ("precision", "Decoder precision (IWAE)", ""),
    ("iwae_seconds", "IWAE time", "s"),
]


def _eval_table(runs: list[RunInfo]) -> str:
    head = "".join(f'<th class="num">{_e(r.name)}</th>' for r in runs)
    rows = []
    for key, label, unit in EVAL_ROWS:
        if not any(key in r.evaluation for r in runs):
            continue
        cells = "".join(f'<td class="num">{_e(_fmt(r.evaluation.get(key), 3))}</td>' for r in runs)
        unit_html = f' <span class="unit">({_e(unit)})</span>' if unit else ""
        indent = "&emsp;" if label.startswith("  ") else ""
        rows.append(f"<tr><th>{indent}{_e(label.strip())}{unit_html}</th>{cells}</tr>")
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _config_section(runs: list[RunInfo]) -> str:
    if len(runs) == 1:
        return f"<pre>{_e(runs[0].config_text.strip())}</pre>"
    flats = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
    rows = []
    for key in keys:
        values = [json.dumps(f.get(key)) if key in f else "—" for f in flats]
        cls = ' class="differs"' if len(set(values)) > 1 else ""
        cells = "".join(f"<td>{_e(v)}</td>" for v in values)
        rows.append(f"<tr{cls}><th>{_e(key)}</th>{cells}</tr>")
    note = '<p class="lead">Keys whose values differ between the runs are highlighted.</p>'
    return f"{note}<table><thead><tr><th>key</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(path: Path | None, caption: str, pixels: bool = False, alt: str = "") -> str:
    if path is None or not Path(path).is_file():
        return f'<figure><p class="note">{_e(caption)}: not available</p></figure>'
    cls = ' class="pixels"' if pixels else ""
    return (
        f'<figure><img{cls} src="{_data_uri(path)}" alt="{_e(alt or caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _per_run_figures(runs: list[RunInfo], key: str, caption: str, pixels: bool = True) -> str:
    parts = []
    for r in runs:
        label = caption if len(runs) == 1 else f"{r.name} — {caption}"
        parts.append(_figure(r.pictures.get(key), label, pixels=pixels))
    cls = "grid" if len(runs) > 1 else "single"
    return f'<div class="{cls}">{"".join(parts)}</div>'


def _fidelity_section(runs: list[RunInfo]) -> str:
    """fidelity.json of table runs: the summary measures, then the distance of every column."""

    def cell(value: Any) -> str:
        return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else _e(value)

    flat = [_flatten({k: v for k, v in r.fidelity.items() if k != "columns"}) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
    rows = "".join(
        f"<tr><th>{_e(k)}</th>{''.join(f'<td>{cell(f.get(k))}</td>' for f in flat)}</tr>" for k in keys
    )
    lead = (
        '<p class="lead">From fidelity.json (<code>turbovae eval RUN --fidelity</code>): synthetic '
        "rows against real held-out rows. KS for continuous columns and total variation for "
        "categorical ones (0 = the same distribution), the mean absolute difference of the "
        "correlation matrices, machine-learning efficacy (train on synthetic, test on real; the "
        "real-trained reference beside it) and the distance of each synthetic row to its closest "
        "real row (a privacy check).</p>"
    )
    parts = [lead, f"<table><thead><tr><th>measure</th>{head}</tr></thead><tbody>{rows}</tbody></table>"]
    for r in runs:
        columns = r.fidelity.get("columns") or {}
        if columns:
            col_rows = "".join(
                f"<tr><th>{_e(name)}</th><td>{_e(c.get('type', ''))}</td>"
                f"<td>{cell(c.get('ks', c.get('tv')))}</td></tr>"
                for name, c in columns.items()
                if isinstance(c, dict)
            )
            parts.append(
                f"<h3>{_e(r.name)}: per column</h3><table><thead><tr><th>column</th><th>type</th>"
                f"<th>KS or TV</th></tr></thead><tbody>{col_rows}</tbody></table>"
            )
    return "".join(parts)


def render_html(runs: list[RunInfo], curves: dict[str, Path], title: str | None = None) -> str:
    """The report page: inline CSS, images as data URIs, no external resources and no scripts."""
    from . import __version__

    names = ", ".join(r.name for r in runs)
    title = title or (f"turbovae report — {names}" if len(runs) == 1 else f"turbovae comparison — {names}")
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    first = runs[0]
    subtitle = [
        f"{len(runs)} runs" if len(runs) > 1 else _e(first.summary.get("data", "")),
        _e(_model_text(first.config, first.summary)) if len(runs) == 1 else "",
        _e(first.summary.get("device", "")),
        f"generated {when} by turbovae {_e(__version__)}",
    ]
    nav = "".join(f'<a href="#{sid}">{_e(label)}</a>' for sid, label in SECTIONS)
    notes = "".join(f'<p class="note">{_e(r.name)}: {_e(n)}</p>' for r in runs for n in r.notes)
    k_text = ", ".join(sorted({str(r.evaluation.get("k", r.summary.get("iwae_k", "?"))) for r in runs}))
    body: dict[str, str] = {}
    body["summary"] = (
        '<p class="lead">Held-out numbers are in nats per example on the test split; the IWAE '
        f"negative log-likelihood uses k = {_e(k_text)} importance samples, ± one standard error over "
        "examples. The best value of each compared row is in bold green.</p>" + _summary_table(runs)
    )
    kl_caption = "KL per latent dimension and Burda's activity"
    kl_figs = _per_run_figures(runs, "kl_per_dim", kl_caption, pixels=False)
    from_eval = {True: "eval.json", False: "summary.json and posterior statistics computed for this report"}
    source = ", ".join(f"{r.name}: {from_eval[(r.path / 'eval.json').is_file()]}" for r in runs)
    body["evaluation"] = (
        f'<p class="lead">From {_e(source)}. Active units: Cov_x(E_q[z_u]) &gt; 0.01 (Burda et al. 2015). '
        "Mutual information by ELBO surgery (Hoffman &amp; Johnson 2016): E_x KL(q(z|x) ‖ p(z)) = "
        "I(x; z) + KL(q(z) ‖ p(z)), with the aggregate posterior q(z) the mixture of the test set's "
        "posteriors (so I ≤ log N).</p>" + _eval_table(runs) + "<h3>Per latent dimension</h3>" + kl_figs
    )
    curve_figs = "".join(
        _figure(curves.get(stem), title_)
        for stem, title_ in (
            ("curve_loss", "Training loss (negative ELBO) per epoch; dashed: test NELBO after each epoch"),
            ("curve_kl", "KL term of the ELBO"),
            ("curve_lr", "Learning rate"),
            ("curve_speed", "Training throughput (examples per second)"),
        )
    )
    body["curves"] = f'<div class="grid two">{curve_figs}</div>'
    body["samples"] = '<p class="lead">z ~ N(0, I), shown as E[x | z].</p>' + _per_run_figures(
        runs, "samples", "64 samples from the prior"
    )
    body["reconstructions"] = (
        '<p class="lead">Test inputs (top row) and E[x | z] at the posterior mean (bottom row).</p>'
        + _per_run_figures(runs, "reconstructions", "inputs above, reconstructions below")
    )
    body["interpolations"] = (
        '<p class="lead">Each row: a test input, 8 points on the straight line between its posterior '
        "mean and another input's, decoded, and the other input.</p>"
        + _per_run_figures(runs, "interpolations", "linear interpolation between posterior means")
    )
    body["traversals"] = (
        '<p class="lead">The most informative latent dimensions (largest average KL): starting from the '
        "posterior mean of a test input, one coordinate is set to −3 … +3 (left to right).</p>"
        + _per_run_figures(runs, "traversals", "latent traversals, rows labelled with dimension and KL")
    )
    axes = "; ".join(sorted({str(r.evaluation.get("latent_map_axes", "")) for r in runs} - {""}))
    body["latent-space"] = (
        f'<p class="lead">Posterior means of the test set, plotted on {_e(axes or "two axes")}, '
        "coloured by label where the data have labels.</p>"
        + _per_run_figures(runs, "latent_map", "posterior means of the test set", pixels=False)
    )
    body["config"] = _config_section(runs)
    shown = list(SECTIONS)
    if any(r.fidelity for r in runs):
        body["fidelity"] = _fidelity_section(runs)
        shown.insert(2, ("fidelity", "Fidelity of synthetic rows"))
        nav = "".join(f'<a href="#{sid}">{_e(label)}</a>' for sid, label in shown)
    sections = "".join(
        f'<section id="{sid}"><h2>{_e(label)}</h2>{body[sid]}</section>' for sid, label in shown
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><div class="wrap">
<h1>{_e(title)}</h1>
<div class="sub">{" · ".join(p for p in subtitle if p)}</div>
<nav>{nav}</nav>
</div></header>
<main class="wrap">
{notes}
{sections}
</main>
<footer class="wrap">Runs: {", ".join(_e(str(r.path)) for r in runs)}</footer>
</body>
</html>
"""


def build_report(
    run_dirs: Iterable[str | Path],
    out: str | Path | None = None,
    *,
    device: torch.device | None = None,
    figures: str | Path | None = None,
) -> Path:
    """Write the HTML report of one run (default ``RUN_DIR/report.html``) or a comparison of several
    (``out`` required). Pictures also land as PNG files in ``figures`` (default: a ``figures/`` folder
    next to the report; for one run, ``RUN_DIR/figures``)."""
    from .errors import ConfigError

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("report needs at least one run directory")
    if out is None:
        if len(dirs) > 1:
            raise ConfigError("comparing several runs needs --out FILE.html")
        out = dirs[0] / "report.html"
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out must end in .html, got {out}")
    fig_root = Path(figures) if figures is not None else out.parent / "figures"
    runs = []
    names: set[str] = set()
    for d in dirs:
        name = d.resolve().name
        while name in names:
            name += "'"
        names.add(name)
        sub = fig_root if len(dirs) == 1 else fig_root / name
        info = collect_run(d, sub, device=device)
        info.name = name
        runs.append(info)
    curves = plot_curves([(r.name, r.events) for r in runs], fig_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(runs, curves), encoding="utf-8")
    return out


# ---- TensorBoard --------------------------------------------------------------------------------------


def write_tensorboard(
    run_dir: str | Path, logdir: str | Path, figures: dict[str, Path] | None = None
) -> Path:
    """Convert a finished run into TensorBoard event files in ``logdir``: every numeric value of the
    ``train`` and ``eval`` events of metrics.jsonl as a scalar at its step (``train/loss``,
    ``test/nelbo``, ...), the summary's and eval.json's numbers at the last step, and the run's PNG
    pictures (``figures`` or the PNGs found in the run directory) as images."""
    from .errors import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    run_dir = Path(run_dir)
    events = read_metrics(run_dir)
    if not events:
        raise ConfigError(f"{run_dir} has no metrics.jsonl to convert")
    writer = SummaryWriter(log_dir=str(logdir))
    last = 0
    for e in events:
        step = int(e.get("step", last))
        last = max(last, step)
        kind = e.get("event")
        if kind not in ("train", "eval"):
            continue
        for key, value in e.items():
            if key in ("event", "step", "split") or not isinstance(value, int | float):
                continue
            tag = f"test/{key.removeprefix('test_')}" if kind == "eval" else f"train/{key}"
            writer.add_scalar(tag, float(value), step)
    for name, source in (("summary", "summary.json"), ("eval", "eval.json")):
        for key, value in _read_json(run_dir / source).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(f"{name}/{key}", float(value), last)
    pictures = figures or {p.stem: p for p in sorted(run_dir.glob("*.png"))}
    if not figures and (run_dir / "figures").is_dir():
        pictures.update({p.stem: p for p in sorted((run_dir / "figures").glob("*.png"))})
    for tag, path in sorted(pictures.items()):
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        writer.add_image(f"pictures/{tag}", array, last, dataformats="HWC")
    writer.close()
    return Path(logdir)
