"""Constraints between a table's columns (``data.constraints``), kept by every sampled row.

Declared as short rules, one a string (the config's list, ``;`` between them on the command line):

| rule | kind | enforced by |
|---|---|---|
| ``price > 0``, ``0 <= carat <= 5``, ``depth < 80`` | range (positivity) | clipping to the bounds |
| ``start <= end`` (two columns) | inequality | ``end`` learned as ``end − start`` >= 0 |
| ``total = a + b + c`` | sum | ``total`` not learned: written as the sum of its parts |
| ``fixed(city, country)`` | fixed combinations | the columns learned as one categorical column |

The transform (``table_transform``) applies them to the rows it learns (``apply``: an inequality's
upper column becomes the non-negative difference, a sum's total is left out, fixed columns become one
column of the combinations seen) and undoes that on decoding (``restore``), so that a sampled row
keeps each rule by construction. An inequality or sum over columns with missing values cannot be
built in that way: it is kept by rejection instead (``violations``: sampled rows that break a rule
are drawn again, and the share rejected is reported); rows where one of its values is missing keep
it trivially. The training rows must keep every rule (a DataError names the first that does not).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .datetimes import round_to
from .tables import Column, Table

NUMBERS = ("continuous", "integer")
ORDERED = ("continuous", "integer", "date", "datetime", "time")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")
_FIXED = re.compile(r"fixed\s*\((.*)\)\Z", re.IGNORECASE)
_MISSING = "\x00"  # a missing member of a fixed combination, in the combined column's values
EXAMPLES = "'price >= 0', '0 <= carat <= 5', 'start <= end', 'total = a + b', 'fixed(city, country)'"


def _number(text: str) -> float | None:
    return float(text) if _NUMBER.match(text.strip()) else None


def parse(rule: str) -> dict[str, Any]:
    """One declared rule as a dict (columns not yet checked); a ConfigError when it cannot be read."""
    text = str(rule).strip()
    fixed = _FIXED.match(text)
    if fixed:
        names = [n.strip() for n in fixed.group(1).split(",") if n.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"data.constraints: '{text}' needs two or more different columns")
        return {"kind": "fixed", "columns": names, "rule": text}
    if "=" in text and not re.search(r"[<>]", text):
        total, _, rest = text.partition("=")
        parts = [p.strip() for p in rest.lstrip("=").split("+")]
        if not total.strip() or len(parts) < 2 or not all(parts):
            raise ConfigError(f"data.constraints: '{text}' is not a sum 'total = a + b' of two or more parts")
        return {"kind": "sum", "total": total.strip(), "parts": parts, "rule": text}
    pieces = [p.strip() for p in re.split(r"(<=|>=|<|>)", text)]
    if len(pieces) not in (3, 5) or not all(pieces):
        raise ConfigError(f"data.constraints: cannot read '{text}'; expected rules such as {EXAMPLES}")
    ops = pieces[1::2]
    if len(ops) == 2 and ops[0][0] != ops[1][0]:
        raise ConfigError(f"data.constraints: '{text}' mixes < and >; write 'low <= column <= high'")
    if ops[0].startswith(">"):  # a >= b is b <= a
        pieces = pieces[::-1]
        ops = ["<" + op[1:] for op in pieces[1::2]]
    terms = pieces[::2]
    numbers = [_number(t) for t in terms]
    if len(terms) == 2 and numbers == [None, None]:
        if ops[0] == "<":
            raise ConfigError(f"data.constraints: '{text}': an inequality between columns is '<=' (or '>=')")
        return {"kind": "inequality", "low": terms[0], "high": terms[1], "rule": text}
    columns = [t for t, v in zip(terms, numbers, strict=True) if v is None]
    if len(columns) != 1 or (len(terms) == 3 and numbers[1] is not None):
        raise ConfigError(f"data.constraints: cannot read '{text}'; expected rules such as {EXAMPLES}")
    at = terms.index(columns[0])
    out: dict[str, Any] = {"kind": "range", "column": columns[0], "rule": text,
                           "low": None, "high": None, "low_strict": False, "high_strict": False}  # fmt: skip
    if at > 0:
        out.update(low=numbers[at - 1], low_strict=ops[at - 1] == "<")
    if at < len(terms) - 1:
        out.update(high=numbers[at + 1], high_strict=ops[at] == "<")
    if out["low"] is not None and out["high"] is not None and out["low"] > out["high"]:
        raise ConfigError(f"data.constraints: '{text}': the lower bound is above the upper one")
    return out


def _columns_of(rule: dict[str, Any]) -> list[str]:
    kind = rule["kind"]
    if kind == "range":
        return [rule["column"]]
    if kind == "inequality":
        return [rule["low"], rule["high"]]
    if kind == "sum":
        return [rule["total"], *rule["parts"]]
    return list(rule["columns"])


def _targets(rule: dict[str, Any]) -> list[str]:
    """The columns a rule built into the transform writes on decoding."""
    if rule.get("by") != "transform":
        return []
    return {"inequality": [rule.get("high")], "sum": [rule.get("total")]}.get(
        rule["kind"], rule.get("columns", [])
    )


def _check_types(rule: dict[str, Any], table: Table) -> None:
    types = {name: table.column(name).type for name in _columns_of(rule)}
    text, kind = rule["rule"], rule["kind"]
    wanted = {"range": NUMBERS, "sum": NUMBERS, "inequality": ORDERED, "fixed": ("categorical",)}[kind]
    for name, t in types.items():
        if t not in wanted:
            raise ConfigError(
                f"data.constraints: '{text}': column '{name}' is {t}; a {kind} rule takes "
                f"{' or '.join(wanted)} columns (declare the type with data.columns)"
            )
    if kind == "inequality":
        a, b = (table.column(rule["low"]), table.column(rule["high"]))
        same = a.type == b.type or (a.type in NUMBERS and b.type in NUMBERS)
        if not same or a.tz != b.tz:
            raise ConfigError(f"data.constraints: '{text}' compares a {a.type} column with a {b.type} one"
                              + (" of another time zone" if same else ""))  # fmt: skip
    if kind == "sum" and types[rule["total"]] == "integer" and any(t != "integer" for t in types.values()):
        raise ConfigError(f"data.constraints: '{text}': an integer total needs integer parts")


def check(rules: list[str], table: Table) -> list[dict[str, Any]]:
    """The declared ``rules`` read and checked against ``table`` (the training file's columns, without a
    condition column): each rule's columns exist and have a type it takes, no column is written by two
    rules, and every row keeps every rule. Returns the rules as JSON, each with ``by`` (``transform`` or
    ``rejection``)."""
    out: list[dict[str, Any]] = []
    written: dict[str, str] = {}
    for text in rules:
        rule = parse(text)
        for name in _columns_of(rule):
            if name not in table.names:
                close = difflib.get_close_matches(name, table.names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (columns: {', '.join(table.names)})"
                raise ConfigError(f"data.constraints: '{rule['rule']}' names '{name}', not a column{hint}")
        _check_types(rule, table)
        missing = any(table.column(n).missing.any() for n in _columns_of(rule))
        rule["by"] = "rejection" if missing and rule["kind"] in ("inequality", "sum") else "transform"
        if rule["kind"] == "fixed":
            rule["combinations"] = sorted(set(_keys(table, rule["columns"])))
        for name in _targets(rule):
            if name in written:
                raise ConfigError(
                    f"data.constraints: column '{name}' is written by both '{written[name]}' and '{text}'"
                )
            written[name] = rule["rule"]
        out.append(rule)
    _order(out)  # a cycle is a ConfigError now, not at sampling
    bad = violations(table, out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f"line {table.lines[i]}" if table.lines else f"row {i + 1}"
        broken = next(r["rule"] for r in out if _broken(table, r)[i])
        raise DataError(
            f"{table.source}: {int(bad.sum())} row(s) break the declared constraints, the first at {where} "
            f"('{broken}'); fix those rows or the rule"
        )
    return out


def _order(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules built into the transform, each after those that write the columns it reads."""
    pending = [r for r in rules if r["by"] == "transform" and r["kind"] != "range"]
    done: list[dict[str, Any]] = []
    while pending:
        writes = {name for r in pending for name in _targets(r)}
        ready = [r for r in pending if not (set(_columns_of(r)) - set(_targets(r))) & writes]
        if not ready:
            raise ConfigError(f"data.constraints: the rules {', '.join(repr(r['rule']) for r in pending)} "
                              "depend on each other in a cycle")  # fmt: skip
        done += ready
        pending = [r for r in pending if r not in ready]
    return done


def schema(table: Table) -> list[dict[str, Any]]:
    """The columns of the file as read (``read_table``'s ``schema``), before the rules change them."""
    out = []
    for c in table.columns:
        spec: dict[str, Any] = {"name": c.name, "type": c.type, "decimals": c.decimals}
        if c.type == "categorical":
            spec["categories"] = sorted({v for v in c.values if v is not None})
        elif c.type == "boolean":
            spec["tokens"] = list(c.tokens)
        elif c.type not in NUMBERS:
            spec.update(fmt=c.fmt, tz=c.tz, step=c.step)
        out.append(spec)
    return out


def _keys(table: Table, names: list[str]) -> list[str]:
    """Each row's values of the columns ``names``, as one JSON text."""
    values = zip(*(table.column(n).values for n in names), strict=True)
    return [json.dumps([_MISSING if v is None else v for v in row]) for row in values]


def combined_name(rule: dict[str, Any], names: list[str]) -> str:
    name = "+".join(rule["columns"])
    while name in names:
        name += "+"
    return name


def apply(table: Table, rules: list[dict[str, Any]]) -> Table:
    """The columns the transform learns: an inequality's upper column as its difference from the lower
    one, a sum without its total, fixed combinations as one categorical column (in the first's place)."""
    if not rules:
        return table
    columns = {c.name: c for c in table.columns}
    order = list(table.names)
    for rule in _order(rules):
        kind = rule["kind"]
        if kind == "inequality":
            a, b = table.column(rule["low"]), table.column(rule["high"])
            dtype = "integer" if a.type == b.type and a.type in ("integer", "date") else "continuous"
            decimals = _decimals(a, b) if dtype == "continuous" and a.type in NUMBERS else None
            columns[b.name] = Column(b.name, dtype, b.values - a.values, decimals=decimals)
        elif kind == "sum":
            order.remove(rule["total"])
        else:
            members = [table.column(n) for n in rule["columns"]]
            keys = _keys(table, rule["columns"])
            name = combined_name(rule, order)
            columns[name] = Column(name, "categorical", np.array(keys, dtype=object))
            order[order.index(members[0].name)] = name
            for m in members[1:]:
                order.remove(m.name)
    return Table([columns[n] for n in order], table.source, table.lines)


def _decimals(*cols: Column) -> int | None:
    decimals = [c.decimals for c in cols if c.type == "continuous"]
    known = [d for d in decimals if d is not None]
    return None if len(known) < len(decimals) else max(known, default=0)


def restore(table: Table, rules: list[dict[str, Any]], specs: list[dict[str, Any]]) -> Table:
    """Decoded columns back to the file's (``specs``: ``schema``'s), in the file's order: the rules'
    written columns computed from the others, and every range clipped to its bounds."""
    if not rules:
        return table
    columns = {c.name: c for c in table.columns}
    by_name = {s["name"]: s for s in specs}
    for rule in _order(rules):
        if rule["kind"] == "fixed":
            name = combined_name(rule, [s["name"] for s in specs])
            rows = [json.loads(v) for v in columns.pop(name).values]
            for j, member in enumerate(rule["columns"]):
                values = [None if row[j] == _MISSING else row[j] for row in rows]
                columns[member] = Column(member, "categorical", np.array(values, dtype=object))
            continue
        if rule["kind"] == "inequality":
            target, values = rule["high"], columns[rule["low"]].values + columns[rule["high"]].values
        else:
            target, values = rule["total"], np.sum([columns[p].values for p in rule["parts"]], axis=0)
        spec = by_name[target]
        columns[target] = _written(spec, np.asarray(values, dtype=np.float64), rule, columns)
    for rule in rules:
        if rule["kind"] == "range" and rule["column"] in columns:
            c = columns[rule["column"]]
            columns[c.name] = replace(c, values=clip(c, rule))
    return Table([columns[s["name"]] for s in specs if s["name"] in columns], table.source, table.lines)


def _written(
    spec: dict[str, Any], values: np.ndarray, rule: dict[str, Any], columns: dict[str, Column]
) -> Column:
    """A computed column rounded as its type is written (decimals: enough for the exact sum)."""
    kind = spec["type"]
    decimals = spec.get("decimals")
    if kind in ("integer", "date"):
        values = np.round(values)
    elif kind == "continuous":
        inputs = [columns[n] for n in _columns_of(rule) if n != spec["name"]]
        decimals = _decimals(Column(spec["name"], kind, values, decimals=decimals), *inputs)
        values = values if decimals is None else np.round(values, decimals)
    else:
        values = round_to(values, spec.get("step"))
    written = {k: spec[k] for k in ("fmt", "tz", "step") if spec.get(k) is not None}
    return Column(spec["name"], kind, values, decimals=decimals, **written)


def clip(column: Column, rule: dict[str, Any]) -> np.ndarray:
    """A range rule's column clipped to its bounds; a strict bound moves to the next written value."""
    values = column.values.copy()
    unit = _unit(column)
    for bound, strict, sign in (
        (rule["low"], rule["low_strict"], 1),
        (rule["high"], rule["high_strict"], -1),
    ):
        if bound is None:
            continue
        edge = bound + sign * unit if strict else bound
        if column.type == "integer":
            edge = np.ceil(edge) if sign > 0 else np.floor(edge)
        values = np.where(sign * (values - edge) < 0, edge, values)  # NaN stays NaN
    return values


def _unit(column: Column) -> float:
    """The smallest step between two written values of a column."""
    if column.type == "integer":
        return 1.0
    if column.decimals is not None:
        return 10.0**-column.decimals
    return 1e-9


def _broken(table: Table, rule: dict[str, Any]) -> np.ndarray:
    """The rows that break ``rule`` (a row with a missing value of it keeps it)."""
    kind = rule["kind"]
    if kind == "fixed":  # only the combinations of the training rows
        seen = set(rule.get("combinations", []))
        return np.array([k not in seen for k in _keys(table, rule["columns"])], dtype=bool)
    values = [table.column(n).values.astype(np.float64) for n in _columns_of(rule)]
    with np.errstate(invalid="ignore"):
        if kind == "range":
            (x,) = values
            bad = np.zeros(len(x), dtype=bool)
            if rule["low"] is not None:
                bad |= (x <= rule["low"]) if rule["low_strict"] else (x < rule["low"])
            if rule["high"] is not None:
                bad |= (x >= rule["high"]) if rule["high_strict"] else (x > rule["high"])
            return bad & ~np.isnan(x)
        if kind == "inequality":
            a, b = values
            return a > b
        total, parts = values[0], np.sum(values[1:], axis=0)
        decimals = _decimals(*(table.column(n) for n in _columns_of(rule)))
        tolerance = (0.5 * 10.0**-decimals if decimals is not None else 0.0) + 1e-9 * np.abs(parts)
        return np.abs(total - parts) > tolerance


def violations(table: Table, rules: list[dict[str, Any]]) -> np.ndarray:
    """The rows of ``table`` (the file's columns) that break one of ``rules``."""
    bad = np.zeros(len(table), dtype=bool)
    for rule in rules:
        if all(n in table.names for n in _columns_of(rule)):
            bad |= _broken(table, rule)
    return bad


__all__ = ["apply", "check", "parse", "restore", "schema", "violations"]
