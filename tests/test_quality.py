"""SDMetrics as the judge (``evaluation/quality.py``): its QualityReport score beside turbovae's own
fidelity measures, and a clear message where sdmetrics is not installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from turbovae.commands.eval import fidelity_lines
from turbovae.data.tables import Column, Table
from turbovae.errors import ConfigError
from turbovae.evaluation import fidelity, quality

pytest.importorskip("sdmetrics")


def rows(n: int = 600, seed: int = 0, shuffle: bool = False) -> Table:
    """Mixed columns with strong pairwise trends (SDMetrics scores only strong real associations)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    kind = np.where(x > 0, "high", "low").astype(object)
    y = 2 * x + rng.normal(0, 0.3, n)
    if shuffle:  # the same marginals, the joint structure gone
        y, kind = rng.permutation(y), rng.permutation(kind)
    return Table(
        [
            Column("x", "continuous", x),
            Column("y", "continuous", y),
            Column("kind", "categorical", kind),
            Column("flag", "boolean", (x > 1).astype(float)),
            Column("day", "date", 18_000 + np.round(10 * x + 50)),
            Column("clock", "time", np.round((x + 4) * 3600)),
        ]
    )


def test_the_score_is_one_for_the_same_rows_and_lower_without_their_trends() -> None:
    real = rows()
    same = quality.sdmetrics_quality(real, rows(seed=0))
    assert same["score"] > 0.99 and same["column_shapes"] > 0.99 and same["column_pair_trends"] > 0.99
    broken = quality.sdmetrics_quality(real, rows(seed=1, shuffle=True))
    assert broken["column_shapes"] > 0.85  # the marginals are close...
    assert broken["column_pair_trends"] < 0.8 and broken["score"] < same["score"] - 0.1  # ...the pairs not
    frame, metadata = quality.sdmetrics_frame(real)
    assert {k: v["sdtype"] for k, v in metadata["columns"].items()} == {
        "x": "numerical", "y": "numerical", "kind": "categorical", "flag": "boolean", "day": "datetime",
        "clock": "numerical",
    }  # fmt: skip
    assert str(frame["day"].dtype).startswith("datetime64")


def test_fidelity_reports_the_score_beside_its_own_measures() -> None:
    report = fidelity.fidelity_report(rows(), rows(seed=1))
    assert report["sdmetrics"]["score"] > 0.8 and report["mean_ks"] < 0.1
    lines = fidelity_lines({"real": "held-out rows", **report})
    assert any(line.startswith("  SDMetrics      quality score 0.") for line in lines)


def test_without_sdmetrics_the_report_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sdmetrics", None)  # import sdmetrics raises ImportError
    assert not quality.sdmetrics_available()
    with pytest.raises(
        ConfigError, match=r"needs sdmetrics, which is not installed: pip install 'turbovae\[sdmetrics\]'"
    ):
        quality.sdmetrics_quality(rows(), rows())
    report = fidelity.fidelity_report(rows(), rows(seed=1))
    assert report["sdmetrics"] is None
    lines = fidelity_lines({"real": "held-out rows", **report})
    assert (
        "  SDMetrics      quality score: sdmetrics is not installed (pip install 'turbovae[sdmetrics]')"
        in lines
    )
