"""The DataFrame API (``turbovae.TableSynthesizer``), DataFrames as typed tables and back with their
dtypes, and the date, datetime and time-of-day column types (CSV text and pandas dtypes)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from turbovae.cli import main
from turbovae.data.table_transform import decode, encode, fit_transform
from turbovae.data.tables import Table, read_table, write_table
from turbovae.engine.rundir import data_in_run
from turbovae.errors import ConfigError, DataError
from turbovae.evaluation.fidelity import ks_statistic

pd = pytest.importorskip("pandas")

import turbovae  # noqa: E402 - after the skip: the API needs pandas
from turbovae import synthesizer  # noqa: E402
from turbovae.data.frames import frame_from_table, table_from_frame  # noqa: E402

# a few seconds of training at most: the API's paths, not a good model
TINY = {"epochs": 2, "hidden": [16], "latent": 4, "eval.iwae_k": 2}


def every_dtype(n: int = 8) -> pd.DataFrame:
    """One column of each dtype the API brings back as it went in, with missing values where the dtype
    can hold them."""
    rng = np.random.default_rng(0)
    stamps = pd.date_range("2021-03-27 22:00", periods=n, freq="37min")
    return pd.DataFrame(
        {
            "text": pd.Series([["red", "green", None, "blue"][i % 4] for i in range(n)], dtype="str"),
            "objects": pd.Series([["x", "y", None][i % 3] for i in range(n)], dtype=object),
            "count": pd.array([None if i == 2 else i * 3 for i in range(n)], dtype="Int64"),
            "small": np.arange(n, dtype="int32"),
            "real": np.round(rng.normal(size=n), 3),
            "flag": np.arange(n) % 3 == 0,
            "maybe": pd.array([None if i == 1 else bool(i % 2) for i in range(n)], dtype="boolean"),
            "size": pd.Categorical(
                [["s", "l"][i % 2] for i in range(n)], categories=["s", "m", "l"], ordered=True
            ),
            "code": pd.Categorical([[10, 20][i % 2] for i in range(n)]),
            "paris": stamps.tz_localize("Europe/Paris", nonexistent="shift_forward"),
            "fixed": stamps.tz_localize(dt.timezone(dt.timedelta(hours=-5))),
            "naive": pd.Series(pd.date_range("2020-01-01", periods=n, freq="D").as_unit("ns")),
            "day": [None if i == 3 else dt.date(2020, 1, 1 + i) for i in range(n)],
            "clock": [dt.time(8 + i % 12, 30, 15) for i in range(n)],
            "iso": [f"2012/01/{i + 1:02d}" for i in range(n)],
        }
    )


# ---- DataFrames as typed tables ------------------------------------------------------------------


def test_a_frame_round_trips_its_dtypes_and_values() -> None:
    df = every_dtype()
    table, records = table_from_frame(df)
    assert {c.name: c.type for c in table.columns} == {
        "text": "categorical", "objects": "categorical", "count": "integer", "small": "integer",
        "real": "continuous", "flag": "boolean", "maybe": "boolean", "size": "categorical",
        "code": "categorical", "paris": "datetime", "fixed": "datetime", "naive": "datetime",
        "day": "date", "clock": "time", "iso": "date",
    }  # fmt: skip
    assert table.column("iso").fmt == "%Y/%m/%d"  # ISO-looking text: the CSV reader's own inference
    back = frame_from_table(table, json.loads(json.dumps(records)))  # the records as frame.json keeps them
    pd.testing.assert_frame_equal(back, df)


def test_a_frame_holds_wall_clock_times_in_its_zone() -> None:
    df = every_dtype()
    paris = table_from_frame(df)[0].column("paris")
    assert paris.tz == "Europe/Paris" and paris.step == 60.0  # whole minutes
    wall = (df["paris"].dt.tz_localize(None) - pd.Timestamp("1970-01-01")).dt.total_seconds()
    assert np.array_equal(paris.values, wall.to_numpy())  # local times: a daily pattern in local time


def test_a_datetime_column_declared_date_keeps_its_days_and_zone() -> None:
    df = pd.DataFrame(
        {"d": pd.to_datetime(["2020-01-01 10:00", "2020-01-03 00:00", None]).tz_localize("UTC")}
    )
    table, records = table_from_frame(df, {"d": "date"})
    assert table.column("d").type == "date" and table.column("d").values[:2].tolist() == [18262.0, 18264.0]
    back = frame_from_table(table, records)["d"]
    assert back.dtype == df["d"].dtype and back[0] == pd.Timestamp("2020-01-01", tz="UTC")


def test_frame_text_goes_through_the_csv_code() -> None:
    """Text columns of a DataFrame are typed by the CSV reader's code: the same inference, markers and
    errors (a row number instead of a line)."""
    df = pd.DataFrame({"n": [str(i) for i in range(20)] + ["many"], "blank": ["a", "NA", " b "] * 7})
    with pytest.raises(DataError, match=r"DataFrame: row 21, column 'n': 'many' is not a number"):
        table_from_frame(df)
    table, _ = table_from_frame(df, {"n": "categorical"})
    assert list(table.column("blank").values[:3]) == ["a", None, "b"]  # as a CSV file would mean it


def test_frame_errors_are_one_line() -> None:
    with pytest.raises(DataError, match=r"column 'wait' has dtype timedelta64\[\w+\].*declare it drop"):
        table_from_frame(pd.DataFrame({"wait": pd.to_timedelta([1, 2], unit="s"), "x": [1, 2]}))
    table, _ = table_from_frame(pd.DataFrame({"wait": pd.to_timedelta([1, 2], unit="s"), "x": [1, 2]}),
                                {"wait": "drop"})  # fmt: skip
    assert table.names == ["x"]
    with pytest.raises(DataError, match="has no rows"):
        table_from_frame(pd.DataFrame({"x": []}))
    with pytest.raises(DataError, match=r"row 2, column 'x' \(continuous\): inf"):
        table_from_frame(pd.DataFrame({"x": [1.0, np.inf]}))
    with pytest.raises(ConfigError, match="did you mean 'when'"):
        table_from_frame(pd.DataFrame({"when": ["2020-01-01"]}), {"whem": "date"})


def test_missing_pandas_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ConfigError) as e:
        turbovae.TableSynthesizer(epochs=1)
    assert "pip install 'turbovae[tables]'" in str(e.value) and "\n" not in str(e.value)


# ---- dates and times in CSV files -----------------------------------------------------------------

DATED = """\
day,moment,clock,stamp,n
2012/01/31,2012-01-31T08:30:00+01:00,08:30,2012-01-31 08:30:15.250,1
2012/02/01,2012-02-01T23:59:00+01:00,17:05,2012-02-01 00:00:00.000,2
2012/02/29,2012-06-30T12:00:00+02:00,,2012-12-31 23:59:59.999,3
,2012-07-01T00:00:00+01:00,00:00,2012-03-01 12:00:00.500,4
"""


def test_iso_dates_in_a_csv_are_typed_and_written_back_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "dated.csv"
    path.write_text(DATED)
    table = read_table(path)
    kinds = {c.name: (c.type, c.fmt, c.tz, c.step) for c in table.columns}
    assert kinds == {
        "day": ("date", "%Y/%m/%d", None, 1.0),
        "moment": ("datetime", "%Y-%m-%dT%H:%M:%S", "+01:00", 60.0),  # zone: the first value's offset
        "clock": ("time", "%H:%M", None, 60.0),
        "stamp": ("datetime", "%Y-%m-%d %H:%M:%S", None, 0.001),
        "n": ("integer", None, None, None),
    }
    moment = table.column("moment").values
    assert (
        moment[2] - moment[1]
        == (dt.datetime(2012, 6, 30, 11) - dt.datetime(2012, 2, 1, 23, 59)).total_seconds()
    )
    write_table(table, tmp_path / "out.csv")
    written = (tmp_path / "out.csv").read_text().splitlines()
    original = DATED.splitlines()
    assert written[:3] == original[:3]  # the same text, value for value
    assert (
        written[3].split(",")[1] == "2012-06-30T11:00:00+01:00"
    )  # +02:00 on the column's offset: same instant


def test_declared_date_types_and_bad_dates(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n2020-01-01,2020-01-01,10:00\n2020-01-02,2020-01-01 10:00,11:00\n")
    table = read_table(path, {"a": "timestamp", "b": "datetime", "c": "time_of_day"})
    assert [c.type for c in table.columns] == ["datetime", "datetime", "time"]
    path.write_text("a,b\n2020-02-30,1\n2020-01-01,2\n")
    with pytest.raises(DataError, match=r"line 2, column 'a' \(date\): '2020-02-30' is not a valid date"):
        read_table(path)
    with pytest.raises(DataError, match=r"line 2, column 'b' \(time\): '1' is not a valid time"):
        read_table(path, {"a": "categorical", "b": "time"})
    with pytest.raises(ConfigError, match=r"expected one of: .*datetime, date, time"):
        read_table(path, {"b": "moment"})


def test_transforms_invert_dates_and_round_synthetic_ones_to_their_resolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    days = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 900, 300), unit="D")
    minutes = days + pd.to_timedelta(rng.integers(0, 1440, 300), unit="min")
    df = pd.DataFrame({"day": days.strftime("%d.%m.%Y").map(str), "when": minutes.strftime("%Y-%m-%d %H:%M"),
                       "t": minutes.strftime("%H:%M")})  # fmt: skip
    table, _ = table_from_frame(df, {"day": "categorical"})
    table.columns[0] = table_from_frame(pd.DataFrame({"day": days.date}))[0].columns[0]
    transform = fit_transform(table, np.arange(300))
    for c in transform["columns"]:
        assert c["transform"] == "mode" and "mode_dims" in c
    x = encode(table, transform)
    again = decode(x, transform)
    for c, d in zip(table.columns, again.columns, strict=True):
        assert np.allclose(c.values, d.values), c.name
    noise = decode(rng.normal(size=(500, x.shape[1])), transform)
    for c, step in (("day", 1.0), ("when", 60.0), ("t", 60.0)):
        v = noise.column(c).values
        assert np.all(np.abs(v / step - np.round(v / step)) < 1e-6), c
        assert v.min() >= table.column(c).values.min() and v.max() <= table.column(c).values.max()


def test_data_in_run_reads_a_runs_own_rows_from_it(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a\n1\n")
    assert data_in_run("csv:table.csv", tmp_path) == f"csv:{tmp_path / 'table.csv'}"
    assert data_in_run("table.csv", tmp_path) == str(tmp_path / "table.csv")
    for spec in ("digits", "csv:other.csv", f"csv:{tmp_path / 'x.csv'}"):
        assert data_in_run(spec, tmp_path) == spec


# ---- settings --------------------------------------------------------------------------------------


def test_settings_are_config_keys_with_or_without_their_section() -> None:
    synth = turbovae.TableSynthesizer(epochs=7, batch_size=64, latent=5, lr=1e-3, columns={"a": "date"},
                                      **{"eval.batch_size": 10, "model.hidden": [8]})  # fmt: skip
    cfg = synth.config
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.latent, cfg.train.lr) == (7, 64, 5, 1e-3)
    assert (cfg.data.columns, cfg.eval.batch_size, cfg.model.hidden) == ({"a": "date"}, 10, [8])
    assert cfg.train.beta == 0.5 and cfg.model.likelihood == "mixed"  # the tabular preset under them


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"learning_rate": 1e-3}, r"unknown setting 'learning_rate'.*did you mean 'lr'"),
        ({"train.epoch": 3}, r"unknown setting 'train.epoch'.*did you mean 'epochs'"),
        ({"epochs": -1}, r"train.epochs must be > 0"),
        ({"data.name": "digits"}, r"data.name: a TableSynthesizer's data are the DataFrame"),
    ],
)
def test_a_bad_setting_is_one_config_error(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        turbovae.TableSynthesizer(**settings)
    assert "\n" not in str(e.value)


# ---- fit, sample, save, load -----------------------------------------------------------------------


def small_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    colour = rng.choice(["red", "green", "blue"], n, p=[0.2, 0.3, 0.5])
    return pd.DataFrame(
        {
            "colour": pd.Categorical(colour, categories=["red", "green", "blue", "black"]),
            "size": pd.array(
                [None if i % 10 == 0 else int(v) for i, v in enumerate(rng.integers(1, 9, n))], dtype="Int64"
            ),
            "member": rng.random(n) < 0.4,
            "name": pd.Series(rng.choice(["ann", "bo", "cy"], n), dtype=object),
            "score": np.round(rng.normal(50, 10, n), 1),
            "joined": pd.Timestamp("2024-01-01", tz="America/New_York")
            + pd.to_timedelta(rng.integers(0, 365 * 24, n), unit="h"),
            "birthday": [dt.date(1980, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 9000, n)],
        }
    )


@pytest.fixture(scope="module")
def fitted() -> turbovae.TableSynthesizer:
    return turbovae.TableSynthesizer(**TINY).fit(small_frame(), progress=False)


def test_fit_and_sample_give_the_dtypes_back(fitted: turbovae.TableSynthesizer) -> None:
    df = small_frame()
    rows = fitted.sample(50, seed=0)
    assert isinstance(rows, pd.DataFrame) and len(rows) == 50
    assert list(rows.columns) == list(df.columns)
    assert rows.dtypes.to_dict() == df.dtypes.to_dict()
    assert list(rows["colour"].cat.categories) == ["red", "green", "blue", "black"]
    assert set(rows["name"]) <= {"ann", "bo", "cy"}
    assert all(isinstance(v, dt.date) for v in rows["birthday"])
    assert (rows["joined"].dt.minute == 0).all()  # whole hours, as the training column
    pd.testing.assert_frame_equal(fitted.sample(5, seed=3), fitted.sample(5, seed=3))
    assert fitted.acceptance_rate is None and "acceptance_rate" not in rows.attrs


def test_a_saved_run_is_a_run_directory_the_cli_reads(fitted, tmp_path, monkeypatch, capsys) -> None:
    run = fitted.save(tmp_path / "run")
    assert {"config.yaml", "table.csv", "frame.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    monkeypatch.chdir(tmp_path.parent)  # the run's rows are found in the run, whatever the directory
    assert main(["sample", str(run), "--n", "5", "--seed", "0", "--out", str(tmp_path / "s.csv")]) == 0
    assert read_table(tmp_path / "s.csv", schema=fitted_columns(run)).names == list(small_frame().columns)
    assert main(["eval", str(run), "--iwae-k", "2", "--out", "-"]) == 0
    assert main(["eval", str(run), "--fidelity", "--n", "50", "--json", "--out", "-"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["columns"]["joined"]["ks"] <= 1 and report["n_real"] == 20
    again = turbovae.TableSynthesizer.load(run)
    pd.testing.assert_frame_equal(again.sample(20, seed=1), fitted.sample(20, seed=1))
    assert again.save(run, overwrite=True) == run and (run / "table.csv").is_file()  # itself: kept
    assert again.fit(small_frame(50), progress=False).config.train.epochs == TINY["epochs"]  # its settings
    with pytest.raises(ConfigError, match="exists and is not empty"):
        fitted.save(run)
    assert fitted.save(run, overwrite=True) == run


def fitted_columns(run: Path) -> list[dict]:
    from turbovae.kinds.table import fitted as fitted_transform

    return fitted_transform(turbovae.load(run))["columns"]


def test_a_cli_run_loads_with_the_usual_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("d,n,c\n" + "".join(f"2020-01-{1 + i % 28:02d},{i},{'ab'[i % 2]}\n" for i in range(40)))
    assert main(["train", "--data", f"csv:{path}", "--epochs", "1", "model.hidden=[8]", "eval.iwae_k=2",
                 "--progress", "off", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    rows = turbovae.TableSynthesizer.load(tmp_path / "run").sample(10, seed=0)
    assert rows.dtypes.astype(str).to_dict() == {"d": "datetime64[us]", "n": "int64", "c": "object"}


def test_an_unfitted_synthesizer_says_so() -> None:
    with pytest.raises(ConfigError, match=r"not fitted yet: call fit\(df\) first"):
        turbovae.TableSynthesizer().sample(3)


# ---- conditions ------------------------------------------------------------------------------------


def test_conditions_by_rejection_report_their_acceptance(fitted) -> None:
    rows = fitted.sample(40, conditions={"colour": "green", "member": True}, seed=0)
    assert len(rows) == 40 and (rows["colour"] == "green").all() and rows["member"].all()
    assert 0 < fitted.acceptance_rate <= 1 and rows.attrs["acceptance_rate"] == fitted.acceptance_rate
    assert str(rows["colour"].dtype) == "category"


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        ({"colour": "purple"}, r"'purple' is not a category of column 'colour' \(blue, green, red\)"),
        ({"colour": "black"}, r"'black' is a category of column 'colour' that no training row has"),
        ({"score": 50}, r"column 'score' is continuous; conditions on categorical and boolean columns only"),
        ({"shade": "red"}, r"no column 'shade' in this run \(columns: colour, size"),
        ({"member": "perhaps"}, r"'perhaps' is not a value of the boolean column 'member'"),
    ],
)
def test_bad_conditions_are_config_errors(fitted, conditions, message) -> None:
    with pytest.raises(ConfigError, match=message):
        fitted.sample(5, conditions=conditions)


def only(colour: str, every: int = 0):
    """A stand-in for synthesize whose rows all have ``colour`` (but every ``every``-th: 'red')."""
    real = synthesizer.synthesize

    def draw(vae, n, **kw) -> Table:
        rows = real(vae, n, **kw)
        values = np.full(n, colour, dtype=object)
        if every:
            values[::every] = "red"
        rows.column("colour").values = values
        return rows

    return draw


def test_rejection_warns_when_few_rows_match_and_refuses_when_none_do(fitted, monkeypatch) -> None:
    monkeypatch.setattr(synthesizer, "MIN_DRAWS", 2000)
    monkeypatch.setattr(synthesizer, "CHUNK", 500)
    monkeypatch.setattr(synthesizer, "DRAW_FACTOR", 1)
    monkeypatch.setattr(synthesizer, "synthesize", only("blue", every=50))
    with pytest.warns(UserWarning, match=r"colour=red: 2.00% of sampled rows matched"):
        rows = fitted.sample(10, conditions={"colour": "red"}, seed=0)
    assert (rows["colour"] == "red").all() and fitted.acceptance_rate == pytest.approx(0.02)
    with pytest.raises(
        DataError, match=r"colour=red: 40 of 2,000 sampled rows matched \(2.000%\), fewer than"
    ):
        fitted.sample(100, conditions={"colour": "red"}, seed=0)
    monkeypatch.setattr(synthesizer, "synthesize", only("blue"))
    with pytest.raises(DataError, match=r"colour=red: none of 2,000 sampled rows matched; train with cond"):
        fitted.sample(10, conditions={"colour": "red"}, seed=0)


def test_a_conditional_run_samples_its_column_from_the_model(tmp_path: Path) -> None:
    synth = turbovae.TableSynthesizer(condition="colour", **TINY).fit(small_frame(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = synth.sample(30, conditions={"colour": "red"}, seed=0)
    assert (rows["colour"] == "red").all() and synth.acceptance_rate == 1.0
    assert list(rows.columns) == list(small_frame().columns)
    both = synth.sample(10, conditions={"colour": "blue", "member": False}, seed=0)
    assert (both["colour"] == "blue").all() and not both["member"].any()


# ---- a real table with dates -----------------------------------------------------------------------


def seattle_weather(tmp_path: Path) -> Path:
    """vega_datasets' seattle-weather.csv (1,461 days of 2012-2015, dates written 2012/01/01), or, where
    vega_datasets is not installed, a table of the same shape made here."""
    spec = importlib.util.find_spec("vega_datasets")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "_data" / "seattle-weather.csv"
        if path.is_file():
            return path
    rng = np.random.default_rng(0)
    days = pd.date_range("2012-01-01", "2015-12-31", freq="D")
    season = np.cos(2 * np.pi * (days.dayofyear.to_numpy() - 200) / 365)
    path = tmp_path / "weather.csv"
    pd.DataFrame({
        "date": days.strftime("%Y/%m/%d"),
        "temp_max": np.round(17 + 9 * season + rng.normal(0, 3, len(days)), 1),
        "weather": np.where(rng.random(len(days)) < 0.4 - 0.3 * season, "rain", "sun"),
    }).to_csv(path, index=False)  # fmt: skip
    return path


def test_dates_of_a_real_table_round_trip_their_type_and_format_with_a_close_distribution(tmp_path) -> None:
    path = seattle_weather(tmp_path)
    df = pd.read_csv(path)  # the dates are text, 2012/01/01
    synth = turbovae.TableSynthesizer(epochs=40).fit(df, progress=False)
    rows = synth.sample(len(df), seed=0)
    assert rows.dtypes.to_dict() == df.dtypes.to_dict()
    assert rows["date"].str.fullmatch(r"\d{4}/\d{2}/\d{2}").all()
    run = synth.save(tmp_path / "weather")
    assert main(["sample", str(run), "--n", "500", "--out", str(tmp_path / "s.csv")]) == 0
    written = read_table(tmp_path / "s.csv")
    assert written.column("date").type == "date" and written.column("date").fmt == "%Y/%m/%d"
    real = read_table(path).column("date").values
    ks = ks_statistic(real, read_table(tmp_path / "s.csv").column("date").values)
    ks_frame = ks_statistic(real, pd.to_datetime(rows["date"], format="%Y/%m/%d").map(pd.Timestamp.toordinal)
                            .to_numpy(float) - dt.date(1970, 1, 1).toordinal())  # fmt: skip
    assert ks <= 0.1 and ks_frame <= 0.1, (ks, ks_frame)  # measured: 0.03-0.05


def test_the_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """docs/tables.md's DataFrame example, as written but for fewer epochs."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "tables.md").read_text()
    block = next(b for b in text.split("```python\n")[1:] if "TableSynthesizer(" in b).split("```")[0]
    assert "epochs=100" in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("epochs=100", "epochs=3"), "docs/tables.md", "exec"), {})
    assert 0 < float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1
    assert (tmp_path / "runs" / "visits" / "table.csv").is_file()


@pytest.mark.slow  # the report's pictures and evaluation: about 10 s
def test_the_report_of_a_dataframe_run(fitted, tmp_path: Path) -> None:
    run = fitted.save(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
