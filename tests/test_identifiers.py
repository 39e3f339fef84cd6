"""Identifier columns (fresh keys, never a training row's) and high-cardinality categoricals (the rare
values pooled: the one-hot stays MAX_CATEGORIES wide)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_constraints import Decoder  # a table run that draws random vectors

from turbovae.data import identifiers
from turbovae.data.table_transform import MAX_CATEGORIES, decode, load_table
from turbovae.data.tables import Column, Table, read_table
from turbovae.errors import ConfigError, DataError
from turbovae.kinds.table import synthesize


def keyed(n: int = 500) -> Table:
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    return Table(
        [
            Column("order", "identifier", np.array([f"ORD-{i + 7:05d}" for i in order], dtype=object)),
            Column("x", "continuous", rng.normal(size=n).round(2), decimals=2),
            Column("user", "identifier", np.array([str(10 * i + 3) for i in order], dtype=object)),
            Column(
                "token", "identifier", np.array([f"{v:x}q" for v in rng.integers(0, 2**40, n)], dtype=object)
            ),
        ]
    )


def test_identifiers_are_generated_fresh_never_copied() -> None:
    table = keyed()
    data = load_table("csv:rows.csv", rows=table)
    transform = data.meta["table"]
    assert [c["name"] for c in transform["columns"]] == ["x"]  # not modelled
    assert "ORD-" not in str(transform["identifiers"]) or transform["identifiers"][0]["prefix"] == "ORD-"
    assert "00007" not in str(transform)  # no training key is stored
    rows = synthesize(Decoder(transform), 10_000, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    assert rows.names == ["order", "x", "user", "token"]  # in their places
    for name in ("order", "user", "token"):
        sampled = [str(v) if not isinstance(v, float) else str(int(v)) for v in rows.column(name).values]
        training = set(table.column(name).values)
        assert len(set(sampled)) == 10_000 and not set(sampled) & training, name
    assert rows.column("order").values[0] == "ORD-00507"  # the counter goes on at its width
    assert rows.column("user").type == "integer" and rows.column("user").values.min() == 10 * 499 + 3 + 1


def test_a_column_of_distinct_text_is_taken_for_an_identifier(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "t.csv"
    rng = np.random.default_rng(0)
    path.write_text(
        "email,x\n" + "".join(f"u{i}x@example.org,{v:.2f}\n" for i, v in enumerate(rng.normal(size=300)))
    )
    assert read_table(path).column("email").type == "identifier"
    assert (
        "column 'email' has 300 distinct values in 300 rows and looks like an identifier"
        in capsys.readouterr().err
    )
    spec = load_table(f"csv:{path}").meta["table"]["identifiers"][0]
    assert spec == {"name": "email", "index": 0, "kind": "random", "prefix": "u"}
    assert (
        read_table(path, {"email": "categorical"}).column("email").type == "categorical"
    )  # a declaration wins


def test_identifiers_must_be_unique_and_present() -> None:
    repeated = Table([Column("id", "identifier", np.array(["a", "b", "a"], dtype=object)),
                      Column("x", "continuous", np.zeros(3))])  # fmt: skip
    with pytest.raises(DataError, match="identifier column 'id' has 1 repeated key"):
        load_table("csv:rows.csv", rows=repeated)
    holes = Table([Column("id", "identifier", np.array(["a", None, "c"], dtype=object)),
                   Column("x", "continuous", np.zeros(3))])  # fmt: skip
    with pytest.raises(DataError, match="has 1 missing key"):
        load_table("csv:rows.csv", rows=holes)
    with pytest.raises(ConfigError, match=r"expected one of: .*identifier, drop"):
        read_table_declared()


def read_table_declared() -> None:
    from turbovae.data.tables import declared_types

    declared_types({"id": "uuid"}, ["id"], "t.csv")


def test_high_cardinality_categoricals_pool_their_rare_values() -> None:
    """The audit's case: 10,000 categories in 30,000 rows took 3.8 GB and 224 s; now a 100-wide one-hot."""
    rng = np.random.default_rng(0)
    n = 30_000
    codes = rng.zipf(1.2, n) % 10_000
    zips = np.array([f"z{v}" for v in codes], dtype=object)
    table = Table([Column("zip", "categorical", zips), Column("x", "continuous", rng.normal(size=n))])
    t0 = time.perf_counter()
    data = load_table("csv:rows.csv", rows=table, method="quantile")
    assert time.perf_counter() - t0 < 10
    spec = data.meta["table"]["columns"][0]
    assert len(spec["categories"]) == MAX_CATEGORIES - 1 and spec["onehot"][1] == MAX_CATEGORIES
    assert data.x_train.shape[1] == MAX_CATEGORIES + 1  # the one-hot and x's value
    kept = set(spec["categories"])
    counts = {v: c for v, c in zip(*np.unique(zips, return_counts=True), strict=True)}
    assert min(counts[v] for v in kept) >= max(c for v, c in counts.items() if v not in kept)  # the commonest
    x = np.zeros((2000, data.meta["table"]["layout"]["dims"]), dtype=np.float32)
    x[:, spec["onehot"][0] + MAX_CATEGORIES - 1] = 1  # every row in the rare slot
    rows = decode(x, data.meta["table"])
    drawn = set(rows.column("zip").values)
    assert not drawn & kept and drawn <= set(spec["rare"]["values"]) and len(drawn) > 50
    assert set(decode(x, data.meta["table"]).column("zip").values) == drawn  # the same vectors, the same rows
    assert identifiers.attach(rows, []) is rows


def test_a_polars_like_frame_goes_through_pandas() -> None:
    """polars is not installed here: a stand-in from a module named polars, with ``to_pandas``."""
    pd = pytest.importorskip("pandas")
    from turbovae.data.frames import table_from_frame

    frame = type("DataFrame", (), {"__module__": "polars.dataframe.frame",
                                   "to_pandas": lambda self: pd.DataFrame({"x": [1.5, 2.5]})})()  # fmt: skip
    table, _ = table_from_frame(frame)
    assert table.names == ["x"] and table.column("x").values.tolist() == [1.5, 2.5]
    with pytest.raises(DataError, match="expected a pandas \\(or polars\\) DataFrame, got list"):
        table_from_frame([1, 2])
