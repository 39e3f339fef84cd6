"""From typed table columns to the float vectors a VAE trains on, and back.

Fitted on the training split, saved as JSON in ``Dataset.meta["table"]`` (and so in every checkpoint):

- continuous and integer columns (and dates, datetimes and times of day, as numbers: days since the
  epoch, seconds since the epoch on the column's wall clock, seconds since midnight): mode-specific
  normalisation (``mode``, TVAE's): a Dirichlet-process Gaussian mixture per column (at most 10
  modes, those of weight > 0.005 kept); a value becomes its most likely mode k (one-hot) and
  (x − μ_k) / (4 σ_k). Or ``quantile``: Φ⁻¹ of the value's place in the training distribution
  (piecewise linear between at most 1,000 knots);
- categorical and boolean columns: one-hot;
- a numeric column with missing values gets a [present, missing] indicator block; its value and mode
  dims are then not scored on missing rows (the likelihood gates them), and decoding writes the value
  missing. Categorical and boolean columns carry missing as one more category.

``layout`` tells the likelihood which dims are Gaussian (``continuous``, with their ``gate``: the dim
that says the value is missing, or −1) and which are one-hot ``blocks`` ([start, size, gate]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import constraints as rules_of
from . import identifiers
from .arrays import split_indices
from .dataset import Dataset
from .datetimes import round_to
from .mixture import fit_dp_mixtures
from .tables import NUMERIC_TYPES, Column, Table, read_table, table_path

METHODS = ("mode", "quantile", "bounds")
STD_MULTIPLIER = 4.0  # TVAE's: a mode's values land in [−1, 1] with 99.99% probability
MAX_MODES = 10
WEIGHT_THRESHOLD = 0.005
QUANTILE_KNOTS = 1000
# the mixtures of a column with more training values are fitted on this many drawn at random (a fixed
# seed): a 1,000,000-row table fits them in seconds, as a 20,000-row one does
MIXTURE_ROWS = 20_000
# a categorical column with more categories keeps the MAX_CATEGORIES − 1 most frequent and pools the
# others into one "rare" slot, drawn back from their frequencies: the one-hot stays this wide
MAX_CATEGORIES = 100
FORMAT_VERSION = 1


def _numeric_train(column: Column, train: np.ndarray) -> np.ndarray:
    values = column.values[train]
    values = values[~np.isnan(values)]
    if len(values) == 0:
        raise DataError(f"column '{column.name}' has no values in the training split; drop it or add data")
    return values


def _quantile_knots(values: np.ndarray) -> dict[str, list[float]]:
    unique, counts = np.unique(values, return_counts=True)
    n = len(values)
    if len(unique) <= QUANTILE_KNOTS:
        knots, probs = unique, (np.cumsum(counts) - counts / 2) / n  # mid-ranks: strictly increasing
    else:
        q = (np.arange(QUANTILE_KNOTS) + 0.5) / QUANTILE_KNOTS
        knots = np.concatenate([[unique[0]], np.quantile(values, q), [unique[-1]]])
        probs = np.concatenate([[0.5 / n], q, [1 - 0.5 / n]])
        knots, first = np.unique(knots, return_index=True)
        probs = probs[first]
    return {"values": knots.tolist(), "probs": probs.tolist()}


def fit_transform(
    table: Table,
    train: np.ndarray,
    method: str = "mode",
    bounds: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The transform of ``table`` (JSON-serialisable), its statistics fitted on the rows ``train``.

    Category sets and whether a column has missing values are read from all rows (they describe the
    file); mixtures, quantiles and value ranges from the training rows only.

    The vector puts the Gaussian dims first (one per numeric column) and then every one-hot block,
    ordered by size, so that the likelihood reads them as slices and equal-sized runs of blocks
    rather than by gathering dims one by one. Each column's spec says where its parts are:
    ``value`` (a dim), ``mode_dims`` / ``indicator`` / ``onehot`` ([start, size]).

    ``bounds`` (method ``bounds``, differentially private runs): a number's range, declared (not read
    from the rows); a value becomes its place in the range scaled to [−1, 1]. Columns without declared
    bounds take the training rows' range.
    """
    if method not in METHODS:
        raise ConfigError(f"data.continuous_transform must be one of: {', '.join(METHODS)}; got '{method}'")
    numeric = [c for c in table.columns if c.type in NUMERIC_TYPES]
    train_values = {c.name: _numeric_train(c, train) for c in numeric}
    mixtures: dict[str, dict[str, list[float]]] = {}
    if method == "mode" and numeric:
        rng = np.random.default_rng(0)
        drawn = [v if len(v) <= MIXTURE_ROWS else rng.choice(v, MIXTURE_ROWS, replace=False)
                 for v in (train_values[c.name] for c in numeric)]  # fmt: skip
        fitted = fit_dp_mixtures(drawn, max_components=MAX_MODES)
        for c, mix in zip(numeric, fitted, strict=True):
            keep = np.asarray(mix["weights"]) > WEIGHT_THRESHOLD
            mixtures[c.name] = {k: np.asarray(v)[keep].tolist() for k, v in mix.items()}
    specs: list[dict[str, Any]] = []
    blocks: list[tuple[int, dict[str, Any], str]] = []  # (size, the column's spec, which part)
    for c in table.columns:
        spec: dict[str, Any] = {"name": c.name, "type": c.type, "missing": bool(c.missing.any())}
        if c.type in NUMERIC_TYPES:
            values = train_values[c.name]
            low, high = (bounds or {}).get(c.name, (float(values.min()), float(values.max())))
            spec.update(min=float(low), max=float(high), transform=method)
            if c.type == "continuous":
                spec["decimals"] = c.decimals
            elif c.type != "integer":  # dates and times: how they are written, and their resolution
                spec.update(fmt=c.fmt, decimals=c.decimals, tz=c.tz, step=c.step)
            spec["value"] = sum(s["type"] in NUMERIC_TYPES for s in specs)
            if method == "mode":
                spec["modes"] = mixtures[c.name]
                blocks.append((len(spec["modes"]["weights"]), spec, "mode_dims"))
            elif method == "quantile":
                spec["quantiles"] = _quantile_knots(values)
            if spec["missing"]:
                blocks.append((2, spec, "indicator"))  # [present, missing]
        else:
            if c.type == "categorical":
                spec.update(_categories(c))
            else:
                spec["tokens"] = list(c.tokens)
            size = (
                len(spec.get("categories", (0, 1))) + ("rare" in spec) + spec["missing"]
            )  # missing: the last
            blocks.append((size, spec, "onehot"))
        specs.append(spec)
    start = len(numeric)
    for size, spec, part in sorted(blocks, key=lambda b: b[0]):  # stable: column order within a size
        spec[part] = [start, size]
        start += size

    def gate(spec: dict[str, Any]) -> int:
        return spec["indicator"][0] + 1 if "indicator" in spec else -1  # the "missing" slot

    numeric_specs = [s for s in specs if "value" in s]
    layout = {
        "dims": start,
        "continuous": [s["value"] for s in numeric_specs],
        "continuous_gate": [gate(s) for s in numeric_specs],
        "blocks": [
            [spec[part][0], size, gate(spec) if part == "mode_dims" else -1]
            for size, spec, part in sorted(blocks, key=lambda b: b[0])
        ],
    }
    return {"version": FORMAT_VERSION, "method": method, "columns": specs, "layout": layout}


def _categories(c: Column) -> dict[str, Any]:
    """A categorical column's categories (sorted), the rarest pooled beyond MAX_CATEGORIES: ``rare``
    holds their values and counts, from which decoding draws."""
    values, counts = np.unique(
        np.array([v for v in c.values if v is not None], dtype=object), return_counts=True
    )
    if len(values) <= MAX_CATEGORIES:
        return {"categories": values.tolist()}
    order = np.argsort(-counts, kind="stable")
    kept, pooled = np.sort(order[: MAX_CATEGORIES - 1]), np.sort(order[MAX_CATEGORIES - 1 :])
    rare = {"values": values[pooled].tolist(), "counts": counts[pooled].tolist()}
    return {"categories": values[kept].tolist(), "rare": rare}


def _mode_assign(x: np.ndarray, modes: dict[str, list[float]]) -> np.ndarray:
    """The most likely mode of every value: argmax_k log w_k + log N(x; μ_k, σ_k)."""
    w, mu, sd = (np.asarray(modes[k]) for k in ("weights", "means", "stds"))
    log_p = np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2
    return log_p.argmax(1)


def _codes(c: Column, spec: dict[str, Any], source: str) -> np.ndarray:
    """Category index of every value of a categorical/boolean column; missing is the last."""
    if spec["type"] == "categorical":
        index = {v: i for i, v in enumerate(spec["categories"])}
        if "rare" in spec:  # the pooled values: one slot after the categories
            index.update(dict.fromkeys(spec["rare"]["values"], len(spec["categories"])))
        missing_slot = len(spec["categories"]) + ("rare" in spec)
        codes = np.array([missing_slot if v is None else index.get(v, -1) for v in c.values], dtype=np.int64)
        if (codes < 0).any():
            i = int(np.flatnonzero(codes < 0)[0])
            raise DataError(
                f"{source}: column '{c.name}' has the value '{c.values[i]}', which is not one of the "
                f"run's {len(spec['categories'])} categories"
            )
    else:
        codes = np.where(np.isnan(c.values), 2, np.nan_to_num(c.values)).astype(np.int64)
    if not spec["missing"] and (codes == spec["onehot"][1]).any():
        raise DataError(f"{source}: column '{c.name}' has missing values, which the run never saw")
    return codes


def file_columns(transform: dict[str, Any]) -> list[dict[str, Any]]:
    """The columns of the file a run was trained on, as read (``read_table``'s ``schema``): the learned
    columns, or with constraints (``data/constraints.py``) the file's before the rules changed them."""
    declared = transform.get("constraints")
    return declared["schema"] if declared else transform["columns"]


def encode(table: Table, transform: dict[str, Any]) -> np.ndarray:
    """The rows of ``table`` (the file's columns) as float32 vectors (N, D) in the transformed space."""
    declared = transform.get("constraints")
    if declared:
        table = rules_of.apply(table, declared["rules"])
    out = np.zeros((len(table), transform["layout"]["dims"]), dtype=np.float64)
    rows = np.arange(len(table))
    for spec in transform["columns"]:
        c = table.column(spec["name"])
        if "onehot" in spec:
            out[rows, spec["onehot"][0] + _codes(c, spec, table.source)] = 1.0
            continue
        missing = np.isnan(c.values)
        if missing.any() and not spec["missing"]:
            raise DataError(f"{table.source}: column '{c.name}' has missing values, which the run never saw")
        x = np.nan_to_num(c.values)
        present = rows[~missing]
        if spec["transform"] == "mode":
            modes = spec["modes"]
            k = _mode_assign(x, modes)
            mu, sd = np.asarray(modes["means"])[k], np.asarray(modes["stds"])[k]
            out[present, spec["value"]] = ((x - mu) / (STD_MULTIPLIER * sd))[present]
            out[present, spec["mode_dims"][0] + k[present]] = 1.0
        elif spec["transform"] == "bounds":
            span = max(spec["max"] - spec["min"], 1e-12)
            out[present, spec["value"]] = np.clip(2 * (x - spec["min"]) / span - 1, -1, 1)[present]
        else:
            q = spec["quantiles"]
            from scipy.special import ndtri  # here: scipy.special costs 0.15 s of every start-up

            out[present, spec["value"]] = ndtri(np.interp(x, q["values"], q["probs"]))[present]
        if spec["missing"]:  # missing rows keep zeros in the value and mode dims: the gate closes them
            out[rows, spec["indicator"][0] + missing.astype(np.int64)] = 1.0
    return out.astype(np.float32)


def _argmax(x: np.ndarray, dims: list[int]) -> np.ndarray:
    start, size = dims
    return x[:, start : start + size].argmax(1)


def _categorical(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A categorical column's decoded values; the rare slot drawn from the pooled values' frequencies
    (a generator seeded by the vectors: the same vectors decode to the same rows)."""
    rare = spec.get("rare")
    slots = [*spec["categories"], *([None] if rare else []), None]
    code = _argmax(x, spec["onehot"])
    values = np.array(slots, dtype=object)[code]
    if rare:
        drawn = code == len(spec["categories"])
        counts = np.asarray(rare["counts"], dtype=np.float64)
        rng = np.random.default_rng(int(np.abs(x[:64]).sum() * 1e6) % 2**32)
        picks = rng.choice(len(counts), int(drawn.sum()), p=counts / counts.sum())
        values[drawn] = np.array(rare["values"], dtype=object)[picks]
    return values


def decode(x: np.ndarray, transform: dict[str, Any], source: str = "synthetic") -> Table:
    """Vectors (N, D) in the transformed space back to typed columns: the argmax of every one-hot
    block, values clipped to the training range, integers rounded, decimals as in the file."""
    x = np.asarray(x, dtype=np.float64)
    columns: list[Column] = []
    for spec in transform["columns"]:
        name, kind = spec["name"], spec["type"]
        if kind == "categorical":
            columns.append(Column(name, kind, _categorical(x, spec)))
            continue
        if kind == "boolean":
            code = _argmax(x, spec["onehot"])
            false, true = spec["tokens"]
            values = np.where(code == 2, np.nan, code.astype(np.float64))
            columns.append(Column(name, kind, values, tokens=(false, true)))
            continue
        v = x[:, spec["value"]]
        if spec["transform"] == "mode":
            k = _argmax(x, spec["mode_dims"])
            modes = spec["modes"]
            values = v * STD_MULTIPLIER * np.asarray(modes["stds"])[k] + np.asarray(modes["means"])[k]
        elif spec["transform"] == "bounds":
            values = (v + 1) / 2 * (spec["max"] - spec["min"]) + spec["min"]
        else:
            q = spec["quantiles"]
            from scipy.special import ndtr

            values = np.interp(ndtr(v), q["probs"], q["values"])
        values = np.clip(values, spec["min"], spec["max"])
        if kind in ("integer", "date"):
            values = np.round(values)
        elif "step" in spec:  # datetimes and times: to the column's resolution, within the range
            values = np.clip(round_to(values, spec["step"]), spec["min"], spec["max"])
        elif spec.get("decimals") is not None:
            values = np.round(values, spec["decimals"])
        if spec["missing"]:
            values = np.where(_argmax(x, spec["indicator"]) == 1, np.nan, values)
        written = {k: spec[k] for k in ("fmt", "tz", "step") if k in spec}
        columns.append(Column(name, kind, values, decimals=spec.get("decimals"), **written))
    declared = transform.get("constraints")
    if declared:  # the file's columns back from the learned ones
        return rules_of.restore(Table(columns, source), declared["rules"], declared["schema"])
    return Table(columns, source)


# ---- the dataset ------------------------------------------------------------------------------------


def load_table(
    spec: str,
    *,
    columns: dict[str, str] | None = None,
    method: str = "mode",
    test_fraction: float = 0.1,
    split_seed: int = 0,
    fitted: dict[str, Any] | None = None,
    condition: str = "",
    rows: Table | None = None,
    constraints: list[str] | None = None,
    private: bool = False,
) -> Dataset:
    """A table file as a ``Dataset``: float32 (N, D) rows in the transformed space, split
    deterministically (``split_indices``), the transform fitted on the training rows and kept in
    ``meta["table"]`` with the source path and split. With ``fitted`` (a trained run's transform),
    the file is read with that run's column types and encoded with its transform, unchanged.

    ``condition`` (data.condition): a categorical or boolean column the model is conditioned on. It is
    taken out of the vector (the model does not generate it); its class ids are ``y_train``/``y_test``,
    its spec is ``meta["table"]["condition"]`` and ``meta["condition"]`` says what the ids mean.

    ``rows``: the table's rows, typed already (a DataFrame's, ``data/frames.py``), used instead of
    reading the file, which need not exist yet; the source is then recorded as ``spec`` names it (the
    DataFrame API's run directory keeps the rows as ``table.csv``, named relative to it).

    ``constraints`` (data.constraints): rules between columns (``data/constraints.py``), checked against
    the rows, built into the transform and kept in ``meta["table"]["constraints"]``.

    ``private`` (train.dp_epsilon): numbers are scaled by declared bounds (``private_bounds``) rather than
    by mixtures fitted on the rows; what the transform still reads from the rows is listed in
    ``meta["table"]["privacy"]["not_covered"]``."""
    path = table_path(spec)
    if path is None:
        raise DataError(f"{spec}: not a table (expected csv:PATH, parquet:PATH or a .csv/.tsv/.parquet file)")
    fmt = "parquet" if spec.startswith("parquet:") else None
    if fitted is not None and rows is not None:
        raise ConfigError("load_table: rows and a fitted transform are two tables; pass one")
    if fitted is not None:
        given = fitted.get("condition")
        table = read_table(path, schema=file_columns(fitted) + ([given] if given else []), fmt=fmt)
        if len(table) != fitted["n_rows"]:
            raise DataError(
                f"{path}: has {len(table)} rows, but the run was trained on {fitted['n_rows']}; "
                "the file changed since"
            )
        transform = fitted
        train, test = split_indices(len(table), fitted["test_fraction"], fitted["split_seed"])
    else:
        table, keys = identifiers.split(read_table(path, columns, fmt=fmt) if rows is None else rows)
        train, test = split_indices(len(table), test_fraction, split_seed)
        given = condition_spec(table, condition) if condition else None
        learned = without(table, given)
        declared = rules_of.check(constraints, learned) if constraints else []
        modelled = rules_of.apply(learned, declared)
        bounds = private_bounds(declared) if private else None
        transform = fit_transform(modelled, train, "bounds" if private else method, bounds)
        if private:
            transform["privacy"] = {"not_covered": not_covered(modelled, bounds or {}, given)}
        if declared:
            transform["constraints"] = {"rules": declared, "schema": rules_of.schema(learned)}
        source = str(path.resolve()) if rows is None else str(path)
        transform.update(source=source, n_rows=len(table), test_fraction=test_fraction, split_seed=split_seed)
        if keys:  # their shapes only: sampled rows get fresh keys (kinds/table.synthesize)
            transform["identifiers"] = keys
        if given is not None:
            transform["condition"] = given
    meta: dict[str, Any] = {"kind": "table", "table": transform}
    y_train = y_test = None
    if given is not None:
        codes = torch.from_numpy(condition_codes(table, given))
        y_train, y_test = codes[train], codes[test]
        names = list(given.get("categories") or given["tokens"])
        counts = torch.bincount(y_train, minlength=len(names)).tolist()
        meta["condition"] = {"kind": "column", "column": given["name"], "names": names, "counts": counts}
        table = without(table, given)
    x = encode(table, transform)
    return Dataset(
        name=path.stem,
        x_train=torch.from_numpy(x[train]),
        x_test=torch.from_numpy(x[test]),
        y_train=y_train,
        y_test=y_test,
        max_value=1.0,
        meta=meta,
    )


# ---- differentially private runs -------------------------------------------------------------------


def private_bounds(rules: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """The declared range of every learned column with a range rule of both bounds (``0 <= carat <= 5``);
    for an inequality's difference, from the declared ranges of both its columns."""
    out: dict[str, tuple[float, float]] = {}
    for r in rules:
        if r["kind"] == "range" and r["low"] is not None and r["high"] is not None:
            out[r["column"]] = (float(r["low"]), float(r["high"]))
    for r in rules:  # an inequality's upper column is learned as high − low: within [0, its max − low's min]
        if r["kind"] == "inequality" and r["by"] == "transform":
            low, high = out.get(r["low"]), out.pop(r["high"], None)
            if low is not None and high is not None:
                out[r["high"]] = (0.0, max(high[1] - low[0], 0.0))
    return out


def not_covered(
    table: Table, bounds: dict[str, tuple[float, float]], given: dict[str, Any] | None
) -> list[str]:
    """What a private run's transform read from the rows themselves (outside the (ε, δ) guarantee)."""
    out = []
    for c in table.columns:
        if c.type in NUMERIC_TYPES and c.name not in bounds:
            out.append(
                f"{c.name}: range read from the rows (declare it: '<low> <= {c.name} <= <high>'; for the "
                "upper column of an inequality, declare both columns' ranges)"
            )
        elif c.type == "categorical":
            out.append(f"{c.name}: categories read from the rows")
    if given is not None:
        out.append(f"{given['name']}: the condition's categories and class counts read from the rows")
    return out


# ---- a condition column ---------------------------------------------------------------------------


def condition_spec(table: Table, name: str) -> dict[str, Any]:
    """The spec of the column ``name`` that a conditional run is conditioned on (categorical or
    boolean, no missing values): its categories (or boolean tokens) and place among the columns."""
    if name not in table.names:
        raise ConfigError(
            f"data.condition: {table.source} has no column '{name}' (columns: {', '.join(table.names)})"
        )
    c = table.column(name)
    if c.type not in ("categorical", "boolean"):
        raise ConfigError(
            f"data.condition: column '{name}' is {c.type}; a condition needs a categorical or boolean "
            f"column (declare it with --columns {name}:categorical)"
        )
    if c.missing.any():
        raise DataError(
            f"{table.source}: the condition column '{name}' has {int(c.missing.sum())} missing values; "
            "fill them in or drop those rows"
        )
    spec: dict[str, Any] = {"name": name, "type": c.type, "missing": False, "index": table.names.index(name)}
    if c.type == "categorical":
        spec["categories"] = sorted({str(v) for v in c.values})
    else:
        spec["tokens"] = list(c.tokens)
    return spec


def condition_codes(table: Table, spec: dict[str, Any]) -> np.ndarray:
    """The class id (int64) of every row's value of the condition column."""
    c = table.column(spec["name"])
    if c.missing.any():
        raise DataError(f"{table.source}: the condition column '{c.name}' has missing values")
    if spec["type"] == "boolean":
        return c.values.astype(np.int64)
    index = {v: i for i, v in enumerate(spec["categories"])}
    codes = np.array([index.get(v, -1) for v in c.values], dtype=np.int64)
    if (codes < 0).any():
        value = c.values[int(np.flatnonzero(codes < 0)[0])]
        raise DataError(f"{table.source}: the condition column '{c.name}' has the value '{value}', which "
                        f"is not one of the run's: {', '.join(spec['categories'])}")  # fmt: skip
    return codes


def without(table: Table, spec: dict[str, Any] | None) -> Table:
    """``table`` without the condition column (itself when there is none)."""
    if spec is None:
        return table
    return Table([c for c in table.columns if c.name != spec["name"]], table.source, table.lines)


def with_condition(table: Table, spec: dict[str, Any], ids: np.ndarray) -> Table:
    """Decoded rows with the condition column put back, at its place, holding the classes ``ids``."""
    if spec["type"] == "boolean":
        column = Column(spec["name"], "boolean", ids.astype(np.float64), tokens=tuple(spec["tokens"]))
    else:
        column = Column(spec["name"], "categorical", np.array(spec["categories"], dtype=object)[ids])
    columns = list(table.columns)
    columns.insert(min(spec["index"], len(columns)), column)
    return Table(columns, table.source, table.lines)


def source_splits(transform: dict[str, Any], run_dir: str | Path | None = None) -> tuple[Table, Table]:
    """The (train, test) rows of the file a run was trained on, read with the run's column types; a
    relative source (a DataFrame run's ``table.csv``) is in the run directory ``run_dir``."""
    path = Path(transform["source"])
    if not path.is_absolute() and run_dir is not None:
        path = Path(run_dir) / path
    table = read_table(path, schema=file_columns(transform))
    if len(table) != transform["n_rows"]:
        raise DataError(
            f"{path}: has {len(table)} rows, but the run was trained on {transform['n_rows']}; "
            "the file changed since (pass the held-out rows with --real)"
        )
    train, test = split_indices(len(table), transform["test_fraction"], transform["split_seed"])
    return table.take(train), table.take(test)


__all__ = [
    "METHODS",
    "decode",
    "encode",
    "file_columns",
    "fit_transform",
    "load_table",
    "source_splits",
]
