"""Pictures and the HTML report of a run.

Image grids (samples, reconstructions, interpolations, traversals) are drawn with Pillow; curves, the
KL-per-dimension chart and the latent map with matplotlib's Agg backend (imported lazily: the
training loop does not pay for it). ``build_report`` writes one self-contained HTML page for one run
or a side-by-side comparison of several; ``write_tensorboard`` turns a finished run into TensorBoard
event files.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .. import __version__, evaluation, runtime
from ..config import load_yaml
from ..data.tables import Table, format_column
from ..engine.rundir import link_error, load
from ..engine.setup import setup
from ..errors import CheckpointError, ConfigError, TurboVAEError
from ..files import replace_file
from ..kinds.table import SHOWN_ROWS, SYNTHETIC_ROWS
from ..models import MODELS
from ..progress import Progress
from ..viz.figures import write_pictures
from ..viz.plots import plot_curves

# ---- image grids (Pillow) --------------------------------------------------------------------------


# ---- charts (matplotlib, Agg) ----------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The events of metrics.jsonl; a half-written last line (a run still going) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    lines = _read_text(path).splitlines()
    bad = 0
    for i, line in enumerate(lines):
        try:  # an event is a flat object of a few hundred bytes: a huge or deeply nested line is damage
            if len(line) > 2**20 or line.count("[") + line.count("{") > 1000:
                raise ValueError("not an event")
            event = json.loads(line)
        except (ValueError, RecursionError):  # also a number of more digits than Python converts
            bad += i < len(lines) - 1  # a half-written last line is a run still going, not damage
            continue
        if isinstance(event, dict):
            events.append(event)
    if bad:
        print(
            f"turbovae: warning: {path}: skipped {bad} malformed line{'s' if bad > 1 else ''}",
            file=sys.stderr,
        )
    return events


# ---- the pictures of one run -----------------------------------------------------------------------


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
    legend: str = ""  # how to read the run's barcodes (its data kind's; empty: image grids)
    rows: Table | None = None  # table runs: synthetic rows drawn from the model, shown as a table
    texts: dict[str, str] = field(default_factory=dict)  # text runs: samples, reconstructions, interpolations


def _read_text(path: Path) -> str:
    """A run file's text; a file that is not UTF-8 (damaged) is a one-line error naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text (a bad byte at offset {e.start}): it is damaged"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except (OSError, json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


STAGES = 3  # of collect_run: read and load, posterior statistics, pictures


@torch.no_grad()
def collect_run(
    run_dir: Path,
    figures: Path,
    *,
    device: torch.device | None = None,
    pictures: bool = True,
    progress: Callable[[int], None] | None = None,
) -> RunInfo:
    """Read a run directory and draw its pictures into ``figures``.

    The evaluation table comes from ``eval.json`` (written by ``turbovae eval``) when present; the
    posterior statistics (active units, KL per dimension, mutual information) are computed here on
    the test split either way, since the pictures need them. ``progress`` is called with 1 after each
    of its ``STAGES`` stages."""
    done = 0

    def stage(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(n)

    try:
        return _collect_run(run_dir, figures, device, pictures, stage)
    finally:
        if done < STAGES:  # a run without pictures (or an error): its stages are over
            stage(STAGES - done)


def _collect_run(
    run_dir: Path, figures: Path, device: torch.device | None, pictures: bool, stage: Callable[[], None]
) -> RunInfo:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a turbovae run directory (no config.yaml)")
    info = RunInfo(path=run_dir, name=run_dir.resolve().name)
    info.config_text = _read_text(run_dir / "config.yaml")
    try:
        nested = load_yaml(info.config_text) or {}
        info.config = nested if isinstance(nested, dict) else {}
    except (yaml.YAMLError, ValueError, ConfigError):
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
    stage()
    x = s.x_test
    xp = torch.cat([s.prepare_test(b) for b in x.split(1000)])
    q = evaluation.encode_all(vae, xp, lambda t: t, y=s.y_test)  # a conditional run: q(z | x, y)
    active, variance = evaluation.active_units(q)
    stats: dict[str, Any] = {
        "kl_per_dim": evaluation.kl_per_dim(q),
        "posterior_mean_variance": variance,
        "active_threshold": evaluation.ACTIVE_THRESHOLD,
        "active_units": active,
        "means": q.mean,
        "latent": vae.latent,
        "n": len(xp),
    }
    stats.update(evaluation.mutual_information(q, generator=torch.Generator(device=device).manual_seed(0)))
    stage()
    labels = s.data.y_test
    grey = None  # binarised runs: the inputs before binarisation, drawn above their binarised draw
    if s.binarize_mode != "none":
        grey = s.data.x_test[:16].to(device).float() / s.data.max_value
    kind = s.kind  # image grids or barcodes; a table's synthetic rows, a text run's sentences
    info.pictures = write_pictures(vae, xp, figures, labels=labels, data_name=s.data.name, stats=stats,
                                   grey=grey, barcode=kind.barcode)  # fmt: skip
    info.legend = kind.legend
    more = kind.report_outputs(s, figures)
    info.pictures.update(more.pictures)
    info.rows, info.texts = more.rows, more.texts
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
    """One line about the model, as its registry entry describes it (an unknown name: name and latent)."""
    model = cfg.get("model", {})
    name = model.get("name", summary.get("model", "?"))
    spec = MODELS.get(name)
    return spec.text_of(name, model) if spec is not None else f"{name}, latent {model.get('latent', '?')}"


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
            return r.evaluation.get("bpd_iwae", r.evaluation.get("bpd"))
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
        ("Differential privacy (ε, δ)", "", _privacy_text, None),
    ]  # fmt: skip


def _privacy_text(r: Any) -> str | None:
    """A DP-SGD run's spent (ε, δ) and how (summary.json's ``privacy``); None for other runs."""
    p = r.summary.get("privacy")
    if not p:
        return None
    how = f"{p['accountant'].upper()} accountant, σ = {p['noise_multiplier']:.3g}, q = {p['sample_rate']:.3g}"
    spent = f"ε = {p['epsilon']:.3g}, δ = {p['delta']:.3g}"
    text = f"{spent} (target ε {p['target_epsilon']:.3g}; {how}, {p['steps']} steps)"
    return text + (
        f"; not covered: {len(p['not_covered'])} item(s), summary.json" if p.get("not_covered") else ""
    )


# what must match for two runs' held-out nats to be comparable: the same data (and resizing), the
# same likelihood (a Bernoulli mass on binarised pixels and a Gaussian density on grey values are
# different units) and the same binarisation (a fixed draw is other data than the grey values)
COMPARED = (
    ("data", "data"),
    ("resize", "resizing"),
    ("likelihood", "likelihood"),
    ("binarize", "binarisation"),
)


def comparison_key(r: RunInfo) -> dict[str, Any]:
    """What a run's numbers are numbers of: data, resizing, likelihood and binarisation."""
    data, model = r.config.get("data", {}), r.config.get("model", {})
    return {
        "data": data.get("name", r.summary.get("data")),
        "resize": data.get("resize"),
        "likelihood": model.get("likelihood", r.summary.get("likelihood")),
        "binarize": r.summary.get("binarize", data.get("binarize")),
    }


def comparable_groups(runs: list[RunInfo]) -> tuple[list[int], str]:
    """(the group of every run: runs with the same ``comparison_key`` share one, the reason the runs are
    not all comparable, '' when they are)."""
    keys = [comparison_key(r) for r in runs]
    seen: list[dict[str, Any]] = []
    groups = []
    for key in keys:
        if key not in seen:
            seen.append(key)
        groups.append(seen.index(key))
    if len(seen) == 1:
        return groups, ""
    differs = []
    for field_, label in COMPARED:
        values = list(dict.fromkeys(str(k[field_]) for k in keys))
        if len(values) > 1:
            differs.append(f"{label} ({', '.join(values)})")
    return groups, "the runs differ in " + " and ".join(differs)


def _summary_table(runs: list[RunInfo]) -> str:
    head = "".join(f'<th class="num">{_e(r.name)}</th>' for r in runs)
    groups, why = comparable_groups(runs) if len(runs) > 1 else ([0], "")
    rows = []
    if why:  # say in the table which runs were ranked against which, and why not all of them
        cells = []
        for i, g in enumerate(groups):
            peers = [runs[j].name for j, h in enumerate(groups) if h == g and j != i]
            text = f"with {', '.join(peers)}" if peers else "not ranked: nothing to compare with"
            cells.append(f'<td class="num">{_e(text)}</td>')
        rows.append(
            f'<tr class="differs"><th>Ranked <span class="unit">(only runs with the same data, '
            f"likelihood and binarisation: {_e(why)})</span></th>{''.join(cells)}</tr>"
        )
    for label, unit, get, better in _summary_rows():
        values = [get(r) for r in runs]
        compare = [nll_value(r) for r in runs] if better == "nll" else values
        best: dict[int, Any] = {}  # group -> its best value, for groups of two runs or more
        if better and len(runs) > 1:
            for g in set(groups):
                mine = [c for c, h in zip(compare, groups, strict=True) if h == g]
                numbers = [c for c in mine if isinstance(c, int | float)]
                if len(numbers) > 1:
                    best[g] = min(numbers)
        cells = []
        for v, c, g in zip(values, compare, groups, strict=True):
            cls = "num best" if g in best and c == best[g] else "num"
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
    ("bpd_iwae", "Bits per dim (IWAE)", "bits"),
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


def _barcode_lead(runs: list[RunInfo]) -> str:
    """How to read the barcodes of table and text runs (empty when every run is of images)."""
    parts = list(dict.fromkeys(r.legend for r in runs if r.legend))
    return f" Barcodes for {'; '.join(parts)}." if parts else ""


def _rows_section(runs: list[RunInfo]) -> str:
    """Table runs: the first synthetic rows, and every column's histogram against the real rows."""
    parts = [
        f'<p class="lead">Rows drawn from the model (z ~ N(0, I), then x ~ p(x | z), decoded to the '
        f"table's columns: what <code>turbovae sample RUN --out rows.csv</code> writes), the first "
        f"{SHOWN_ROWS} of {SYNTHETIC_ROWS:,}; below, each column's distribution in those rows against "
        "all the real rows of the file.</p>"
    ]
    for r in runs:
        if r.rows is None:
            continue
        texts = [format_column(c) for c in r.rows.columns]
        head = "".join(f"<th>{_e(name)}</th>" for name in r.rows.names)
        body = "".join(
            "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in zip(*texts, strict=True)
        )
        title = f"<h3>{_e(r.name)}</h3>" if len(runs) > 1 else ""
        parts.append(f'{title}<div style="overflow-x: auto"><table><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")  # fmt: skip
        label = "per-column histograms: real rows (blue) against synthetic rows (red)"
        parts.append(f'<div class="single">{_figure(r.pictures.get("histograms"), label)}</div>')
    return "".join(parts)


def _sentences_section(runs: list[RunInfo]) -> str:
    """Text runs: sampled sentences, reconstructions and interpolations (as in the run's .txt files)."""
    parts = ['<p class="lead">What the barcodes below show, as text: sentences decoded from z ~ N(0, I), '
             "test sentences with their reconstructions, and decodings along straight lines between "
             "two test sentences' posterior means.</p>"]  # fmt: skip
    for r in runs:
        for name, text in r.texts.items():
            who = f"{r.name}: " if len(runs) > 1 else ""
            parts.append(f"<h3>{_e(who + name)}</h3><pre>{_e(text.strip())}</pre>")
    return "".join(parts)


def _picture_sections(runs: list[RunInfo]) -> dict[str, str]:
    """The bodies of the samples, reconstructions, interpolations and traversals sections."""
    body: dict[str, str] = {}
    barcode_lead = _barcode_lead(runs)
    conditional = any(r.summary.get("classes") for r in runs)
    class_lead = " A conditional run: one row per class, named on the left." if conditional else ""
    body["samples"] = (
        f'<p class="lead">z ~ N(0, I), shown as E[x | z].{barcode_lead}{class_lead}</p>'
        + _per_run_figures(runs, "samples", "samples from the prior")
    )
    binarised = any(r.summary.get("binarize") not in (None, "none") for r in runs)
    rows_text = (
        "the input, the binarised draw the model scored, and E[x | z] at the posterior mean"
        if binarised
        else "test inputs and E[x | z] at the posterior mean"
    )
    body["reconstructions"] = (
        f'<p class="lead">Rows labelled on the left: {rows_text}.{barcode_lead}</p>'
        + _per_run_figures(runs, "reconstructions", "inputs and their reconstructions")
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
    return body


def render_html(runs: list[RunInfo], curves: dict[str, Path], title: str | None = None) -> str:
    """The report page: inline CSS, images as data URIs, no external resources and no scripts."""
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
        "examples. The best value of each compared row is in bold green, among runs with the same data, "
        "likelihood and binarisation only (other nats are not comparable).</p>" + _summary_table(runs)
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
    body.update(_picture_sections(runs))
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
    if any(r.rows is not None for r in runs):
        body["rows"] = _rows_section(runs)
        shown.insert(shown.index(("samples", "Samples from the prior")), ("rows", "Synthetic rows"))
    if any(r.texts for r in runs):
        body["sentences"] = _sentences_section(runs)
        shown.insert(shown.index(("samples", "Samples from the prior")), ("sentences", "Sentences"))
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
    if figures is None and fig_root.is_symlink():  # a run's own folder: written into, never through a link
        raise link_error(fig_root)
    runs = []
    names: set[str] = set()
    with Progress(STAGES * len(dirs) + 1, "report", "stages") as bar:
        for d in dirs:
            name = d.resolve().name
            while name in names:
                name += "'"
            names.add(name)
            sub = fig_root if len(dirs) == 1 else fig_root / name
            info = collect_run(d, sub, device=device, progress=bar.update)
            info.name = name
            runs.append(info)
        curves = plot_curves([(r.name, r.events) for r in runs], fig_root)
        bar.update()
    replace_file(out, render_html(runs, curves).encode("utf-8"))  # atomically: never a truncated report
    return out


# ---- TensorBoard --------------------------------------------------------------------------------------


def write_tensorboard(
    run_dir: str | Path, logdir: str | Path, figures: dict[str, Path] | None = None
) -> Path:
    """Convert a finished run into TensorBoard event files in ``logdir``: every numeric value of the
    ``train`` and ``eval`` events of metrics.jsonl as a scalar at its step (``train/loss``,
    ``val/nelbo``, ...), the summary's and eval.json's numbers at the last step, and the run's PNG
    pictures (``figures`` or the PNGs found in the run directory) as images."""
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
            split = str(e.get("split", "test"))  # per-epoch evaluations: "val" (runs before it: "test")
            tag = f"{split}/{key.removeprefix(split + '_')}" if kind == "eval" else f"train/{key}"
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


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="an HTML report of one run, or a comparison of several")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", help="the HTML file (default RUN_DIR/report.html for one run)")
    r.add_argument("--figures", help="folder for the PNG pictures (default: figures/ beside the report)")
    r.add_argument("--device", default="auto")
    r.add_argument(
        "--tensorboard", metavar="LOGDIR", help="also write TensorBoard event files (one subfolder per run)"
    )


def run(args: argparse.Namespace) -> int:
    device = runtime.select_device(args.device)
    out = build_report(args.run_dirs, args.out, device=device, figures=args.figures)
    print(out)
    if args.tensorboard:
        runs = [Path(d) for d in args.run_dirs]
        for run in runs:
            logdir = Path(args.tensorboard) / (run.resolve().name if len(runs) > 1 else "")
            figures = Path(args.figures) if args.figures else out.parent / "figures"
            if len(runs) > 1:
                figures = figures / run.resolve().name
            pictures = {p.stem: p for p in sorted(figures.glob("*.png"))} if figures.is_dir() else None
            print(write_tensorboard(run, logdir, pictures))
    return 0
