"""Dates, times of day and datetimes in a table: read from ISO-looking text, learned as numbers, written
back in the text's format.

A column's values are numbers (float64, NaN for missing), so that the table transforms treat them as
they treat any number (mode-specific normalisation):

- ``date``: days since 1970-01-01 (whole numbers);
- ``datetime``: seconds since 1970-01-01T00:00 on the column's wall clock: a column with a time zone
  (``tz``: an offset as written, ``+01:00``, ``+0100``, ``Z``, or a zone name, ``Europe/Paris``) holds its
  local times, so that a daily pattern is learned in local time; an offset written on a value converts
  that value to the column's zone (the first offset in the column, or the DataFrame's zone);
- ``time``: seconds since midnight.

The text forms read are ISO 8601's: ``2012-01-31`` (or ``2012/01/31``), ``2012-01-31T08:30``,
``2012-01-31 08:30:15.250+01:00``, ``08:30:15``. The format of the first value is the column's
(``fmt``, a ``strftime`` pattern, with ``decimals`` digits of a second after it) and values are
written back in it. ``step`` is the column's resolution (days for a date, seconds otherwise): synthetic
values are rounded to it, so that a column of whole minutes stays in whole minutes.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any

import numpy as np

from ..errors import DataError

TYPES = ("datetime", "date", "time")
EPOCH = datetime(1970, 1, 1)
EPOCH_DAY = date(1970, 1, 1).toordinal()
DAY = 86400.0
MAX_DECIMALS = 6  # microseconds: what Python's datetime holds
_DATE = r"(?P<year>\d{4})(?P<dsep>[-/])(?P<month>\d{2})(?P=dsep)(?P<day>\d{2})"
_TIME = r"(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,9}))?)?"
_ZONE = r"(?P<zone>Z|[+-]\d{2}(?::?\d{2})?)"
DATE = re.compile(_DATE + r"\Z")
TIME = re.compile(_TIME + r"\Z")
DATETIME = re.compile(_DATE + r"(?P<tsep>[T ])" + _TIME + _ZONE + r"?\Z")
PATTERNS = {"date": DATE, "time": TIME, "datetime": DATETIME}


def infer(tokens: set[str]) -> str | None:
    """The type a column's distinct present values say (``date``, ``datetime``, ``time``), if they all
    look like one; a column of dates with a datetime among them is of datetimes."""
    if not tokens:
        return None
    if all(DATE.match(t) for t in tokens):
        return "date"
    if all(DATETIME.match(t) or DATE.match(t) for t in tokens):
        return "datetime"
    if all(TIME.match(t) for t in tokens):
        return "time"
    return None


def fixed_offset(tz: str | None) -> float | None:
    """The offset in seconds of a written offset (``Z``, ``+01:00``, ``-0530``, ``UTC``); None for a zone
    name (or no zone)."""
    if tz is None:
        return None
    if tz in ("Z", "UTC", "utc"):
        return 0.0
    m = re.fullmatch(r"(?:UTC)?([+-])(\d{2}):?(\d{2})?", tz)
    if m is None:
        return None
    sign = -1.0 if m.group(1) == "-" else 1.0
    return sign * (int(m.group(2)) * 3600 + int(m.group(3) or 0) * 60)


def zone(tz: str) -> tzinfo:
    """A column's zone as a ``tzinfo``: a fixed offset, or the tz database's zone of that name."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    fixed = fixed_offset(tz)
    if fixed is not None:
        return timezone(timedelta(seconds=fixed))
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise DataError(f"time zone '{tz}' is not known here (no tz database entry)") from None


def _offset_at(tz: str, instant: float) -> float:
    """The column's offset from UTC, in seconds, at the instant ``instant`` (seconds since the epoch)."""
    fixed = fixed_offset(tz)
    if fixed is not None:
        return fixed
    moment = datetime.fromtimestamp(instant, zone(tz))
    offset = moment.utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def _wall_offset(tz: str, wall: float) -> float:
    """The column's offset from UTC at the wall-clock time ``wall`` (the standard time where a wall time
    happens twice)."""
    fixed = fixed_offset(tz)
    if fixed is not None:
        return fixed
    offset = (EPOCH + timedelta(seconds=wall)).replace(tzinfo=zone(tz)).utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def _format_of(kind: str, matches: list[re.Match[str]]) -> tuple[str, int]:
    """(strftime pattern, decimals of a second) that writes every matched value as precisely as it was
    written: the first value's separators, seconds if any value has them, the most digits of a second."""
    timed = [m for m in matches if m.groupdict().get("hour") is not None]
    if not matches or (kind == "time" and not timed):
        return default_format(kind), 0
    parts = []
    if kind != "time":
        sep = matches[0].group("dsep")
        parts.append(f"%Y{sep}%m{sep}%d")
    if timed:
        seconds = any(m.group("second") is not None for m in timed)
        parts.append(
            ("" if kind == "time" else timed[0].group("tsep")) + "%H:%M" + (":%S" if seconds else "")
        )
    digits = max((len(m.group("fraction") or "") for m in timed), default=0)
    return "".join(parts), min(digits, MAX_DECIMALS)


def _seconds(m: re.Match[str]) -> float:
    hour, minute = int(m.group("hour")), int(m.group("minute"))
    second = int(m.group("second") or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("hour, minute or second out of range")
    fraction = m.group("fraction")
    return hour * 3600 + minute * 60 + second + (float(f"0.{fraction}") if fraction else 0.0)


def _value(kind: str, token: str, tz: str | None) -> float:
    """One token as the column's number; ValueError when it is not a valid value of ``kind``."""
    if kind == "time":
        m = TIME.match(token)
        if m is None:
            raise ValueError("expected HH:MM or HH:MM:SS")
        return _seconds(m)
    m = DATE.match(token) if kind == "date" else (DATETIME.match(token) or DATE.match(token))
    if m is None:
        raise ValueError(f"expected YYYY-MM-DD{'' if kind == 'date' else ' HH:MM:SS'}")
    days = date(int(m.group("year")), int(m.group("month")), int(m.group("day"))).toordinal() - EPOCH_DAY
    if kind == "date":
        return float(days)
    wall = days * DAY + (_seconds(m) if m.groupdict().get("hour") is not None else 0.0)
    zone = m.groupdict().get("zone")
    if zone and tz is not None and zone != tz:  # the value's own offset: to the column's wall clock
        instant = wall - (fixed_offset(zone) or 0.0)
        wall = instant + _offset_at(tz, instant)
    return wall


def parse(
    kind: str, tokens: list[str], present: np.ndarray, where: Any, name: str, tz: str | None = None
) -> dict[str, Any]:
    """The column's numbers (``values``) and how it is written (``fmt``, ``decimals``, ``tz``, ``step``)
    from its text; a DataError naming the row of a value that is not one. ``tz``: the column's zone
    (a trained run's); by default the first offset written in the column."""
    rows = np.flatnonzero(present).tolist()
    distinct = dict.fromkeys(tokens[i] for i in rows)  # in order of appearance
    matches = [m for t in distinct if (m := PATTERNS[kind].match(t) or DATE.match(t)) is not None]
    fmt, decimals = _format_of(kind, matches)
    if tz is None:
        tz = next((z for i in rows if (z := _zone_text(kind, tokens[i])) is not None), None)
    out = np.full(len(tokens), np.nan)
    parsed: dict[str, float] = {}
    for i in rows:
        tok = tokens[i]
        value = parsed.get(tok)
        if value is None:
            try:
                value = parsed[tok] = _value(kind, tok, tz)
            except ValueError as e:
                raise DataError(f"{where(i, name)} ({kind}): '{tok}' is not a valid {kind} ({e})") from None
        out[i] = value
    return {"values": out, "fmt": fmt, "decimals": decimals, "tz": tz, "step": resolution(kind, out)}


def _zone_text(kind: str, token: str) -> str | None:
    if kind != "datetime":
        return None
    m = DATETIME.match(token)
    return m.group("zone") if m is not None else None


def default_format(kind: str) -> str:
    """How values without a text form of their own (a DataFrame's) are written."""
    return {"date": "%Y-%m-%d", "time": "%H:%M:%S", "datetime": "%Y-%m-%d %H:%M:%S"}[kind]


def resolution(kind: str, values: np.ndarray) -> float:
    """The largest of a day, an hour, a minute, a second (or 10^-d s) that divides every value:
    synthetic values are rounded to it. Dates: a day (1)."""
    if kind == "date":
        return 1.0
    v = values[~np.isnan(values)]
    slack = 4 * np.spacing(np.abs(v))  # what float64 cannot tell apart at these magnitudes
    steps = [3600.0, 60.0, 1.0] if kind == "time" else [DAY, 3600.0, 60.0, 1.0]
    for step in [*steps, *(10.0**-d for d in range(1, MAX_DECIMALS + 1))]:
        if np.all(np.abs(v - np.round(v / step) * step) <= np.maximum(0.01 * step, slack)):
            return step
    return 10.0**-MAX_DECIMALS


def round_to(values: np.ndarray, step: float | None) -> np.ndarray:
    """``values`` rounded to multiples of ``step`` (the column's resolution)."""
    if not step:
        return values
    return np.round(values / step) * step


def _suffix(tz: str, wall: float) -> str:
    """The offset as the column writes it (``Z``, ``+01:00`` or ``+0100``; a zone name: ``+01:00``)."""
    if tz == "Z":
        return "Z"
    offset = _wall_offset(tz, wall)
    sign = "-" if offset < 0 else "+"
    h, m = divmod(round(abs(offset)) // 60, 60)
    colon = ":" if fixed_offset(tz) is None or ":" in tz or tz in ("UTC", "utc") else ""
    if fixed_offset(tz) is not None and re.fullmatch(r"[+-]\d{2}", tz):
        return f"{sign}{h:02d}"
    return f"{sign}{h:02d}{colon}{m:02d}"


def as_python(kind: str, value: float) -> date | datetime | Any:
    """One number of the column as a Python ``date``, naive ``datetime`` (wall clock) or ``time``."""
    if kind == "date":
        return date.fromordinal(round(value) + EPOCH_DAY)
    moment = EPOCH + timedelta(seconds=float(value))
    if kind == "time":
        return moment.time()
    return moment


def format_values(kind: str, values: np.ndarray, fmt: str | None, decimals: int | None,
                  tz: str | None) -> list[str]:  # fmt: skip
    """The column's numbers as text in its format; "" for missing."""
    fmt = fmt or default_format(kind)
    d = decimals or 0
    out = []
    for v in values.tolist():
        if v != v:  # NaN: missing
            out.append("")
            continue
        moment = as_python(kind, v)
        text = moment.strftime(fmt)
        if d and "%S" in fmt:
            text += "." + f"{getattr(moment, 'microsecond', 0):06d}"[:d]
        if tz is not None and kind == "datetime":
            text += _suffix(tz, v)
        out.append(text)
    return out
