"""Text: lines of UTF-8 files as token ids (``text:PATH``, ``words``; ``data/text.py``), the tokeniser
saved in ``Dataset.meta["text"]``.

Batches are token ids cut to their longest line (no scaling, no binarisation) in length buckets, so
they change shape from batch to batch. A text run is scored per token as well (nats per token,
perplexity, reconstruction accuracy), writes and reads lines of text (``sample``, ``encode``, the
run's samples.txt, reconstructions.txt and interpolations.txt), and draws its token ids as barcodes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.text import Tokenizer, is_text_spec, lengths_of, read_lines, trim, warn
from ..errors import ConfigError, DataError
from ..models import TEXT_MODELS
from .base import DataKind, Prepare, ReportOutputs, SampleRequest

if TYPE_CHECKING:
    from ..config import Config
    from ..data.dataset import Dataset
    from ..engine.setup import Setup
    from ..vae import VAE

TEXT_OUTPUTS = ("samples", "reconstructions", "interpolations")  # the .txt files of a text run


class TextKind(DataKind):
    name = "text"
    fixed_shapes = False  # batches are cut to their longest line
    barcode = "tokens"
    legend = (
        "text runs: one row per sentence, one cell per token, the same token the same colour, the "
        "end marker black, padding white"
    )
    sample_outs = ".txt (sentences) or .png (token ids as a barcode) for a text run"

    def claims(self, spec: str) -> bool:
        return is_text_spec(spec)

    def preset(self, spec: str) -> str | None:
        return "words-char" if spec == "words" else "text"

    def preparer(self, max_value: float, dynamic: bool, generator: torch.Generator | None) -> Prepare:
        """Token ids stay ids, cut to the batch's longest line."""
        return trim

    def lengths(self, x: torch.Tensor) -> torch.Tensor | None:
        return lengths_of(x)

    def check(self, data: Dataset, cfg: Config) -> None:
        """A model of token sequences, the categorical likelihood, no binarisation."""
        model, likelihood, binarize = cfg.model.name, cfg.model.likelihood, cfg.data.binarize
        if model not in TEXT_MODELS:
            raise ConfigError(
                f"'{data.name}' is text: use --model {' or '.join(sorted(TEXT_MODELS))} with --likelihood "
                f"categorical (or --config text), not --model {model}"
            )
        if likelihood != "categorical":
            raise ConfigError(f"'{data.name}' is text: use --likelihood categorical, not {likelihood}")
        if binarize not in ("auto", "none"):
            raise ConfigError(f"data.binarize={binarize} applies to images; '{data.name}' is text")

    def final_metrics(
        self, s: Setup, ev: dict[str, float], iw: dict[str, Any], loop: dict[str, Any]
    ) -> dict[str, Any]:
        """Nats per token, perplexity, active units, reconstruction accuracy, the tokeniser."""
        from ..evaluation.text import text_summary

        return text_summary(s, ev, iw, loop)

    def eval_metrics(self, result: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        """Nats per token and perplexity."""
        from ..evaluation.text import text_metrics

        return text_metrics(result["nelbo"], result["nll_iwae"], x)

    def write_pictures(self, s: Setup, out: Path) -> None:
        """Barcodes of token ids, and samples.txt, reconstructions.txt and interpolations.txt."""
        from ..viz.text import write_text_outputs

        super().write_pictures(s, out)
        write_text_outputs(s, out)

    def report_outputs(self, s: Setup, figures: Path) -> ReportOutputs:
        """Sampled sentences, reconstructions and interpolations (the run's .txt files)."""
        from ..viz.text import write_text_outputs

        write_text_outputs(s, figures)
        return ReportOutputs(texts={name: (figures / f"{name}.txt").read_text() for name in TEXT_OUTPUTS})

    def samples_path(self, run_dir: Path, n: int) -> Path | None:
        return None  # the lines, on standard output

    def write_samples(self, vae: VAE, out: Path | None, ask: SampleRequest) -> str:
        """Generated lines (greedy with ``ask.mean``), on standard output or in a .txt file; or a .png
        barcode of their token ids."""
        from ..viz.text import sample_lines

        if out is not None and out.suffix not in (".txt", ".png"):
            raise ConfigError(f"--out must end in {self.sample_outs}, got {out}")
        if out is not None and out.suffix == ".png":
            return super().write_samples(vae, out, ask)
        lines = sample_lines(vae, ask.n, ask.generator, greedy=ask.mean, temperature=ask.temperature)
        if out is None:
            return "\n".join(lines)
        ask.write(out, "".join(f"{line}\n" for line in lines).encode())
        return str(out)

    def read_input(self, vae: VAE, path: Path) -> tuple[torch.Tensor, list[str]]:
        """Every line of a UTF-8 file (in order; a blank line is the empty sentence), encoded with the
        run's tokeniser, and named by itself."""
        tok = Tokenizer.from_meta(vae.data_meta)
        if path.is_dir():
            raise DataError(f"{path}: is a folder; this run is a text model, expected a UTF-8 text file")
        lines = read_lines(path)
        if not lines:
            raise DataError(f"{path}: no lines to encode (the file is empty)")
        ids, cut = tok.encode_lines(lines)
        if cut:
            warn(f"{path}: {cut} line(s) longer than the run's max_length = {tok.max_length} tokens were cut")
        return torch.from_numpy(ids), lines

    def card_data(self, vae: VAE, summary: dict[str, Any]) -> list[str]:
        return []  # token ids: nothing is scaled or binarised

    def card_usage(self, vae: VAE, load_line: str, top: str) -> list[str]:
        return ["import turbovae", "", load_line, "ids = vae.sample(8)  # token ids (8, T), greedy decoding"]
