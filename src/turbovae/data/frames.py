"""pandas DataFrames as typed tables, and back with the dtypes they came with.

``table_from_frame`` reads a DataFrame's columns into a ``Table`` without writing them as text first:
numbers, booleans and datetimes from their values (``tables.number_column``), text through the same
typed-column code as a CSV file (``tables.text_column``: the same type inference, missing-value
markers and errors), so that a DataFrame means what its CSV would mean. It also returns each column's
dtype record (JSON), from which ``frame_from_table`` gives synthetic rows the input's dtypes:

| input dtype | type | back as |
|---|---|---|
| float | continuous | the same float dtype |
| int, Int64 (nullable, with NA) | integer | the same dtype |
| bool, boolean | boolean | the same dtype |
| category | categorical | the same categories, order and ``ordered`` flag |
| str, string, object of str | inferred from the text (dates too) | the same dtype, text as written |
| datetime64 (with or without a time zone) | datetime | the same dtype, unit and zone |
| object of ``datetime.date`` / ``time`` / ``datetime`` | date / time / datetime | the same |

pandas is optional (``pip install 'turbovae[tables]'``) and imported only when a DataFrame is used.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from . import datetimes
from .tables import (
    MAX_DECIMALS,
    MISSING_TOKENS,
    Column,
    Table,
    declared_types,
    format_column,
    number_column,
    text_column,
)
from .tables import _Where as Where  # names a row in messages

INSTALL = "pip install 'turbovae[tables]'"
SOURCE = "DataFrame"
_PYTHON = {bool: "bool", int: "int", float: "float", str: "str"}  # object columns' uniform element types
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def pandas() -> Any:
    """The pandas module, or a one-line ConfigError saying how to install it."""
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError(f"the DataFrame API needs pandas, which is not installed: {INSTALL}") from None
    return pd


def table_from_frame(
    df: Any, columns: dict[str, str] | None = None, source: str = SOURCE
) -> tuple[Table, dict[str, dict[str, Any]]]:
    """The typed columns of ``df`` and each column's dtype record.

    Args:
        df: A pandas DataFrame (or a polars one, converted with its ``to_pandas``).
        columns: Declared types by column name (``data.columns``; ``drop`` leaves a column out).
        source: What messages call the table.

    Raises:
        DataError: No rows, duplicate or empty column names, a dtype turbovae cannot model yet, or a
            value its column's type cannot hold.
        ConfigError: ``columns`` names a column the DataFrame does not have, or an unknown type.
    """
    pd = pandas()
    if not isinstance(df, pd.DataFrame) and type(df).__module__.startswith("polars"):
        df = df.to_pandas()  # a polars DataFrame: through pandas (polars' to_pandas needs pyarrow)
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas (or polars) DataFrame, got {type(df).__name__}")
    names = [str(c) for c in df.columns]
    if len(set(names)) != len(names) or not all(names):
        raise DataError(f"{source}: column names must be unique and not empty, got {names}")
    if len(df) == 0 or not names:
        raise DataError(f"{source}: has no rows" if names else f"{source}: has no columns")
    declared = declared_types(columns, names, source)
    where = Where(source, [])
    out: list[Column] = []
    records: dict[str, dict[str, Any]] = {}
    for name, label in zip(names, df.columns, strict=True):
        if declared.get(name) == "drop":
            continue
        column, record = _column(pd, name, df[label], declared.get(name), where)
        out.append(column)
        records[name] = record
    if not out:
        raise DataError(f"{source}: no columns left to model (all are declared drop)")
    return Table(out, source), records


def _native(pd: Any, series: Any) -> str | None:
    """The type a column's dtype says, where its values need no text; None for text and objects."""
    dtype = series.dtype
    types = pd.api.types
    if isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if types.is_bool_dtype(dtype):
        return "boolean"
    if types.is_integer_dtype(dtype):
        return "integer"
    if types.is_float_dtype(dtype):
        return "continuous"
    if types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if types.is_string_dtype(dtype) or types.is_object_dtype(dtype):
        return None
    raise DataError(
        f"{SOURCE}: column '{series.name}' has dtype {dtype}, which turbovae does not model yet (numbers, "
        "booleans, categories, strings, dates, times and datetimes): convert it, or declare it drop"
    )


def _column(pd: Any, name: str, series: Any, kind: str | None, where: Where) -> tuple[Column, dict[str, Any]]:
    record: dict[str, Any] = {"dtype": str(series.dtype)}
    missing = series.isna().to_numpy(dtype=bool)
    native = _native(pd, series)
    if native == "categorical":
        record.update(categories=[_json(v) for v in series.cat.categories], ordered=bool(series.cat.ordered))
    if native is None:  # object and string columns: what their elements are
        record["elements"] = _elements({type(v) for v in series[~missing]})
        if record["elements"] in datetimes.TYPES and kind in (None, record["elements"]):
            return _python_times(name, record["elements"], series, missing, where), record
    if native in ("integer", "continuous", "boolean") and kind in (None, native):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        column = number_column(name, native, values, where)
        if native == "continuous":  # synthetic values with as many decimals as the column's
            column.decimals = _decimals(values)
        return column, record
    if native == "datetime" and kind == "date":  # declared date: the day of the wall clock
        days = series
        if getattr(series.dtype, "tz", None) is not None:
            record["tz"] = str(series.dtype.tz)  # back as midnight in the zone
            days = series.dt.tz_localize(None)
        micros = days.dt.floor("D").to_numpy(dtype="datetime64[us]").astype(np.int64)
        return _dated(name, "date", np.where(missing, np.nan, micros / 86_400e6), where, tz=None), record
    if native == "datetime" and kind in (None, "datetime"):
        tz = getattr(series.dtype, "tz", None)
        if tz is not None:
            record["tz"] = str(tz)
            series = series.dt.tz_localize(None)  # the zone's wall clock
        micros = series.to_numpy(dtype="datetime64[us]").astype(np.int64)
        values = np.where(missing, np.nan, micros / 1e6)
        return _dated(name, "datetime", values, where, tz=record.get("tz")), record
    tokens = ["" if m else _text(v) for v, m in zip(series.tolist(), missing, strict=True)]
    present = ~missing & np.fromiter((t not in MISSING_TOKENS for t in tokens), dtype=bool, count=len(tokens))
    kind = kind or ("categorical" if native == "categorical" else None)
    return text_column(name, kind, tokens, where, present=present), record


def _elements(types: set[type]) -> str:
    """What an object column holds: a date or time type, one plain Python type, else text."""
    if types and all(issubclass(t, dt.datetime) for t in types):
        return "datetime"
    if types and all(issubclass(t, dt.date) and not issubclass(t, dt.datetime) for t in types):
        return "date"
    if types and all(issubclass(t, dt.time) for t in types):
        return "time"
    if len(types) == 1:
        return _PYTHON.get(next(iter(types)), "str")
    return "str"


def _python_times(name: str, kind: str, series: Any, missing: np.ndarray, where: Where) -> Column:
    """An object column of Python dates, times or datetimes (aware ones: in the first one's zone)."""
    values = np.full(len(series), np.nan)
    tz = None
    for i, v in enumerate(series.tolist()):
        if missing[i]:
            continue
        if kind == "date":
            values[i] = v.toordinal() - datetimes.EPOCH_DAY
        elif kind == "time":
            values[i] = v.hour * 3600 + v.minute * 60 + v.second + v.microsecond / 1e6
        else:
            if v.tzinfo is not None:
                tz = tz or _zone_name(v)
                v = v.astimezone(datetimes.zone(tz)).replace(tzinfo=None)
            values[i] = (v - datetimes.EPOCH).total_seconds()
    return _dated(name, kind, values, where, tz=tz)


def _zone_name(moment: dt.datetime) -> str:
    """An aware datetime's zone: its tz database name where it has one, else its offset (+01:00)."""
    key = getattr(moment.tzinfo, "key", None) or getattr(moment.tzinfo, "zone", None)  # zoneinfo, pytz
    if key:
        return str(key)
    offset = moment.utcoffset() or dt.timedelta(0)
    minutes = int(abs(offset).total_seconds()) // 60
    return f"{'-' if offset < dt.timedelta(0) else '+'}{minutes // 60:02d}:{minutes % 60:02d}"


def _dated(name: str, kind: str, values: np.ndarray, where: Where, tz: str | None) -> Column:
    """A date or time column of numbers, written in ISO form at its resolution."""
    step = datetimes.resolution(kind, values)
    decimals = 0 if step >= 1 else min(datetimes.MAX_DECIMALS, round(-np.log10(step)))
    fmt = datetimes.default_format(kind)
    return number_column(name, kind, values, where, fmt=fmt, decimals=decimals, tz=tz, step=step)


def _decimals(values: np.ndarray) -> int | None:
    """The fewest decimals (at most MAX_DECIMALS) that write every value of a float column exactly, as
    a CSV file's are counted; None when none do (computed values: written in full)."""
    v = values[np.isfinite(values)]
    for d in range(MAX_DECIMALS + 1):
        if np.all(np.abs(np.round(v, d) - v) <= 1e-9 * np.maximum(1.0, np.abs(v))):
            return d
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else str(value)


def _json(value: Any) -> Any:
    """A category as JSON holds it (numbers and text; anything else as its text)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, bool | int | float | str) else str(value)


# ---- back to a DataFrame ----------------------------------------------------------------------------


def frame_from_table(table: Table, records: dict[str, dict[str, Any]] | None = None) -> Any:
    """``table`` as a DataFrame, each column with the dtype its record names (``table_from_frame``'s);
    a column without one (a run trained on a file) gets the usual dtype of its type: float64, int64
    (Int64 with missing values), bool (boolean), object text, datetime64 for dates and datetimes (with
    the zone) and ``datetime.time`` objects for times."""
    pd = pandas()
    return pd.DataFrame({c.name: _series(pd, c, (records or {}).get(c.name)) for c in table.columns})


def _series(pd: Any, c: Column, record: dict[str, Any] | None) -> Any:
    record = record or {"dtype": _default_dtype(c), **({"elements": "time"} if c.type == "time" else {})}
    dtype, missing = record["dtype"], c.missing
    if "categories" in record:
        by_text = {str(v): v for v in record["categories"]}
        values = [None if v is None else by_text.get(str(v), v) for v in _labels(c)]
        return pd.Series(pd.Categorical(values, categories=record["categories"], ordered=record["ordered"]))
    elements = record.get("elements")
    if elements in datetimes.TYPES:
        return pd.Series(_python_values(c, elements), dtype=object)
    if elements in ("bool", "int", "float"):  # an object column of Python numbers or booleans
        cast = {"bool": bool, "int": int, "float": float}[elements]
        return pd.Series(
            [None if m else cast(v) for v, m in zip(c.values, missing, strict=True)], dtype=object
        )
    if elements == "str" or c.type == "categorical":
        return pd.Series(_labels(c), dtype=dtype)
    if dtype.startswith("datetime64"):
        return _datetimes(pd, c, record)
    if missing.any() and dtype in ("bool", *_INTS):  # (a run that saw none never samples a missing value)
        dtype = "boolean" if dtype == "bool" else dtype.capitalize().replace("Uint", "UInt")
    if pd.api.types.is_extension_array_dtype(pd.api.types.pandas_dtype(dtype)):
        values = [pd.NA if m else v for v, m in zip(c.values.tolist(), missing, strict=True)]
        return pd.Series(
            pd.array(values, dtype="boolean" if c.type == "boolean" else "Float64").astype(dtype)
        )
    return pd.Series(c.values.astype(dtype))


def _labels(c: Column) -> list[str | None]:
    """The column as text, as a file of it holds it (None where missing)."""
    return [None if m else t for t, m in zip(format_column(c), c.missing, strict=True)]


def _default_dtype(c: Column) -> str:
    missing = bool(c.missing.any())
    if c.type == "integer":
        return "Int64" if missing else "int64"
    if c.type == "boolean":
        return "boolean" if missing else "bool"
    if c.type in ("date", "datetime"):
        return "datetime64[us]" if c.tz is None else f"datetime64[us, {c.tz}]"
    return "float64" if c.type == "continuous" else "object"


def _python_values(c: Column, kind: str) -> list[Any]:
    zone = datetimes.zone(c.tz) if kind == "datetime" and c.tz is not None else None
    out: list[Any] = []
    for v in c.values.tolist():
        moment = None if v != v else datetimes.as_python(kind, v)
        if zone is not None and isinstance(moment, dt.datetime):
            moment = moment.replace(tzinfo=zone)
        out.append(moment)
    return out


def _datetimes(pd: Any, c: Column, record: dict[str, Any]) -> Any:
    """Wall-clock seconds back to datetime64 values in the record's unit and zone."""
    missing = np.isnan(c.values)
    seconds = c.values * datetimes.DAY if c.type == "date" else c.values  # (a run trained on a file)
    stamps = np.round(np.nan_to_num(seconds) * 1e6).astype(np.int64).astype("datetime64[us]")
    stamps[missing] = np.datetime64("NaT")
    series = pd.Series(stamps)
    tz = record.get("tz") or c.tz
    if tz is not None:  # a wall time that happens twice: the first of the two
        first = np.ones(len(series), dtype=bool)
        zone = tz if datetimes.fixed_offset(tz) is None else datetimes.zone(tz)
        series = series.dt.tz_localize(zone, ambiguous=first, nonexistent="shift_forward")
    unit = re.match(r"datetime64\[(\w+)", record["dtype"])
    return series.dt.as_unit(unit.group(1)) if unit else series
