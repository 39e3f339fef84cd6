"""Constraints between a table's columns (``data.constraints``, ``data/constraints.py``): each kind kept by
every one of 10,000 sampled rows, bad declarations as one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turbovae.data import constraints
from turbovae.data.table_transform import decode, load_table
from turbovae.data.tables import Column, Table
from turbovae.errors import ConfigError, DataError
from turbovae.kinds.table import synthesize

ROWS = 10_000


def table(n: int = 400, seed: int = 0) -> Table:
    """Rows that keep every rule of RULES."""
    rng = np.random.default_rng(seed)
    start = 18_000 + rng.integers(0, 700, n)  # days since 1970
    a, b = np.round(rng.gamma(2, 10, n), 2), np.round(rng.gamma(3, 5, n), 2)
    lo = np.round(rng.normal(0, 1, n), 3)
    pairs = np.array([["paris", "france"], ["lyon", "france"], ["berlin", "germany"], ["rome", "italy"]])
    pick = pairs[rng.integers(0, 4, n)]
    return Table(
        [
            Column("start", "date", start.astype(float), fmt="%Y-%m-%d", step=86400.0),
            Column(
                "end", "date", (start + rng.integers(0, 30, n)).astype(float), fmt="%Y-%m-%d", step=86400.0
            ),
            Column("a", "continuous", a, decimals=2),
            Column("b", "continuous", b, decimals=2),
            Column("total", "continuous", np.round(a + b, 2), decimals=2),
            Column("price", "continuous", np.round(rng.lognormal(3, 1, n), 2), decimals=2),
            Column("score", "integer", rng.integers(0, 11, n).astype(float)),
            Column("lo", "continuous", lo, decimals=3),
            Column("hi", "continuous", np.round(lo + rng.exponential(1, n), 3), decimals=3),
            Column("city", "categorical", pick[:, 0].astype(object)),
            Column("country", "categorical", pick[:, 1].astype(object)),
        ],
        "rows",
    )


def decoded(rules: list[str], rows: Table | None = None, seed: int = 0) -> tuple[Table, dict]:
    """10,000 rows decoded from arbitrary vectors (wider than any model's) through a transform fitted
    with ``rules``: what holds here holds by construction, whatever the model samples."""
    data = load_table("csv:rows.csv", rows=rows or table(), constraints=rules)
    transform = data.meta["table"]
    x = np.random.default_rng(seed).normal(0, 3, (ROWS, transform["layout"]["dims"]))
    return decode(x, transform), transform


def test_a_range_and_positivity_hold_by_clipping() -> None:
    rows, _ = decoded(["price > 0", "0 <= score <= 10", "lo >= -5", "hi < 10"])
    assert len(rows) == ROWS
    assert (rows.column("price").values > 0).all()
    assert np.isin(rows.column("score").values, np.arange(11)).all()
    assert (rows.column("lo").values >= -5).all() and (rows.column("hi").values < 10).all()
    # a strict bound at the edge of the data: the next written value, not the bound
    edge = table()
    edge.column("price").values[:] = np.maximum(edge.column("price").values, 0.01)
    edge.column("price").values[0] = 0.01
    rows, _ = decoded(["price > 0"], edge)
    assert rows.column("price").values.min() >= 0.01


def test_an_inequality_is_a_non_negative_difference() -> None:
    rows, transform = decoded(["start <= end", "lo <= hi"])
    assert (rows.column("start").values <= rows.column("end").values).all()
    assert (rows.column("lo").values <= rows.column("hi").values).all()
    learned = {c["name"]: c for c in transform["columns"]}
    assert learned["end"]["type"] == "integer" and learned["end"]["min"] >= 0  # days from start
    assert rows.column("end").type == "date" and rows.column("end").fmt == "%Y-%m-%d"
    assert not constraints.violations(rows, transform["constraints"]["rules"]).any()


def test_a_sum_equals_its_parts() -> None:
    rows, transform = decoded(["total = a + b"])
    assert "total" not in [c["name"] for c in transform["columns"]]  # not learned: written
    total, parts = rows.column("total").values, rows.column("a").values + rows.column("b").values
    assert np.abs(total - parts).max() < 1e-9
    assert rows.names == table().names  # the file's columns, in its order


def test_fixed_combinations_are_one_column() -> None:
    rows, transform = decoded(["fixed(city, country)"])
    seen = {("paris", "france"), ("lyon", "france"), ("berlin", "germany"), ("rome", "italy")}
    got = set(zip(rows.column("city").values, rows.column("country").values, strict=True))
    assert got == seen  # every pair seen, none made up
    assert [c["name"] for c in transform["columns"] if c["type"] == "categorical"] == ["city+country"]


def test_rules_chain_in_any_order() -> None:
    base = table()
    mid = Column("mid", "continuous", np.round(base.column("lo").values + 0.1, 3), decimals=3)
    base.columns.insert(8, mid)
    base.column("hi").values[:] = np.maximum(base.column("hi").values, mid.values)
    rows, _ = decoded(["mid <= hi", "lo <= mid"], base)
    lo, mid_v, hi = (rows.column(n).values for n in ("lo", "mid", "hi"))
    assert (lo <= mid_v).all() and (mid_v <= hi).all()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("price >= 0", "names 'price', not a column"),
        ("pric > 0", "did you mean 'price'"),
        ("city > 0", "column 'city' is categorical; a range rule takes continuous or integer"),
        ("start <= price", "compares a date column with a continuous one"),
        ("fixed(city, score)", "column 'score' is integer; a fixed rule takes categorical"),
        ("total = a", "is not a sum"),
        ("price >> 3", "cannot read"),
        ("5 <= price <= 1", "the lower bound is above the upper one"),
        ("lo < hi", "is '<='"),
    ],
)
def test_bad_declarations_are_one_line_errors(rule: str, message: str) -> None:
    rows = table() if rule != "price >= 0" else Table([c for c in table().columns if c.name != "price"])
    with pytest.raises(ConfigError, match=message) as info:
        load_table("csv:rows.csv", rows=rows, constraints=[rule])
    assert "\n" not in str(info.value)


def test_rows_that_break_a_rule_and_cycles_are_refused() -> None:
    with pytest.raises(
        DataError, match=r"row\(s\) break the declared constraints, the first at row \d+ \('hi <= lo'\)"
    ):
        load_table("csv:rows.csv", rows=table(), constraints=["hi <= lo"])
    with pytest.raises(ConfigError, match="written by both"):
        load_table("csv:rows.csv", rows=table(), constraints=["lo <= hi", "a <= hi"])
    with pytest.raises(ConfigError, match="cycle"):
        constraints._order([
            {"kind": "inequality", "low": "x", "high": "y", "by": "transform", "rule": "x <= y"},
            {"kind": "inequality", "low": "y", "high": "x", "by": "transform", "rule": "y <= x"},
        ])  # fmt: skip


def test_the_config_takes_rules_separated_by_semicolons() -> None:
    from turbovae.config import resolve

    cfg = resolve("tabular", flags={"data.constraints": "price > 0; fixed(city, country)"})
    assert cfg.data.constraints == ["price > 0", "fixed(city, country)"]


def test_a_strict_bound_moves_to_the_next_written_value() -> None:
    rule = constraints.parse("0 < price < 10")
    price = Column("price", "continuous", np.array([-1.0, 0.0, 0.004, 5.0, 10.0, np.nan]), decimals=2)
    assert np.array_equal(
        constraints.clip(price, rule), [0.01, 0.01, 0.01, 5.0, 9.99, np.nan], equal_nan=True
    )
    count = Column("count", "integer", np.array([-3.0, 0.0, 4.0]))
    assert constraints.clip(count, constraints.parse("count > 0")).tolist() == [1.0, 1.0, 4.0]


class Decoder:
    """Stands for a table run: ``sample`` draws wide random vectors in the transformed space."""

    def __init__(self, transform: dict) -> None:
        self.data_meta = {"table": transform}
        self.rng = np.random.default_rng(0)

    def sample(self, n: int, **_: object) -> torch.Tensor:
        return torch.from_numpy(self.rng.normal(0, 3, (n, self.data_meta["table"]["layout"]["dims"])))


def test_rules_over_missing_values_are_kept_by_rejection() -> None:
    base = table()
    base.column("hi").values[::7] = np.nan
    data = load_table("csv:rows.csv", rows=base, constraints=["lo <= hi", "price > 0"])
    rules = data.meta["table"]["constraints"]["rules"]
    assert [r["by"] for r in rules] == ["rejection", "transform"]
    stats: dict = {}
    rows = synthesize(Decoder(data.meta["table"]), ROWS, stats=stats)  # type: ignore[arg-type]
    lo, hi = rows.column("lo").values, rows.column("hi").values
    assert len(rows) == ROWS and not (lo > hi).any() and np.isnan(hi).any()
    assert 0.05 < stats["rejected"] < 0.95 and stats["drawn"] > ROWS


@pytest.mark.slow
def test_the_api_keeps_rules_by_rejection_where_values_are_missing() -> None:
    """An inequality over a column with missing values cannot be built into the transform: sampled rows
    that break it are drawn again, and the share is reported."""
    pd = pytest.importorskip("pandas")
    import turbovae

    rng = np.random.default_rng(0)
    lo = rng.normal(0, 1, 300).round(3)
    hi = (lo + rng.exponential(0.3, 300)).round(3)
    hi[::7] = np.nan
    df = pd.DataFrame({"lo": lo, "hi": hi, "price": rng.lognormal(0, 1, 300).round(2)})
    synth = turbovae.TableSynthesizer(epochs=1, hidden=[16], latent=4, constraints=["lo <= hi", "price > 0"])
    rows = synth.fit(df, progress=False).sample(ROWS, seed=0)
    rule = synth.config.data.constraints
    assert rule == ["lo <= hi", "price > 0"]
    assert (rows["lo"] <= rows["hi"]).sum() == rows["hi"].notna().sum() and (rows["price"] > 0).all()
    assert rows["hi"].isna().any()  # missing values are kept: they break nothing
    assert 0 < synth.rejection_rate < 0.9 and rows.attrs["rejection_rate"] == synth.rejection_rate
    by = {r["rule"]: r["by"] for r in synth._vae.data_meta["table"]["constraints"]["rules"]}
    assert by == {"lo <= hi": "rejection", "price > 0": "transform"}
