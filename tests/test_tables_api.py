"""DataFrames as typed tables and back with their dtypes, and the date, datetime and time-of-day column
types (CSV text and pandas dtypes)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from turbovae.data.table_transform import decode, encode, fit_transform
from turbovae.data.tables import read_table, write_table
from turbovae.engine.rundir import data_in_run
from turbovae.errors import ConfigError, DataError

pd = pytest.importorskip("pandas")

from turbovae.data.frames import frame_from_table, table_from_frame  # noqa: E402


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
