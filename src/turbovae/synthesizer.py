"""The DataFrame API for tables: fit a pandas DataFrame, sample rows with the same columns and dtypes,
save and load the model as a run directory that the CLI reads too.

    synth = turbovae.TableSynthesizer(epochs=300).fit(df)
    rows = synth.sample(1000, conditions={"weather": "sun"})  # a DataFrame, dtypes as in df
    synth.save("runs/weather")                                # turbovae eval / sample runs/weather
    synth = turbovae.TableSynthesizer.load("runs/weather")

It trains through ``turbovae.fit`` (the path of ``turbovae train --data csv:...``), with the DataFrame's
columns read into typed columns in memory (``data/frames.py``) rather than through a CSV file. The run
directory keeps the rows as ``table.csv`` (``data.name: csv:table.csv``, read from the run directory:
``engine/rundir.data_in_run``), so that ``turbovae eval RUN`` and ``eval --fidelity`` find them, and the
columns' dtypes as ``frame.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, resolve, setting_key
from .data import frames
from .data.table_transform import file_columns
from .data.tables import Table, concat, write_table
from .engine.loop import fit as fit_run
from .engine.rundir import LOCK_NAME, load
from .errors import ConfigError, DataError
from .kinds.table import fitted, synthesize

RUN_TABLE = "table.csv"  # the training rows, in the run directory
FRAME_FILE = "frame.json"  # the DataFrame's dtypes, in the run directory
MIN_DRAWS = 100_000  # rejection sampling draws at most max(MIN_DRAWS, DRAW_FACTOR × n) rows
DRAW_FACTOR = 100
LOW_ACCEPTANCE = 0.05  # a warning below this share of accepted rows
CHUNK = 10_000


class TableSynthesizer:
    """A VAE for one table, fitted on a pandas DataFrame (``pip install 'turbovae[tables]'``).

    Args:
        **settings: Config keys, as ``section.key`` or the key alone (``epochs=300``,
            ``batch_size=500``, ``latent=32``, ``columns={"zip": "categorical"}``, ``condition="city"``,
            ``constraints=["price > 0", "start <= end"]``, ``dp_epsilon=1.0``),
            over the ``tabular`` preset; an unknown key is a ConfigError.
    """

    def __init__(self, **settings: Any) -> None:
        frames.pandas()  # a missing pandas is said at once
        flags = {setting_key(name): value for name, value in settings.items()}
        if "data.name" in flags:
            raise ConfigError("data.name: a TableSynthesizer's data are the DataFrame given to fit()")
        self._flags = {**flags, "data.name": f"csv:{RUN_TABLE}"}
        self.config: Config = resolve("tabular", flags=self._flags)  # values checked now, not at fit
        self.run_dir: Path | None = None
        self.acceptance_rate: float | None = None  # of the last sample() with conditions
        self.rejection_rate: float | None = None  # of the last sample(): rows that broke a constraint
        self._records: dict[str, dict[str, Any]] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._vae: Any = None

    def fit(self, df: Any, *, progress: bool | None = None) -> TableSynthesizer:
        """Train on the rows of ``df`` (``turbovae.fit``, in a temporary run directory; ``save`` keeps it).
        Returns the synthesizer. ``progress``: the training bar (None: on a terminal)."""
        cfg = resolve("tabular", flags=self._flags)
        table, records = frames.table_from_frame(df, cfg.data.columns)
        tmp = tempfile.TemporaryDirectory(prefix="turbovae-table-")
        out = Path(tmp.name) / "run"
        fit_run(cfg, out, rows=table, progress=progress)
        write_table(table, out / RUN_TABLE)
        (out / FRAME_FILE).write_text(json.dumps({"version": 1, "columns": records}, indent=1) + "\n")
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp = tmp
        self._open(out)
        return self

    def _open(self, run_dir: Path) -> None:
        self._vae = load(run_dir)
        fitted(self._vae)  # a DataError for a run that is not a table's
        self.config, self.run_dir = self._vae.config, run_dir
        path = run_dir / FRAME_FILE
        self._records = json.loads(path.read_text())["columns"] if path.is_file() else None

    @classmethod
    def load(cls, run_dir: str | Path) -> TableSynthesizer:
        """A synthesizer of a saved run directory (``save``'s, or a table run of ``turbovae train``: its
        rows come back with the usual dtypes of their types)."""
        frames.pandas()
        synth = cls.__new__(cls)
        synth.acceptance_rate, synth.rejection_rate, synth._tmp = None, None, None
        synth._open(Path(run_dir))
        # fit() again trains with the run's settings (train.batch_size as the run used it: for a table of
        # fewer training rows than the batch, their count)
        saved = synth.config.to_dict()
        synth._flags = {
            f"{section}.{key}": value for section, values in saved.items() for key, value in values.items()
        }
        synth._flags["data.name"] = f"csv:{RUN_TABLE}"
        return synth

    def save(self, run_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Copy the run directory to ``run_dir`` (new or empty; ``overwrite``: replace a run there)."""
        source = self._fitted_dir()
        target = Path(run_dir)
        if target.exists() and target.resolve() == source.resolve():  # (loaded from there): saved already
            return target
        if target.exists() and any(target.iterdir()):
            if not overwrite or not (target / "config.yaml").is_file():
                raise ConfigError(
                    f"{target} exists and is not empty; save to a new directory"
                    + (" (overwrite=True replaces a turbovae run directory only)" if overwrite else
                       ", or pass overwrite=True to replace the run there")
                )  # fmt: skip
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK_NAME), dirs_exist_ok=True)
        return target

    def _fitted_dir(self) -> Path:
        if self.run_dir is None:
            raise ConfigError("this TableSynthesizer is not fitted yet: call fit(df) first")
        return self.run_dir

    def sample(
        self,
        n: int,
        conditions: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> Any:
        """``n`` synthetic rows as a DataFrame with the training DataFrame's columns and dtypes.

        Args:
            n: Rows.
            conditions: ``{column: value}`` for categorical and boolean columns: every row has those
                values. A run trained with ``condition=COLUMN`` draws that column's value from the
                conditional model; the other conditions are met by rejection sampling (rows drawn until
                n match, at most max(100,000, 100 n)): the share accepted is ``acceptance_rate`` (and
                ``df.attrs["acceptance_rate"]``), with a warning below 5%.
                Rows also keep the run's constraints (``constraints=[...]``): those that rules built into
                the transform cannot break; the others are drawn again, and the share rejected is
                ``rejection_rate`` (and ``df.attrs["rejection_rate"]``).
            seed: Seeds the draw (None: torch's global generator).
            temperature: Scales the prior's standard deviation.

        Raises:
            ConfigError: An unknown column or value, or a condition on a column that is not categorical
                or boolean.
            DataError: Fewer than n rows matched the conditions within the bound of draws.
        """
        self._fitted_dir()
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        rows, rate = self._rows(n, conditions or {}, generator, temperature)
        self.acceptance_rate = rate if conditions else None
        df = frames.frame_from_table(rows, self._records)
        if fitted(self._vae).get("constraints"):
            df.attrs["rejection_rate"] = self.rejection_rate
        if conditions:
            df.attrs["acceptance_rate"] = rate
        return df

    def _rows(self, n: int, conditions: dict[str, Any], generator: torch.Generator | None,
              temperature: float) -> tuple[Table, float]:  # fmt: skip
        transform = fitted(self._vae)
        records = self._records or {}
        wanted = {name: _wanted(transform, name, value, records.get(name, {}).get("categories", []))
                  for name, value in conditions.items()}  # fmt: skip
        given = transform.get("condition")
        class_id = wanted.pop(given["name"]) if given is not None and given["name"] in wanted else None

        stats = {"rejected": 0, "drawn": 0}

        def draw(size: int) -> Table:
            seen: dict[str, Any] = {}
            rows = synthesize(self._vae, size, generator=generator, temperature=temperature,
                              condition=class_id, stats=seen)  # fmt: skip
            stats["rejected"] += round(seen.get("rejected", 0.0) * seen.get("drawn", size))
            stats["drawn"] += seen.get("drawn", size)
            self.rejection_rate = stats["rejected"] / stats["drawn"]
            return rows

        if not wanted:
            return draw(n), 1.0
        bound = max(MIN_DRAWS, DRAW_FACTOR * n)
        parts, accepted, drawn = [], 0, 0
        while accepted < n and drawn < bound:
            size = max(n, CHUNK)
            if drawn:  # enough for the rest at the rate seen so far, and a fifth more
                size = max(CHUNK, math.ceil(1.2 * (n - accepted) * drawn / max(accepted, 1)))
            size = min(size, bound - drawn)
            rows = draw(size)
            keep = np.ones(size, dtype=bool)
            for name, code in wanted.items():
                keep &= _codes(rows, name, transform) == code
            parts.append(rows.take(np.flatnonzero(keep)))
            accepted, drawn = accepted + int(keep.sum()), drawn + size
        return _accepted(parts, n, accepted, drawn, conditions), accepted / drawn


def _spec(transform: dict[str, Any], name: str) -> dict[str, Any]:
    specs = {s["name"]: s for s in file_columns(transform)}
    if transform.get("condition"):
        specs[transform["condition"]["name"]] = transform["condition"]
    if name not in specs:
        raise ConfigError(f"conditions: no column '{name}' in this run (columns: {', '.join(specs)})")
    return specs[name]


def _wanted(transform: dict[str, Any], name: str, value: Any, declared: list[Any]) -> int:
    """The category index (or boolean 0/1) a condition asks for (``declared``: the DataFrame's
    categories of the column, seen or not)."""
    spec = _spec(transform, name)
    if spec["type"] == "boolean":
        words = {t.lower(): i for i, t in enumerate(spec["tokens"])}
        words.update({"false": 0, "true": 1, "0": 0, "1": 1})
        code = words.get(str(value).strip().lower())
        if code is None:
            raise ConfigError(f"conditions: '{value}' is not a value of the boolean column '{name}'")
        return code
    if spec["type"] != "categorical":
        raise ConfigError(
            f"conditions: column '{name}' is {spec['type']}; conditions on categorical and boolean columns "
            "only (numeric ranges are not supported yet)"
        )
    text = str(value).strip()
    if text not in spec["categories"] and text in [str(v) for v in declared]:
        raise ConfigError(
            f"conditions: '{value}' is a category of column '{name}' that no training row has: the model "
            "never samples it"
        )
    if text not in spec["categories"]:
        shown = ", ".join(spec["categories"][:20]) + (" ..." if len(spec["categories"]) > 20 else "")
        raise ConfigError(f"conditions: '{value}' is not a category of column '{name}' ({shown})")
    return int(spec["categories"].index(text))


def _codes(rows: Table, name: str, transform: dict[str, Any]) -> np.ndarray:
    """Each row's category index (or 0/1) of the column ``name``; -1 where missing."""
    column, spec = rows.column(name), _spec(transform, name)
    if spec["type"] == "boolean":
        return np.where(np.isnan(column.values), -1, np.nan_to_num(column.values)).astype(np.int64)
    index = {v: i for i, v in enumerate(spec["categories"])}
    return np.array([index.get(v, -1) for v in column.values], dtype=np.int64)


def _accepted(parts: list[Table], n: int, accepted: int, drawn: int, conditions: dict[str, Any]) -> Table:
    """The first n accepted rows, or a DataError when fewer than n matched within the bound; a warning
    when few did."""
    asked = ", ".join(f"{k}={v}" for k, v in conditions.items())
    advice = "train with condition=COLUMN to sample one column's values directly"
    if accepted == 0:
        raise DataError(f"conditions {asked}: none of {drawn:,} sampled rows matched; {advice}")
    if accepted < n:
        raise DataError(
            f"conditions {asked}: {accepted:,} of {drawn:,} sampled rows matched ({accepted / drawn:.3%}), "
            f"fewer than the {n:,} asked for; ask for fewer rows, or {advice}"
        )
    if accepted / drawn < LOW_ACCEPTANCE:
        rate = f"{accepted / drawn:.2%} of sampled rows matched ({accepted:,} of {drawn:,})"
        warnings.warn(
            f"conditions {asked}: {rate}; {advice}",
            stacklevel=4,  # the caller of sample()
        )
    return concat(parts).take(np.arange(n))
