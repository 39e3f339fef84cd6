"""Tables: CSV, TSV and Parquet files (``csv:PATH``, ``data/tables.py``), each row a vector of normalised
numbers and one-hot categories (``data/table_transform.py``, fitted on the training split and saved in
``Dataset.meta["table"]``).

A table run samples rows with the file's columns and types (``synthesize``), is compared with real rows
by ``eval --fidelity``, encodes rows of a file with its fitted transforms, and draws its vectors as
barcodes of values. A conditional run is conditioned on one of its categorical columns."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import conditioning
from ..data import identifiers
from ..data.constraints import violations
from ..data.table_transform import decode, file_columns, source_splits, with_condition
from ..data.table_transform import encode as encode_table
from ..data.tables import TABLE_SUFFIXES, Table, concat, read_table, sniff_delimiter, table_path, write_table
from ..errors import ConfigError, DataError
from .base import DataKind, ReportOutputs, SampleRequest

if TYPE_CHECKING:
    from ..config import Config
    from ..data.dataset import Dataset
    from ..engine.setup import Setup
    from ..vae import VAE

ROWS = (".csv", ".tsv", ".parquet")  # what `turbovae sample` writes rows to
SYNTHETIC_ROWS = 2000  # the report draws these for its histograms, and shows the first SHOWN_ROWS
SHOWN_ROWS = 10


class TableKind(DataKind):
    name = "table"
    barcode = "values"
    legend = (
        "table runs: one row per example, one cell per dimension of the transformed vector "
        "(numbers normalised, categories one-hot) on a fixed scale, blue −1, white 0, red +1"
    )
    sample_outs = ".csv, .tsv or .parquet (rows), .png (a barcode) or .npy"

    def claims(self, spec: str) -> bool:
        return table_path(spec) is not None

    def preset(self, spec: str) -> str | None:
        return "tabular"

    def misfit(self, data: Dataset, cfg: Config) -> str | None:
        # the likelihood's own advice is for images (gaussian, uint8)
        return (
            f"likelihood '{cfg.model.likelihood}' does not fit the table '{data.name}': tables are "
            "scored with --likelihood mixed (a Gaussian for each number, a categorical for each "
            "category; the tabular preset's)"
        )

    def batch_size(self, data: Dataset, cfg: Config, n_train: int) -> int:
        """Fewer training rows than a batch: one batch of all of them, as TVAE does."""
        if n_train >= cfg.train.batch_size:
            return cfg.train.batch_size
        print(f"turbovae: note: table '{data.name}' has {n_train} training rows, fewer than "
              f"train.batch_size = {cfg.train.batch_size}: training with one batch of all {n_train}",
              file=sys.stderr)  # fmt: skip
        return n_train

    def take_condition(self, data: Dataset, condition: str) -> None:
        """A categorical column, taken out of the vectors by the loader (``load_table``)."""
        if condition == "label":
            raise ConfigError("data.condition for a table names its categorical column: --condition COLUMN")

    def real_rows(self, vae: VAE, real: str | None, run: str) -> tuple[Table | None, Table, str]:
        """The run's training and held-out rows, read again from its file (``real``: another file to
        compare with; the training rows are then None when the run's file is gone or changed)."""
        transform = fitted(vae)
        real_train: Table | None
        try:
            real_train, real_test = source_splits(transform, run)
        except DataError:
            if not real:
                raise
            real_train = None
        if real:
            real_test = read_table(real, schema=file_columns(transform))
        return real_train, real_test, real or f"{transform['source']} (held-out split)"

    def report_outputs(self, s: Setup, figures: Path) -> ReportOutputs:
        """Synthetic rows, and their per-column histograms against all the real rows."""
        from ..viz.plots import plot_column_histograms

        synthetic = synthesize(s.vae, SYNTHETIC_ROWS, generator=torch.Generator(s.device).manual_seed(0))
        vectors = torch.cat([s.x_train, s.x_val, s.x_test]).float().cpu().numpy()
        real = decode(vectors, fitted(s.vae), source="real")
        histograms = plot_column_histograms(real, synthetic, figures / "histograms.png")
        return ReportOutputs(rows=synthetic.take(np.arange(min(SHOWN_ROWS, len(synthetic)))),
                             pictures={"histograms": histograms})  # fmt: skip

    def samples_path(self, run_dir: Path, n: int) -> Path | None:
        return run_dir / f"samples-{n}.csv"

    def write_samples(self, vae: VAE, out: Path | None, ask: SampleRequest) -> str:
        """Rows with the file's columns and types (.csv, .tsv, .parquet), else the vectors."""
        if out is not None and out.suffix.lower() in ROWS:
            given = None if ask.classes is None else ask.classes[0]
            stats: dict[str, Any] = {}
            rows = synthesize(vae, ask.n, generator=ask.generator, temperature=ask.temperature,
                              condition=given, stats=stats)  # fmt: skip
            if stats.get("rejected"):
                print(f"turbovae: note: {stats['rejected']:.2%} of {stats['drawn']:,} sampled rows broke a "
                      "constraint kept by rejection and were drawn again", file=sys.stderr)  # fmt: skip
            return str(write_table(rows, out))
        return super().write_samples(vae, out, ask)

    def read_input(self, vae: VAE, path: Path) -> tuple[torch.Tensor, list[str]]:
        """A table file's rows, read with the run's column types and encoded with its fitted transforms;
        named by the file's first column the run does not model (an identifier), else by their line."""
        if path.is_dir() or path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: this run is a table model; expected a {'/'.join(TABLE_SUFFIXES)} file")
        transform = fitted(vae)
        table = read_table(path, schema=file_columns(transform))
        return torch.from_numpy(encode_table(table, transform)), _row_names(path, transform, table)

    def card_tag(self, vae: VAE) -> str:
        return "tabular"

    def card_usage(self, vae: VAE, load_line: str, top: str) -> list[str]:
        return ["import turbovae", "", load_line,
                "rows = vae.sample(16)  # in the transformed space: docs/tables.md"]  # fmt: skip


def fitted(vae: VAE) -> dict[str, Any]:
    """The fitted transform of a table run (``data_meta["table"]``)."""
    transform = vae.data_meta.get("table")
    if not isinstance(transform, dict) or "layout" not in transform:
        raise DataError("this run was not trained on a table (csv:PATH); it has no columns to write")
    return transform


def _row_names(path: Path, transform: dict[str, Any], table: Table) -> list[str]:
    """The values of the file's first column the run does not model (an identifier), else the rows'
    lines in the file (CSV) or their numbers (Parquet)."""
    if path.suffix.lower() == ".parquet":
        return [str(i + 1) for i in range(len(table))]
    modelled = {c["name"] for c in file_columns(transform)}
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f, delimiter=sniff_delimiter(path)) if any(v.strip() for v in r)]
    extra = [j for j, name in enumerate(rows[0]) if name.strip() not in modelled]
    if extra:
        return [row[extra[0]].strip() for row in rows[1:]]
    return [f"line {n}" for n in table.lines]


MAX_REDRAWS = 100  # constraints kept by rejection: at most this many times n rows drawn (and 100,000)


def synthesize(
    vae: VAE,
    n: int,
    *,
    generator: torch.Generator | None = None,
    draw: bool = True,
    temperature: float = 1.0,
    condition: int | str | None = None,
    stats: dict[str, Any] | None = None,
) -> Table:
    """``n`` synthetic rows (``_draw``) that keep the run's constraints (``data.constraints``): those built
    into the transform by construction, the others by drawing again the rows that break them. ``stats``
    receives ``rejected`` (the share of drawn rows rejected) and ``drawn``."""

    def rows_of(k: int) -> Table:
        return _draw(vae, k, generator=generator, draw=draw, temperature=temperature, condition=condition)

    rows = rows_of(n)
    declared = fitted(vae).get("constraints") or {"rules": []}
    bad = violations(rows, declared["rules"])
    kept, drawn = [rows.take(np.flatnonzero(~bad))], n
    accepted = n - int(bad.sum())
    while accepted < n and drawn < max(100_000, MAX_REDRAWS * n):
        size = max(1000, 2 * (n - accepted) * drawn // max(accepted, 1))
        more = rows_of(size)
        keep = np.flatnonzero(~violations(more, declared["rules"]))
        kept.append(more.take(keep))
        accepted, drawn = accepted + len(keep), drawn + size
    if accepted < n:
        raise DataError(
            f"the constraints were kept by {accepted:,} of {drawn:,} sampled rows, fewer than the "
            f"{n:,} asked for: the model breaks them too often (train longer, or check the rules)"
        )
    if stats is not None:
        stats.update(rejected=1 - accepted / drawn, drawn=drawn)
    rows = concat(kept).take(np.arange(n)) if len(kept) > 1 else rows
    keys = fitted(vae).get("identifiers", [])  # fresh keys, never a training row's
    seed = int(torch.randint(0, 2**31, (1,), generator=generator).item()) if keys and generator else 0
    return identifiers.attach(rows, keys, seed)


@torch.no_grad()
def _draw(
    vae: VAE,
    n: int,
    *,
    generator: torch.Generator | None = None,
    draw: bool = True,
    temperature: float = 1.0,
    condition: int | str | None = None,
) -> Table:
    """``n`` synthetic rows from a tabular run: z ~ N(0, T²I) (``temperature`` T, 1 by default), then
    x ~ p(x | z) (``draw=True``: the model's distribution, categories drawn from their softmax) or
    x = E[x | z] (``draw=False``: the most likely category, the mean value), decoded back to the
    table's columns and types.

    A run conditioned on a column (``--condition COLUMN``) draws the rows of the class ``condition``
    (an id or a value of that column; None: classes drawn from the training frequencies) and writes
    the column back in its place."""
    transform = fitted(vae)
    given = transform.get("condition")
    if given is None:
        if condition is not None:
            raise DataError(
                "this table run is not conditioned on a column (train it with --condition COLUMN)"
            )
        chunks = []
        for start in range(0, n, 10_000):
            x = vae.sample(
                min(10_000, n - start), generator=generator, mean=not draw, temperature=temperature
            )
            chunks.append(x.float().cpu().numpy())
        return decode(np.concatenate(chunks), transform)
    device = next(vae.parameters()).device
    if condition is None:
        y = conditioning.draw_classes(vae.data_meta["condition"], n, generator, device)
    else:
        y = vae.condition_ids(condition, n, device)
    chunks = []
    for start in range(0, n, 10_000):
        part = y[start : start + 10_000]
        x = vae.sample(len(part), generator=generator, mean=not draw, temperature=temperature, condition=part)
        chunks.append(x.float().cpu().numpy())
    rows = decode(np.concatenate(chunks), transform)
    return with_condition(rows, given, y.cpu().numpy())
