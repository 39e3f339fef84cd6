"""Tables: read a CSV (or Parquet) file into typed columns, infer the column types, write rows back.

Read with the standard library's ``csv`` module and NumPy (no pandas; a pandas DataFrame's columns go
through the same typed-column code, ``text_column``, in ``data/frames.py``). Every column gets one of
these types, inferred from its values or declared in the config (``data.columns``):

- ``continuous``: numbers (``1.5``, ``-2e-3``), kept as float64;
- ``integer``: whole numbers written without a decimal point (``42``); values with leading zeros
  (``007``) are codes, so such a column is inferred categorical;
- ``boolean``: ``true``/``false`` or ``yes``/``no`` in any case; declared booleans also accept
  ``t``/``f``, ``y``/``n`` and ``1``/``0``;
- ``date``, ``datetime``, ``time`` (of day): ISO-looking text (``2012-01-31``, ``2012/01/31``,
  ``2012-01-31T08:30:00+01:00``, ``08:30``), kept as numbers (``data/datetimes.py``) and written back
  in the column's format;
- ``categorical``: anything else, kept as strings.

A column can also be declared ``drop`` (not modelled, not written back). Missing values are the
empty field, pandas' usual markers (``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ...) and ``?`` (the
UCI repository's): they stay missing (NaN or None) and the transform gives them an explicit
indicator; nothing is filled silently.

The delimiter of a CSV file is detected from its first lines (``,``, ``;``, tab or ``|``; ``.tsv``
and ``.tab`` files are tab-separated).
"""

from __future__ import annotations

import csv
import difflib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from . import datetimes
from .dataset import check_text_file

MAX_CSV_COLUMNS = 10_000

TYPES = ("continuous", "integer", "categorical", "boolean", *datetimes.TYPES)
# the types held as numbers (float64, NaN for missing) and learned as numbers by the transforms
NUMERIC_TYPES = ("continuous", "integer", *datetimes.TYPES)
# what `data.columns` may say, with the usual spellings of the same types
TYPE_NAMES = {
    **{t: t for t in TYPES},
    "float": "continuous",
    "numeric": "continuous",
    "real": "continuous",
    "int": "integer",
    "category": "categorical",
    "cat": "categorical",
    "string": "categorical",
    "str": "categorical",
    "bool": "boolean",
    "timestamp": "datetime",
    "datetime64": "datetime",
    "time_of_day": "time",
    "drop": "drop",
    "ignore": "drop",
    # a unique key: not modelled, fresh keys in sampled rows (data/identifiers.py)
    "identifier": "identifier",
    "id": "identifier",
    "key": "identifier",
}
# pandas' default NA markers, so that a file means the same here as in pandas
MISSING_TOKENS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>"]
)
MISSING_TOKENS |= {"N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
MISSING_TOKENS |= {"?"}  # the UCI machine-learning repository's marker (adult, mushroom, ...)
DELIMITERS = ",;\t|"  # what a CSV file's delimiter may be
SNIFF_BYTES = 64 * 1024  # the start of the file the delimiter is detected from
_INFERRED_BOOLEANS = ({"true", "false"}, {"yes", "no"})
_DECLARED_BOOLEANS = {"true": 1, "false": 0, "yes": 1, "no": 0, "t": 1, "f": 0, "y": 1, "n": 0}
_DECLARED_BOOLEANS.update({"1": 1, "0": 0})
_INT = re.compile(r"[+-]?\d+\Z")
_CODE = re.compile(r"[+-]?0\d")  # a leading zero: an identifier or code, not a number
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")
MAX_DECIMALS = 12
# an inferred text column with more distinct values than this, all different, is almost surely an
# identifier (data/identifiers.py), whose one-hot encoding would be as wide as the table is long
MAX_INFERRED_CATEGORIES = 100
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".parquet")


def table_path(spec: str) -> Path | None:
    """The file a ``data.name`` denotes when it is a table (``csv:PATH``, ``parquet:PATH`` or a path
    ending in .csv/.tsv/.parquet), else None."""
    for prefix in ("csv:", "parquet:"):
        if spec.startswith(prefix):
            return Path(spec[len(prefix) :]).expanduser()
    path = Path(spec).expanduser()
    return path if path.suffix.lower() in TABLE_SUFFIXES else None


@dataclass
class Column:
    """One typed column. ``values``: float64 with NaN for missing (continuous, integer; boolean as
    0/1; dates, datetimes and times as numbers, see ``data/datetimes.py``), or an object array of
    ``str`` with ``None`` for missing (categorical)."""

    name: str
    type: str
    values: np.ndarray
    decimals: int | None = None  # continuous: the most decimals written in the file; times: of a second
    tokens: tuple[str, str] = ("false", "true")  # boolean: how false and true are written
    fmt: str | None = None  # dates and times: the strftime pattern they are written in
    tz: str | None = None  # datetimes: the time zone (an offset as written, or a zone name)
    step: float | None = None  # dates and times: the resolution values are rounded to

    @property
    def missing(self) -> np.ndarray:
        if self.type in ("categorical", "identifier"):
            return np.array([v is None for v in self.values], dtype=bool)
        return np.isnan(self.values)


@dataclass
class Table:
    """Typed columns of equal length; ``source`` names the file in messages."""

    columns: list[Column]
    source: str = "table"
    lines: list[int] = field(default_factory=list)  # the file line of each row (CSV), for messages

    def __len__(self) -> int:
        return len(self.columns[0].values) if self.columns else 0

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def take(self, index: np.ndarray) -> Table:
        """The rows ``index``, in that order."""
        cols = [replace(c, values=c.values[index]) for c in self.columns]
        lines = [self.lines[i] for i in index] if self.lines else []
        return Table(cols, self.source, lines)


def concat(tables: Sequence[Table]) -> Table:
    """The rows of ``tables`` (the same columns) one after another."""
    first = tables[0]
    columns = [replace(c, values=np.concatenate([t.columns[j].values for t in tables]))
               for j, c in enumerate(first.columns)]  # fmt: skip
    return Table(columns, first.source)


# ---- reading ----------------------------------------------------------------------------------------


def sniff_delimiter(path: Path) -> str:
    """The delimiter of a CSV file, detected from its first complete lines (one of ``DELIMITERS``);
    a comma when nothing else fits (a file of one column, say). ``.tsv``/``.tab``: a tab."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            sample = f.read(SNIFF_BYTES)
    except OSError:
        return ","  # _read_csv says why it cannot be read
    if len(sample) == SNIFF_BYTES and "\n" in sample:  # whole lines only
        sample = sample[: sample.rindex("\n")]
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, rows, line number of each row), every field stripped; blank lines are skipped."""
    check_text_file(path, "CSV")
    delimiter = sniff_delimiter(path)
    rows: list[list[str]] = []
    lines: list[int] = []
    header: list[str] | None = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            try:
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    fields = [v.strip() for v in row]
                    if header is None:
                        header = fields
                        if len(header) > MAX_CSV_COLUMNS:
                            raise DataError(
                                f"{path}: has {len(header):,} columns; a CSV table may have at most "
                                f"{MAX_CSV_COLUMNS:,} (each column is typed and transformed on its own): "
                                "save wide numeric data as .npy or .npz"
                            )
                        continue
                    if len(fields) != len(header):
                        raise DataError(
                            f"{path}: line {reader.line_num} has {len(fields)} field(s), expected "
                            f"{len(header)} as in the header"
                        )
                    rows.append(fields)
                    lines.append(reader.line_num)
            except csv.Error as e:
                raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if header is None:
        raise DataError(f"{path}: the file is empty, expected a header row and data rows")
    if not rows:
        raise DataError(f"{path}: has a header but no data rows")
    return header, rows, lines


def _read_parquet(path: Path) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """(header, rows as text, the type each column's Parquet type suggests)."""
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pat
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or save the table as CSV)"
        ) from None
    try:
        arrow = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for every kind of bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if arrow.num_columns == 0:
        raise DataError(f"{path}: the file is empty, expected columns")
    if arrow.num_rows == 0:
        raise DataError(f"{path}: has columns but no data rows")
    suggested: dict[str, str] = {}
    texts: list[list[str]] = []
    for name, col in zip(arrow.column_names, arrow.columns, strict=True):
        kind = col.type
        if pat.is_boolean(kind):
            suggested[name] = "boolean"
        elif pat.is_integer(kind):
            suggested[name] = "integer"
        elif pat.is_floating(kind) or pat.is_decimal(kind):
            suggested[name] = "continuous"
        elif pat.is_string(kind) or pat.is_large_string(kind) or pat.is_dictionary(kind):
            suggested[name] = "categorical"
        else:
            raise DataError(
                f"{path}: column '{name}' has Parquet type {kind}, expected numbers, booleans or strings"
            )
        values = col.to_pylist()
        if suggested[name] == "boolean":
            texts.append(["" if v is None else ("true" if v else "false") for v in values])
        elif suggested[name] == "continuous":
            texts.append(["" if v is None or v != v else repr(float(v)) for v in values])
        else:
            texts.append(["" if v is None else str(v).strip() for v in values])
    return list(arrow.column_names), [list(r) for r in zip(*texts, strict=True)], suggested


def _check_header(header: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for j, name in enumerate(header, start=1):
        if not name:
            raise DataError(f"{path}: column {j} of the header has no name")
        if name in seen:
            raise DataError(
                f"{path}: column name '{name}' appears twice in the header (columns {seen[name]} and {j})"
            )
        seen[name] = j


def declared_types(columns: dict[str, str] | None, header: list[str], path: Path | str) -> dict[str, str]:
    """``data.columns`` checked against the header, with the types' spellings normalised."""
    out: dict[str, str] = {}
    for name, kind in (columns or {}).items():
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"data.columns names '{name}', which is not a column of {path}{hint}")
        normal = TYPE_NAMES.get(str(kind).strip().lower())
        if normal is None:
            raise ConfigError(
                f"data.columns: type '{kind}' of column '{name}' is unknown "
                f"(expected one of: {', '.join(TYPES)}, identifier, drop)"
            )
        out[name] = normal
    return out


def _decimals(tokens: Sequence[str]) -> int:
    """The most digits after the decimal point among ``tokens`` (numbers), at most MAX_DECIMALS."""
    most = 0
    for tok in tokens:
        try:
            exponent = Decimal(tok).as_tuple().exponent
        except InvalidOperation:
            continue
        if isinstance(exponent, int):
            most = max(most, -exponent)
    return min(most, MAX_DECIMALS)


class _Where:
    """Names a row in messages: the file line for CSV, the row number otherwise."""

    def __init__(self, path: Path | str, lines: list[int]) -> None:
        self.path, self.lines = path, lines

    def __call__(self, i: int, name: str) -> str:
        row = f"line {self.lines[i]}" if self.lines else f"row {i + 1}"
        return f"{self.path}: {row}, column '{name}'"


def _infer(name: str, tokens: list[str], present: np.ndarray, where: _Where) -> str:
    values = [tokens[i] for i in np.flatnonzero(present)]
    distinct = set(values)
    lower = {v.lower() for v in distinct}
    if any(lower <= pair for pair in _INFERRED_BOOLEANS):
        return "boolean"
    dated = datetimes.infer(distinct)
    if dated is not None:
        return dated
    numeric = {v for v in distinct if _FLOAT.match(v)}
    if len(numeric) == len(distinct):
        if all(_INT.match(v) for v in distinct):
            return "categorical" if any(_CODE.match(v) for v in distinct) else "integer"
        return "continuous"
    n_numeric = sum(v in numeric for v in values)
    if len(values) >= 10 and n_numeric >= 0.9 * len(values):
        i = next(i for i in np.flatnonzero(present).tolist() if tokens[i] not in numeric)
        raise DataError(
            f"{where(i, name)}: '{tokens[i]}' is not a number, but {n_numeric:,} of the column's "
            f"{len(values):,} values are; fix or blank out the value, or declare the column categorical "
            f"(data.columns: {{{name}: categorical}})"
        )
    if len(distinct) > MAX_INFERRED_CATEGORIES and len(distinct) == len(values) == len(tokens):
        n = len(values)
        print(f"turbovae: note: column '{name}' has {n:,} distinct values in {n:,} rows and "
              "looks like an identifier: sampled rows get fresh keys (declare it categorical to model its "
              "values, or drop)", file=sys.stderr)  # fmt: skip
        return "identifier"
    return "categorical"  # many distinct values: the rarest are pooled (table_transform.MAX_CATEGORIES)


def _boolean_tokens(seen: dict[int, str]) -> tuple[str, str]:
    """How false and true are written: as in the file, the unseen one in the same style."""
    if len(seen) == 2:
        return seen[0], seen[1]
    token = next(iter(seen.values()), "false")
    pairs = {"true": "false", "yes": "no", "t": "f", "y": "n", "1": "0"}
    pairs.update({v: k for k, v in pairs.items()})
    other = pairs[token.lower()]
    if token.isupper() and len(token) > 1:
        other = other.upper()
    elif token[:1].isupper():
        other = other.capitalize()
    return (token, other) if 0 in seen else (other, token)


def _parse(name: str, kind: str, tokens: list[str], present: np.ndarray, where: _Where) -> Column:
    n = len(tokens)
    if kind in ("categorical", "identifier"):
        values = np.empty(n, dtype=object)
        for i in range(n):
            values[i] = tokens[i] if present[i] else None
        return Column(name, kind, values)
    out = np.full(n, np.nan)
    if kind == "boolean":
        seen: dict[int, str] = {}
        for i in np.flatnonzero(present).tolist():
            truth = _DECLARED_BOOLEANS.get(tokens[i].lower())
            if truth is None:
                raise DataError(
                    f"{where(i, name)} (boolean): '{tokens[i]}' is not true/false, yes/no, t/f, y/n or 1/0"
                )
            out[i] = truth
            seen.setdefault(truth, tokens[i])
        return Column(name, kind, out, tokens=_boolean_tokens(seen))
    parsed: dict[str, float] = {}
    for i in np.flatnonzero(present).tolist():
        tok = tokens[i]
        value = parsed.get(tok)
        if value is None:
            if not _FLOAT.match(tok):
                raise DataError(f"{where(i, name)} ({kind}): '{tok}' is not a number")
            value = float(tok)
            if kind == "integer" and not value.is_integer():
                raise DataError(f"{where(i, name)} (integer): '{tok}' is not a whole number")
            if not np.isfinite(value):
                raise DataError(f"{where(i, name)} ({kind}): '{tok}' is too large for a float")
            parsed[tok] = value
        out[i] = value
    decimals = _decimals(list(parsed)) if kind == "continuous" else None
    return Column(name, kind, out, decimals=decimals)


def text_column(
    name: str,
    kind: str | None,
    tokens: list[str],
    where: _Where,
    present: np.ndarray | None = None,
    spec: dict | None = None,
) -> Column:
    """One typed column from its values as text: of the declared ``kind``, else of the type its values
    say. The one place where text becomes typed values, for files and DataFrames alike.

    Args:
        present: Which values are there (default: those that are not a missing-value marker).
        spec: The column's spec in a trained run's schema: a column missing in every row is allowed,
            and dates and times are read in the run's time zone and written in its format.
    """
    n = len(tokens)
    if present is None:
        present = np.fromiter((t not in MISSING_TOKENS for t in tokens), dtype=bool, count=n)
    if not present.any() and spec is None:
        raise _all_missing(name, n, where)
    kind = kind or _infer(name, tokens, present, where)
    if kind in datetimes.TYPES:
        written = {k: spec[k] for k in ("fmt", "decimals", "tz", "step") if k in spec} if spec else {}
        parsed = datetimes.parse(kind, tokens, present, where, name, tz=written.get("tz"))
        return Column(name, kind, **{**parsed, **written})
    return _parse(name, kind, tokens, present, where)


def number_column(name: str, kind: str, values: np.ndarray, where: _Where, **written: object) -> Column:
    """A column whose values are numbers already (a DataFrame's: NaN for missing), checked as a file's
    text is: finite, whole for an integer column, 0/1 for a boolean one. ``written``: a date or time
    column's ``fmt``, ``decimals``, ``tz`` and ``step``."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    if not present.any():
        raise _all_missing(name, len(values), where)
    bad = present & ~np.isfinite(values)
    if kind == "integer":
        bad |= present & (np.round(values) != values)
    elif kind == "boolean":
        bad |= present & (values != 0) & (values != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(i, name)} ({kind}): {float(values[i])!r} is not a finite {kind} value")
    return Column(name, kind, values, **written)  # type: ignore[arg-type]


def _all_missing(name: str, n: int, where: _Where) -> DataError:
    return DataError(
        f"{where.path}: column '{name}' is missing in all {n} rows; remove it or declare it "
        f"'{name}: drop' in data.columns"
    )


def read_table(
    path: str | Path,
    columns: dict[str, str] | None = None,
    schema: Sequence[dict] | None = None,
    fmt: str | None = None,
) -> Table:
    """Read a CSV (``.tsv``: tab-separated) or Parquet file into typed columns.

    Args:
        path: The file.
        columns: Declared types by column name (``data.columns``); the others are inferred.
        schema: A fitted table's column list (``Dataset.meta["table"]["columns"]``): read exactly
            those columns with those types (other columns of the file are ignored), as for
            ``--real`` files scored against a trained run.
        fmt: ``csv`` or ``parquet``; by default Parquet for a ``.parquet`` file, else CSV.

    Raises:
        DataError: The file is missing, empty, ragged, or has a value its column's type cannot hold.
        ConfigError: ``columns`` names a column the file does not have, or an unknown type.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    suggested: dict[str, str] = {}
    if fmt == "parquet" or (fmt is None and path.suffix.lower() == ".parquet"):
        header, rows, suggested = _read_parquet(path)
        lines: list[int] = []
    else:
        header, rows, lines = _read_csv(path)
    _check_header(header, path)
    if schema is not None:
        wanted = {c["name"]: c["type"] for c in schema}
        absent = [name for name in wanted if name not in header]
        if absent:
            raise DataError(
                f"{path}: has no column '{absent[0]}', which the trained run has "
                f"(columns: {', '.join(wanted)})"
            )
        declared = {name: wanted.get(name, "drop") for name in header}
    else:
        declared = {**suggested, **declared_types(columns, header, path)}
    where = _Where(path, lines)
    out: list[Column] = []
    for j, name in enumerate(header):
        kind = declared.get(name)
        if kind == "drop":
            continue
        spec = next((c for c in schema if c["name"] == name), None) if schema is not None else None
        out.append(text_column(name, kind, [row[j] for row in rows], where, spec=spec))
    if not out:
        raise DataError(f"{path}: no columns left to model (all are declared drop)")
    if schema is not None:
        order = {c["name"]: i for i, c in enumerate(schema)}
        out.sort(key=lambda c: order[c.name])
    return Table(out, str(path), lines)


# ---- writing --------------------------------------------------------------------------------------


def format_column(column: Column) -> list[str]:
    """The column's values as they would be written in its source file."""
    values = column.values
    if column.type in datetimes.TYPES:
        return datetimes.format_values(column.type, values, column.fmt, column.decimals, column.tz)
    if column.type in ("categorical", "identifier"):
        return ["" if v is None else str(v) for v in values]
    missing = np.isnan(values)
    if column.type == "integer":
        return ["" if m else str(int(v)) for v, m in zip(values, missing, strict=True)]
    if column.type == "boolean":
        return ["" if m else column.tokens[int(v)] for v, m in zip(values, missing, strict=True)]
    if column.decimals is None:
        return ["" if m else repr(float(v)) for v, m in zip(values, missing, strict=True)]
    d = column.decimals
    rounded = np.round(values, d) + 0.0  # + 0.0 turns -0.0 into 0.0
    return ["" if m else f"{v:.{d}f}" for v, m in zip(rounded, missing, strict=True)]


def write_table(table: Table, path: str | Path) -> Path:
    """Write ``table`` as CSV (or Parquet for a ``.parquet`` path, which needs pyarrow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        return _write_parquet(table, path)
    texts = [format_column(c) for c in table.columns]
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(table.names)
        writer.writerows(zip(*texts, strict=True))
    return path


def _write_parquet(table: Table, path: Path) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: writing Parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or write .csv)"
        ) from None
    arrays = {}
    for c in table.columns:
        if c.type == "categorical":
            arrays[c.name] = pa.array(list(c.values), type=pa.string())
            continue
        if c.type in datetimes.TYPES:  # as text in the column's format (Arrow's date types: not yet)
            arrays[c.name] = pa.array([t or None for t in format_column(c)], type=pa.string())
            continue
        mask = np.isnan(c.values)
        if c.type == "integer":
            arrays[c.name] = pa.array(np.nan_to_num(c.values).astype(np.int64), mask=mask)
        elif c.type == "boolean":
            arrays[c.name] = pa.array(np.nan_to_num(c.values).astype(bool), mask=mask)
        else:
            values = c.values if c.decimals is None else np.round(c.values, c.decimals)
            arrays[c.name] = pa.array(values, mask=mask)
    pq.write_table(pa.table(arrays), path)
    return path


# ---- real data: scikit-learn's tables ---------------------------------------------------------------


def _number_text(column: np.ndarray) -> list[str]:
    if np.all(column == np.round(column)):
        return [str(int(v)) for v in column]
    return [np.format_float_positional(v, trim="-") for v in column]


def export_tables(folder: str | Path) -> list[Path]:
    """Write scikit-learn's shipped tables as CSV: ``wine.csv`` (13 numbers, 2 of them integers, and
    the cultivar), ``breast-cancer.csv`` (30 numbers and the diagnosis, malignant/benign) and
    ``iris.csv`` (4 numbers and the species); the class label is the last column, as a string."""
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, loader, label, classes in (
        ("wine", load_wine, "cultivar", None),
        ("breast-cancer", load_breast_cancer, "diagnosis", ["malignant", "benign"]),
        ("iris", load_iris, "species", None),
    ):
        bunch = loader()
        names = list(classes or bunch.target_names)
        texts = [_number_text(bunch.data[:, j]) for j in range(bunch.data.shape[1])]
        texts.append([str(names[t]) for t in bunch.target])
        path = folder / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([*bunch.feature_names, label])
            writer.writerows(zip(*texts, strict=True))
        written.append(path)
    return written
