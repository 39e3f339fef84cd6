"""SDMetrics as the judge: its single-table QualityReport score of synthetic rows against real ones,
beside turbovae's own measures (``fidelity.py``), so that a figure reads the same as SDV users' own.

The score is the mean of two properties, each in [0, 1] (1: the same): ``column_shapes`` (per column,
1 − the KS statistic for numbers, dates and times, 1 − the total variation distance for categories
and booleans) and ``column_pair_trends`` (per pair of columns, 1 − half the difference of their
correlations, or of their contingency tables; SDMetrics scores only the pairs whose real association
is above its threshold, and leaves the property out when none is: then ``column_pair_trends`` is None).
Columns go in with their SDMetrics types: numbers and times of day (seconds) ``numerical``, dates and
datetimes ``datetime`` (wall-clock time), categories ``categorical``, booleans ``boolean``.

``sdmetrics`` is optional (``pip install 'turbovae[sdmetrics]'``), imported only here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..data.datetimes import DAY
from ..data.tables import Table
from ..errors import ConfigError

INSTALL = "pip install 'turbovae[sdmetrics]'"


def sdmetrics_available() -> bool:
    try:
        import sdmetrics  # noqa: F401
    except ImportError:
        return False
    return True


def sdmetrics_frame(table: Table) -> tuple[Any, dict[str, Any]]:
    """``table`` as the DataFrame and the metadata dict SDMetrics' reports take."""
    import pandas as pd

    data: dict[str, Any] = {}
    columns: dict[str, dict[str, str]] = {}
    for c in table.columns:
        if c.type == "categorical":
            data[c.name], sdtype = pd.Series(c.values, dtype=object), "categorical"
        elif c.type == "boolean":
            flags = [None if math.isnan(v) else bool(v) for v in c.values]
            data[c.name], sdtype = pd.Series(flags, dtype=object), "boolean"
        elif c.type in ("date", "datetime"):
            seconds = c.values * DAY if c.type == "date" else c.values
            stamps = np.round(np.nan_to_num(seconds) * 1e6).astype(np.int64).astype("datetime64[us]")
            stamps[np.isnan(c.values)] = np.datetime64("NaT")
            data[c.name], sdtype = pd.Series(stamps), "datetime"
        else:
            data[c.name], sdtype = pd.Series(c.values.astype(np.float64)), "numerical"
        columns[c.name] = {"sdtype": sdtype}
    return pd.DataFrame(data), {"columns": columns}


def sdmetrics_quality(real: Table, synthetic: Table) -> dict[str, Any]:
    """SDMetrics' QualityReport of ``synthetic`` against ``real`` (the same columns): ``score`` and its
    two properties, and the SDMetrics version. A ConfigError when sdmetrics is not installed."""
    try:
        import sdmetrics

        with warnings.catch_warnings():  # the single-table report's module warns that it will move
            warnings.simplefilter("ignore", FutureWarning)
            from sdmetrics.reports.single_table import QualityReport
    except ImportError:
        raise ConfigError(
            f"SDMetrics' quality score needs sdmetrics, which is not installed: {INSTALL}"
        ) from None
    real_df, metadata = sdmetrics_frame(real)
    synthetic_df, _ = sdmetrics_frame(synthetic)
    report = QualityReport()
    with warnings.catch_warnings():  # its deprecation notices and pandas' chatter are not the user's
        warnings.simplefilter("ignore")
        report.generate(real_df, synthetic_df[real_df.columns], metadata, verbose=False)
        properties = report.get_properties()
    scores = {
        name: float(score) for name, score in zip(properties["Property"], properties["Score"], strict=True)
    }

    def known(value: float | None) -> float | None:
        return None if value is None or math.isnan(value) else value

    return {
        "score": known(float(report.get_score())),
        "column_shapes": known(scores.get("Column Shapes")),
        "column_pair_trends": known(scores.get("Column Pair Trends")),
        "version": sdmetrics.__version__,
    }


__all__ = ["INSTALL", "sdmetrics_available", "sdmetrics_frame", "sdmetrics_quality"]
