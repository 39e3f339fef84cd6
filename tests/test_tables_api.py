"""Dates, datetimes and times of day in table columns: read from ISO-looking text, learned as numbers,
written back in the column's format."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from turbovae.data.tables import read_table, write_table
from turbovae.errors import ConfigError, DataError

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
