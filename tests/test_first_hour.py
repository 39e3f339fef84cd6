"""A user's first hour (issue 22): progress on long work, outputs that fit the data, a comparison
report that ranks only what compares, sharper messages, the API gaps, the front door."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import turbovae
from turbovae.cli import main
from turbovae.progress import Progress

# a tiny digits run: seconds on two busy cores
TINY = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "train.log_every=5",
        "eval.iwae_k=5", "train.compile=off"]  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "digits"
    assert main(["train", *TINY, "--epochs", "1", "--progress", "off", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from turbovae.data.tables import export_tables

    return {p.stem: p for p in export_tables(tmp_path_factory.mktemp("tables"))}


@pytest.fixture(scope="module")
def wine_run(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "wine"
    args = ["--data", f"csv:{tables['wine']}", "--batch-size", "64", "--epochs", "20", "--progress", "off"]
    assert main(["train", *args, "eval.iwae_k=5", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first-hour")
    rng = random.Random(0)
    words = (
        ["the cat", "a dog", "my friend"],
        ["sees", "likes", "paints"],
        ["the ball", "a tree", "the sea"],
    )
    lines = [" ".join(rng.choice(w) for w in words) for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    small = ["model.hidden=[32]", "model.embedding=16", "train.epochs=2", "train.batch_size=32",
             "eval.iwae_k=3", "eval.every_epoch=false"]  # fmt: skip
    out = root / "text"
    data = ["--data", f"text:{root / 'corpus.txt'}"]
    assert main(["train", *data, *small, "--progress", "off", "--out", str(out)]) == 0
    return out


def colourful(path: Path) -> bool:
    """Whether a picture has coloured pixels (a barcode), not only greys (an image grid of strips)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return bool((np.abs(rgb[..., 0] - rgb[..., 1]) > 40).any())


@pytest.fixture
def lines_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain progress lines at every update (the interval is 10 s by default)."""
    monkeypatch.setenv("TURBOVAE_PROGRESS_INTERVAL", "0")


# ---- 1. progress on long work ------------------------------------------------------------------------


def test_progress_writes_a_plain_line_every_interval_when_stderr_is_not_a_terminal():
    clock, out = FakeClock(), io.StringIO()  # a StringIO is not a terminal
    with Progress(100, "IWAE k=1000", "examples", file=out, interval=10, clock=clock) as bar:
        for t in (1, 5, 11, 15, 25):
            clock.now = t
            bar.update(10)
    lines = out.getvalue().splitlines()
    assert lines == [
        "turbovae: IWAE k=1000: 30 of 100 examples (30%), 11 s elapsed, ETA 26 s",
        "turbovae: IWAE k=1000: 50 of 100 examples (50%), 25 s elapsed, ETA 25 s",
        "turbovae: IWAE k=1000: done, 50 examples in 25 s",
    ]
    quiet = io.StringIO()  # work that ends before the first interval says nothing
    with Progress(10, "short", file=quiet, interval=10, clock=FakeClock()) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_training_and_its_final_evaluation_show_progress_without_a_terminal(tmp_path, capsys, lines_at_once):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "turbovae: training: 5 of 22 steps (23%)" in err and "ETA" in err
    # the final evaluation says up front what it costs and how to skip it, then shows its progress
    assert "final evaluation: IWAE log-likelihood with k=5 samples on 180 test examples" in err
    assert "eval.iwae_k=0 skips it" in err
    assert "turbovae: IWAE k=5: " in err and "of 180 examples" in err
    assert main(["train", *TINY, "--epochs", "1", "--progress", "off", "--out", str(tmp_path / "quiet")]) == 0
    assert "turbovae: training" not in capsys.readouterr().err


@pytest.mark.slow
def test_eval_report_fidelity_and_tune_report_progress(digits_run, wine_run, tmp_path, capsys, lines_at_once):
    assert main(["eval", str(digits_run), "--iwae-k", "3", "--out", "-"]) == 0
    err = capsys.readouterr().err
    assert "turbovae: IWAE k=3: " in err and "of 180 examples" in err
    assert main(["report", str(digits_run)]) == 0
    assert "turbovae: report: " in capsys.readouterr().err
    assert main(["eval", str(wine_run), "--fidelity", "--out", "-"]) == 0
    assert "turbovae: fidelity: " in capsys.readouterr().err
    tune = ["tune", *TINY, "--budget", "2", "--out", str(tmp_path / "tuned.yaml")]
    assert main(tune) == 0
    err = capsys.readouterr().err
    assert "turbovae: tune: 1 s elapsed of 2 s" in err and "turbovae: tune: done in" in err


def test_iwae_calls_its_progress_callback_for_every_batch(digits_run):
    vae = turbovae.load(digits_run)
    x = torch.bernoulli(torch.full((30, 1, 8, 8), 0.3))
    seen: list[int] = []
    turbovae.evaluation.iwae_nll(vae, x, lambda t: t, k=4, batch_size=8, progress=seen.append)
    assert seen == [8, 8, 8, 6]


def test_the_profiler_record_function_warning_of_compiled_steps_is_dropped():
    from turbovae import runtime

    runtime.quiet_compile_logs()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.variables.ctx_manager")
    handler = Keep()
    log.addHandler(handler)
    try:
        cls = "<class 'torch.autograd.profiler.record_function'>"
        log.warning("Profiler record function %s will be ignored", cls)
        log.warning("something else")
    finally:
        log.removeHandler(handler)
    assert records == ["something else"]


@pytest.mark.slow
def test_a_compiled_optimiser_step_prints_no_profiler_warning(capfd):
    from turbovae import runtime

    m = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(m.parameters())

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = m(x).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    runtime.compile_fn(step, torch.device("cpu"))(torch.randn(2, 4))
    assert "Profiler record function" not in capfd.readouterr().err


# ---- 2. outputs that fit the data --------------------------------------------------------------------


def test_table_and_text_runs_draw_barcodes_not_image_grids(wine_run, text_run):
    for run in (wine_run, text_run):
        for name in ("samples.png", "reconstructions.png"):
            assert colourful(run / name), (run.name, name)
    with Image.open(wine_run / "samples.png") as im:
        assert im.height >= 32 * 14  # 32 samples, a 14-pixel row each
    assert (text_run / "samples.txt").is_file()  # and the sentences


def test_sample_writes_a_barcode_for_tables_and_text_and_refuses_other_pictures(
    wine_run, text_run, tmp_path, capsys
):
    assert main(["sample", str(wine_run), "--n", "10", "--out", str(tmp_path / "rows.png")]) == 0
    assert colourful(tmp_path / "rows.png")
    assert main(["sample", str(text_run), "--n", "5", "--out", str(tmp_path / "lines.png")]) == 0
    assert colourful(tmp_path / "lines.png")
    capsys.readouterr()
    for run, out in ((wine_run, "rows.jpg"), (text_run, "lines.npy")):
        assert main(["sample", str(run), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out must end in" in err and ".png" in err


@pytest.mark.slow  # two training runs and their reports
def test_the_report_of_a_table_run_shows_rows_and_histograms_and_of_a_text_run_sentences(wine_run, text_run):
    assert main(["report", str(wine_run)]) == 0
    page = (wine_run / "report.html").read_text()
    assert '<section id="rows">' in page and "<th>alcohol</th>" in page and "<th>cultivar</th>" in page
    assert (wine_run / "figures" / "histograms.png").is_file()
    assert colourful(wine_run / "figures" / "reconstructions.png")
    assert "Barcodes for table runs" in page
    assert main(["report", str(text_run)]) == 0
    page = (text_run / "report.html").read_text()
    assert '<section id="sentences">' in page and "<pre>" in page and "input:" in page
    assert colourful(text_run / "figures" / "samples.png")


def test_digits_reconstructions_are_scaled_up_labelled_and_show_the_input_beside_its_binarised_draw(
    digits_run,
):
    with Image.open(digits_run / "reconstructions.png") as im:
        width, height = im.size
        rgb = np.asarray(im.convert("RGB"))
    # three rows (input, binarised draw, reconstruction) of 16 digits, each at least 28 pixels
    assert height >= 3 * 28 and (width - 110) >= 16 * 28
    assert (rgb[:, :100] == 255).mean() > 0.9  # a white margin for the row labels...
    assert (rgb[:, :100] < 128).any()  # ...with the labels on it


# ---- 3. the comparison report ranks only what compares ------------------------------------------------


def _run_info(name: str, likelihood: str, binarize: str, nelbo: float):
    from turbovae.commands.report import RunInfo

    config = {
        "data": {"name": "digits", "binarize": binarize},
        "model": {"name": "mlp", "likelihood": likelihood},
    }
    summary = {"data": "digits", "likelihood": likelihood, "binarize": binarize, "test_nelbo": nelbo,
               "test_nll_iwae": nelbo - 1, "test_nll_iwae_stderr": 0.1, "iwae_k": 10}  # fmt: skip
    return RunInfo(path=Path(name), name=name, config=config, summary=summary)


def test_the_comparison_ranks_only_runs_with_the_same_data_likelihood_and_binarisation():
    from turbovae.commands.report import _summary_table

    bernoulli = _run_info("bernoulli", "bernoulli", "dynamic", 30.0)
    gaussian = _run_info("gaussian", "gaussian", "none", -80.0)
    table = _summary_table([bernoulli, gaussian])
    assert "best" not in table  # a Gaussian density on grey values is not "better" than a Bernoulli mass
    assert "the runs differ in likelihood (bernoulli, gaussian) and binarisation (dynamic, none)" in table
    assert "not ranked: nothing to compare with" in table
    # a third run like the first: those two are ranked against each other, the Gaussian is not
    other = _run_info("bernoulli-2", "bernoulli", "dynamic", 28.0)
    table = _summary_table([bernoulli, gaussian, other])
    assert table.count('class="num best"') == 2  # NELBO and IWAE NLL of bernoulli-2
    ranked = table.split("<th>Ranked")[1].split("</tr>")[0]
    assert ranked.count("<td") == 3
    assert ranked.index("with bernoulli-2") < ranked.index("not ranked") < ranked.index("with bernoulli<")
    best = table.split('class="num best">')[1].split("<")[0]
    assert best == "28.00"
    same = _summary_table([bernoulli, other])
    assert "Ranked" not in same and same.count('class="num best"') == 2


# ---- 4. messages ---------------------------------------------------------------------------------------


def test_one_bad_value_in_1500_is_counted_not_rounded_to_100_percent(tmp_path):
    from turbovae.data.tables import read_table
    from turbovae.errors import DataError

    rows = [f"{i},{i * 0.5}" for i in range(1500)]
    rows[700] = "700,unknown"
    path = tmp_path / "t.csv"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        read_table(path)
    message = str(e.value)
    assert "'unknown' is not a number, but 1,499 of the column's 1,500 values are" in message
    assert "100%" not in message and "line 702" in message


def test_the_delimiter_is_detected_and_question_marks_are_missing(tmp_path):
    from turbovae.data.tables import read_table

    path = tmp_path / "semicolons.csv"
    path.write_text(
        "age;income;city\n" + "".join(f"{20 + i};{1000 + 7 * i}.5;{'ab'[i % 2]}\n" for i in range(30))
    )
    table = read_table(path)
    assert table.names == ["age", "income", "city"]
    assert [c.type for c in table.columns] == ["integer", "continuous", "categorical"]
    pipes = tmp_path / "pipes.csv"
    pipes.write_text("x|y\n" + "".join(f"{i}|{i % 3}\n" for i in range(20)))
    assert read_table(pipes).names == ["x", "y"]
    uci = tmp_path / "uci.csv"
    uci.write_text(
        "age,workclass\n" + "".join(f"{30 + i},{'?' if i % 5 == 0 else 'private'}\n" for i in range(20))
    )
    table = read_table(uci)
    assert table.column("workclass").missing.sum() == 4
    assert set(table.column("workclass").values) == {"private", None}
    one = tmp_path / "one.csv"  # one column: nothing to detect, still read
    one.write_text("v\n" + "".join(f"{i}\n" for i in range(10)))
    assert read_table(one).names == ["v"]


def test_an_image_likelihood_on_a_table_suggests_mixed(tables, tmp_path, capsys):
    args = ["--data", f"csv:{tables['wine']}", "--likelihood", "discretized-logistic"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--likelihood mixed" in err and "gaussian" not in err and err.count("\n") == 1


def test_a_misspelt_option_gets_the_closest_option_of_its_command_in_one_line(capsys):
    assert main(["train", "--epcohs", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "turbovae train: error: unrecognized option '--epcohs'; did you mean '--epochs'?\n"
    assert main(["train", "--learning-rate", "3e-4"]) == 2
    assert "did you mean '--lr'?" in capsys.readouterr().err
    assert main(["eval", "runs/x", "--iwae_k", "5"]) == 2
    assert "did you mean '--iwae-k'?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("train.learning_rate=3e-4", "lr"), ("train.batchsize=32", "batch_size"), ("model.z_dim=8", "latent"),
     ("train.num_epochs=3", "epochs"), ("model.latent_dim=8", "latent"), ("train.bs=8", "batch_size")],
)  # fmt: skip
def test_common_names_of_config_keys_suggest_turbovaes(override, suggestion):
    from turbovae.errors import ConfigError

    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        turbovae.resolve(overrides=[override])


def test_an_8_bit_likelihood_on_binarised_digits_is_refused_with_what_happened(tmp_path, capsys):
    out = str(tmp_path / "run")  # the default preset, digits-mlp, binarises
    assert main(["train", "--likelihood", "categorical-256", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "scores 8-bit values, but data.binarize = dynamic makes the data 0/1" in err
    assert "'digits' has 17 levels (0..16), not 256" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ---- 5. API and small gaps -----------------------------------------------------------------------------


def test_iwae_nll_works_without_prepare(digits_run):
    from turbovae.engine.setup import setup
    from turbovae.errors import DataError

    vae = turbovae.load(digits_run)
    s = setup(vae.config, torch.device("cpu"), vae.data_meta)
    x, prepare = s.split("test")  # uint8 0/1: the fixed binarised draw

    def nll(*args: object) -> float:
        return turbovae.iwae_nll(vae, *args, k=10, generator=torch.Generator().manual_seed(0))["nll"]

    assert nll(x) == nll(x, prepare) == nll(prepare(x))  # stored draws, or floats already prepared
    assert turbovae.nelbo(vae, x, generator=torch.Generator().manual_seed(0))["nelbo"] > 0
    with pytest.raises(DataError, match="scores binary data"):  # grey values are not scored silently
        turbovae.iwae_nll(vae, s.data.x_test, k=10)


def test_encode_reads_a_table_with_the_runs_transforms_and_names_the_rows(wine_run, tables, tmp_path):
    wine = tables["wine"].read_text().splitlines()
    with_ids = tmp_path / "with-ids.csv"  # an identifier column the run does not model names the rows
    with_ids.write_text(
        "\n".join([f"id,{wine[0]}", *(f"w{i},{line}" for i, line in enumerate(wine[1:6]))]) + "\n"
    )
    assert main(["encode", str(wine_run), "--input", str(with_ids), "--out", str(tmp_path / "z.npz")]) == 0
    z = np.load(tmp_path / "z.npz")
    assert z["mean"].shape == (5, 32) and z["stddev"].shape == (5, 32)
    assert list(z["names"]) == ["w0", "w1", "w2", "w3", "w4"]
    codes = tmp_path / "z.csv"
    assert main(["encode", str(wine_run), "--input", str(tables["wine"]), "--out", str(codes)]) == 0
    lines = codes.read_text().splitlines()
    assert lines[0].startswith("name,z0,z1,") and lines[1].startswith("line 2,") and len(lines) == 179
    # the codes are the posterior means of the rows as the run encodes them
    vae = turbovae.load(wine_run)
    from turbovae.data.table_transform import encode as encode_table
    from turbovae.data.tables import read_table

    x = torch.from_numpy(encode_table(read_table(with_ids, schema=vae.data_meta["table"]["columns"]),
                                      vae.data_meta["table"]))  # fmt: skip
    assert np.allclose(vae.encode(x).mean.detach().numpy(), z["mean"], atol=1e-5)


def test_encode_names_images_by_file_and_text_by_line(digits_run, text_run, tmp_path):
    folder = tmp_path / "images"
    (folder / "b").mkdir(parents=True)
    for name in ("b/two.png", "one.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / name)
    assert main(["encode", str(digits_run), "--input", str(folder), "--out", str(tmp_path / "i.csv")]) == 0
    names = [line.split(",")[0] for line in (tmp_path / "i.csv").read_text().splitlines()[1:]]
    assert names == ["b/two.png", "one.png"]
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sees the sea\na dog likes a tree\n")
    assert main(["encode", str(text_run), "--input", str(lines), "--out", str(tmp_path / "t.npz")]) == 0
    assert list(np.load(tmp_path / "t.npz")["names"]) == ["the cat sees the sea", "a dog likes a tree"]


def test_fidelity_states_its_target_rule_and_prints_a_readable_summary(wine_run, capsys):
    import json

    from turbovae.data.tables import Column, Table
    from turbovae.evaluation.fidelity import choose_target

    n = 30
    table = Table([
        Column("label", "categorical", np.array(["a", "b", "c"] * 10, dtype=object)),
        Column("x", "continuous", np.arange(n, dtype=float)),
        Column("organic", "categorical", np.array([f"id{i}" for i in range(n)], dtype=object)),  # 30 classes
    ])  # fmt: skip
    column, why = choose_target(table)
    assert column.name == "label" and "last categorical column with 2-20 classes" in why
    column, why = choose_target(Table(table.columns[1:]))
    assert column.name == "x" and "last numeric column" in why
    assert main(["eval", str(wine_run), "--fidelity", "--out", "-"]) == 0
    out = capsys.readouterr().out
    assert "ML efficacy    predicts 'cultivar', the last categorical column with 2-20 classes" in out
    assert "mean KS" in out and "privacy" in out and not out.lstrip().startswith("{")
    assert main(["eval", str(wine_run), "--fidelity", "--out", "-", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ml_efficacy"]["target_rule"].startswith("the last categorical column")


# ---- 6. the front door ------------------------------------------------------------------------------


def test_the_readme_quick_start_trains_on_your_own_images_csv_and_text(tmp_path, tables):
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    top = readme.split("## Set-up")[0]
    assert "(docs/README.md)" in top and "Contents" in top  # the manual's table of contents, up front
    quick = readme.split("## Quick start")[1].split("```")[1]
    own = [
        line.split("#")[0].split()
        for line in quick.splitlines()
        if re.search(r"--data (my-|csv:my-|text:my-)", line)
    ]
    assert [args[3] for args in own] == ["my-images/", "csv:my-table.csv", "text:my-corpus.txt"]
    # each line works on data of that kind (made small here: one epoch, a small batch)
    rng = np.random.default_rng(0)
    (tmp_path / "my-images").mkdir()
    for i in range(40):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "my-images" / f"{i}.png"
        )
    (tmp_path / "my-table.csv").write_text(tables["iris"].read_text())
    (tmp_path / "my-corpus.txt").write_text("".join(f"line {i % 7} of {i % 5}\n" for i in range(200)))
    small = ["--epochs", "1", "--batch-size", "16", "--progress", "off", "eval.iwae_k=2"]
    for args in own:
        args = [a.replace("my-", f"{tmp_path}/my-").replace("runs/", f"{tmp_path}/runs/") for a in args]
        assert main([*args[1:], *small]) == 0, shlex.join(args)
