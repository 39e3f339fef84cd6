"""Identifier columns: unique keys that are not modelled, and that sampled rows get fresh.

A column declared ``identifier`` (``data.columns: {customer_id: identifier}``; also ``id``, ``key``), or
a text column whose values are all distinct (more than ``tables.MAX_INFERRED_CATEGORIES`` of them: a
note says so), is taken out of the table before the transform, as a condition column is. The transform
keeps only its shape, never a value: whole numbers continue after the largest (``1001, 1002, ...``);
text with a common prefix and a numeric tail continues the tail at its width (``C-000981`` after
``C-000980``); other text gets the common prefix and 16 random hex digits (``user-9f0c...``). So a
sampled key never equals a training key (the first two by construction, the last with probability
about n² / 2⁶⁴).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..errors import DataError
from .tables import Column, Table

_DIGITS = re.compile(r"\d+\Z")


def fit(column: Column, index: int, source: str) -> dict[str, Any]:
    """The spec of an identifier column (its place and the shape of its keys; no values). A DataError
    when its keys are missing or repeated: an identifier is a unique key."""
    keys = [v for v in column.values if v is not None]
    name = f"{source}: identifier column '{column.name}'"
    if len(keys) < len(column.values):
        raise DataError(f"{name} has {len(column.values) - len(keys)} missing key(s); an identifier has a "
                        "key in every row (or declare it categorical)")  # fmt: skip
    if len(set(keys)) < len(keys):
        raise DataError(f"{name} has {len(keys) - len(set(keys))} repeated key(s); an identifier is unique "
                        "(declare it categorical to model its values)")  # fmt: skip
    spec: dict[str, Any] = {"name": column.name, "index": index}
    if all(_DIGITS.match(k.lstrip("+-")) and not (len(k) > 1 and k.startswith("0")) for k in keys):
        return {**spec, "kind": "integer", "start": max(int(k) for k in keys) + 1}
    prefix = os.path.commonprefix(keys)  # noqa: RUF071 - characters are what is meant
    tails = [k[len(prefix) :] for k in keys]
    while prefix and prefix[-1].isdigit():  # the numeric tail starts after the prefix's last non-digit
        prefix = prefix[:-1]
        tails = [k[len(prefix) :] for k in keys]
    if all(_DIGITS.match(t) for t in tails):
        widths = {len(t) for t in tails}
        width = widths.pop() if len(widths) == 1 else 0  # zero-padded to one width, else as they come
        return {
            **spec,
            "kind": "counter",
            "prefix": prefix,
            "width": width,
            "start": max(int(t) for t in tails) + 1,
        }
    return {**spec, "kind": "random", "prefix": prefix}


def split(table: Table) -> tuple[Table, list[dict[str, Any]]]:
    """``table`` without its identifier columns, and their specs."""
    specs = [fit(c, j, table.source) for j, c in enumerate(table.columns) if c.type == "identifier"]
    if not specs:
        return table, []
    kept = [c for c in table.columns if c.type != "identifier"]
    return Table(kept, table.source, table.lines), specs


def fresh(spec: dict[str, Any], n: int, rng: np.random.Generator) -> Column:
    """``n`` fresh keys of an identifier column, none of them a training key."""
    if spec["kind"] == "integer":
        return Column(spec["name"], "integer", spec["start"] + np.arange(n, dtype=np.float64))
    if spec["kind"] == "counter":
        width = spec["width"]
        keys = [f"{spec['prefix']}{spec['start'] + i:0{width}d}" for i in range(n)]
    else:
        digits = rng.integers(0, 2**63, size=n, dtype=np.int64)
        keys = [f"{spec['prefix']}{d:016x}" for d in digits]
    return Column(spec["name"], "categorical", np.array(keys, dtype=object))


def attach(table: Table, specs: list[dict[str, Any]], seed: int = 0) -> Table:
    """Sampled rows with fresh keys in their identifier columns, each at its place."""
    if not specs:
        return table
    rng = np.random.default_rng(seed)
    columns = list(table.columns)
    for spec in sorted(specs, key=lambda s: s["index"]):
        columns.insert(min(spec["index"], len(columns)), fresh(spec, len(table), rng))
    return Table(columns, table.source, table.lines)


__all__ = ["attach", "fit", "fresh", "split"]
