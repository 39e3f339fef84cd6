"""Pictures and the HTML report: valid PNGs of the expected sizes, vector data, every section, a
self-contained page, run comparison, TensorBoard export, and the page in headless Chromium."""

import html
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from turbovae.cli import main
from turbovae.commands import report
from turbovae.likelihoods import build_likelihood
from turbovae.models.mlp import MLPNet
from turbovae.vae import VAE
from turbovae.viz import figures, plots

TINY = ["--data", "digits", "--hidden", "32", "--latent", "4", "--progress", "off", "eval.iwae_k=5"]

# digits are 8×8 with a latent of 4: grids of 9-pixel cells plus a border, upscaled by whole factors
EXPECTED_SIZES = {
    "samples.png": (292, 292),  # 8 × 8 cells: 73 px, ×4 to reach 256
    # labels + 16 × 3 cells (input, binarised draw, reconstruction): 145 × 28 px, ×4 for 28-pixel digits
    "reconstructions.png": (110 + 580, 112),
    "interpolations.png": (546, 438),  # 10 × 8 cells: 91 × 73 px, ×6 to reach 512
    "traversals.png": (130 + 574, 259),  # labels + 9 values × 4 dimensions: 82 × 37 px, ×7
    "kl_per_dim.png": (960, 600),  # 6.4 × 4 inches at 150 dpi
    "latent_map.png": (960, 780),
    "curve_loss.png": (960, 600),
    "curve_kl.png": (960, 600),
    "curve_lr.png": (960, 600),
    "curve_speed.png": (960, 600),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    assert main(["train", *TINY, "--epochs", "2", "--out", str(root / "a")]) == 0
    assert main(["eval", str(root / "a"), "--iwae-k", "5", "--json"]) == 0  # writes a/eval.json
    assert main(["train", *TINY, "--epochs", "1", "--lr", "3e-3", "--out", str(root / "b")]) == 0
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def page(runs) -> Path:
    assert main(["report", str(runs[0])]) == 0
    return runs[0] / "report.html"


def check_png(path: Path, size: tuple[int, int] | None = None) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.verify()
    with Image.open(path) as im:
        im.load()
        if size is not None:
            assert im.size == size, (path.name, im.size, size)


def test_every_picture_is_a_valid_png_of_the_expected_size(page):
    figures = page.parent / "figures"
    assert {p.name for p in figures.glob("*.png")} == set(EXPECTED_SIZES)
    for name, size in EXPECTED_SIZES.items():
        check_png(figures / name, size)


def test_pictures_of_vector_data_do_not_crash(tmp_path):
    torch.manual_seed(0)
    vae = VAE(MLPNet((10,), 3, 1, [16]), build_likelihood("gaussian", (10,)), 3)
    x = torch.randn(50, 10)
    paths = figures.write_pictures(vae, x, tmp_path, labels=None)
    assert set(paths) == {
        "samples",
        "reconstructions",
        "interpolations",
        "traversals",
        "kl_per_dim",
        "latent_map",
    }
    for path in paths.values():
        check_png(path)
    # one latent dimension, few examples, labels: the map and the traversals still draw
    vae1 = VAE(MLPNet((10,), 1, 1, [16]), build_likelihood("gaussian", (10,)), 1)
    paths = figures.write_pictures(vae1, x[:3], tmp_path / "one", labels=torch.tensor([0, 1, 1]))
    for path in paths.values():
        check_png(path)


def test_curves_read_metrics_and_survive_missing_data(runs, tmp_path):
    events = report.read_metrics(runs[0])
    xs, ys = plots._series(events, "train", "loss")
    assert len(xs) == len(ys) > 0 and all(a <= b for a, b in itertools.pairwise(xs))
    paths = plots.plot_curves([("empty", [])], tmp_path)
    for path in paths.values():
        check_png(path, (960, 600))


def test_the_report_has_every_section_and_is_self_contained(page):
    text = page.read_text()
    for sid, title in report.SECTIONS:
        assert f'<section id="{sid}">' in text and f"<h2>{html.escape(title)}</h2>" in text
    images = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(images) == len(EXPECTED_SIZES)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    # nothing to fetch: no external scripts, styles, fonts or links
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    # the numbers of eval.json and summary.json are on the page
    evaluation = json.loads((page.parent / "eval.json").read_text())
    assert f"{evaluation['nll_iwae']:,.2f} ± {evaluation['nll_iwae_stderr']:.2f} (k = 5)" in text
    assert "max_value" not in text and "digits" in text and "Active units" in text


def test_several_runs_side_by_side(runs, tmp_path):
    out = tmp_path / "compare.html"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    text = out.read_text()
    header = re.search(r'<section id="summary">.*?<thead>(.*?)</thead>', text, re.S)
    assert (
        header and '<th class="num">a</th>' in header.group(1) and '<th class="num">b</th>' in header.group(1)
    )
    assert 'class="differs"' in text  # the config table marks train.lr and train.epochs
    assert (tmp_path / "figures" / "a" / "samples.png").is_file()
    assert (tmp_path / "figures" / "b" / "samples.png").is_file()
    assert len(re.findall(r'<img[^>]*src="data:image/png', text)) == 4 + 2 * (len(EXPECTED_SIZES) - 4)


def test_report_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["report", str(runs[0]), str(runs[1])]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a turbovae run directory" in capsys.readouterr().err


def test_tensorboard_export(runs, page, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = report.write_tensorboard(runs[0], tmp_path / "tb")
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/kl", "train/lr", "train/samples_per_second", "val/nelbo"} <= set(
        tags["scalars"]
    )
    assert "eval/nll_iwae" in tags["scalars"]
    assert {"pictures/samples", "pictures/latent_map", "pictures/curve_loss"} <= set(tags["images"])


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || "resource failed")), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: images.length, broken: broken, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.slow  # a browser
def test_the_page_loads_in_headless_chromium(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result == {"images": len(EXPECTED_SIZES), "broken": 0, "errors": []}
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
