"""``DataKind``: what one kind of data (image, table, text, ...) does differently, as one object.

Code outside ``kinds/`` never asks which kind of data it holds: it asks ``kind_of`` (``kinds/__init__``)
for the kind and calls its methods. The defaults here are those of plain vectors of numbers, drawn as
barcodes (``viz/barcodes.py``); each kind's file overrides what it does differently.

A kind sits beside ``data/`` and ``models/``: it imports the core and ``data/``; the pictures and figures
it owns (``viz/``, ``evaluation/``) are imported inside its methods; it never imports ``engine/`` or
``commands/``: what it needs from them (a ``Setup``, the atomic file writer) comes as an argument.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import runtime
from ..data.arrays import _read, to_channels_first
from ..data.batches import preparer
from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from ..config import Config
    from ..data.dataset import Dataset
    from ..data.tables import Table
    from ..engine.setup import Setup
    from ..vae import VAE

Prepare = Callable[[torch.Tensor], torch.Tensor]
WriteFile = Callable[[Path, bytes], None]  # writes a file atomically (engine/checkpoint.replace_file)


@dataclass
class SampleRequest:
    """What ``turbovae sample`` asks for: ``n`` draws (``n`` of each class of ``classes``, a conditional
    run), E[x | z] (``mean``) or x ~ p(x | z), z ~ N(0, T²I) (``temperature`` T); ``write`` writes a
    file atomically (``engine/checkpoint.replace_file``)."""

    n: int
    generator: torch.Generator
    write: WriteFile
    mean: bool = True
    temperature: float = 1.0
    classes: list[int] | None = None


@dataclass
class ReportOutputs:
    """What a kind adds to a run's report besides the pictures every run has."""

    rows: Table | None = None  # synthetic rows, shown as a table
    texts: dict[str, str] = field(default_factory=dict)  # text outputs by name (samples, ...)
    pictures: dict[str, Path] = field(default_factory=dict)  # more pictures by name (histograms, ...)


class DataKind:
    """A kind of data and everything turbovae does differently for it. One instance per kind, in
    ``KINDS``; a source records the name in ``Dataset.meta["kind"]``, so every checkpoint carries it."""

    name = ""
    # every batch has the same shape: a training step can be captured as a CUDA graph and compiled
    # once, and an epoch is whole batches (text batches are cut to their longest line: they are not)
    fixed_shapes = True
    # the pictures: barcodes coloured by this palette of viz.barcodes.PALETTES (None: image grids), and
    # how the report says to read them
    barcode: str | None = "values"
    legend = "vector runs: one row per example, one cell per value on a fixed scale, blue −1, white 0, red +1"
    # what ``turbovae sample --out`` may end in, and what ``turbovae encode --input`` reads, as their
    # error messages say it
    sample_outs = ".png (a barcode) or .npy"
    inputs = "a .npy or .npz file"

    # ---- sources --------------------------------------------------------------------------------------

    def claims(self, spec: str) -> bool:
        """Whether the data spec ``--data SPEC`` names a source of this kind (the default kind claims
        what no other kind does)."""
        return False

    def preset(self, spec: str) -> str | None:
        """The preset a run of ``--data SPEC`` starts from without ``--config`` (None: the default)."""
        return None

    # ---- batches --------------------------------------------------------------------------------------

    def preparer(self, max_value: float, dynamic: bool, generator: torch.Generator | None) -> Prepare:
        """Stored values → the model's input, per batch: scaled to float by ``max_value`` and, with
        ``dynamic`` binarisation, drawn x ~ Bernoulli(x) from ``generator``."""
        return preparer(max_value, dynamic, generator)

    def lengths(self, x: torch.Tensor) -> torch.Tensor | None:
        """The length of every example (N,), for length-bucketed batches; None: all the same length."""
        return None

    # ---- set-up ---------------------------------------------------------------------------------------

    def check(self, data: Dataset, cfg: Config) -> None:
        """One clear error for a model, likelihood or data option that does not fit these data."""

    def misfit(self, data: Dataset, cfg: Config) -> str | None:
        """The advice to give, instead of the likelihood's own, when the likelihood refuses the data
        (None: the likelihood's own)."""
        return None

    def batch_size(self, data: Dataset, cfg: Config, n_train: int) -> int:
        """The batch a run on ``n_train`` training examples uses (``cfg.train.batch_size`` as asked)."""
        return cfg.train.batch_size

    def take_condition(self, data: Dataset, condition: str) -> None:
        """A conditional run (``data.condition``): check the condition, and give ``data`` its class ids
        0..K-1 in ``y_train``/``y_test`` and what they mean in ``meta["condition"]``."""
        raise ConfigError(f"data.condition is for images, vectors and tables, not {self.name}")

    # ---- evaluation -----------------------------------------------------------------------------------

    def final_metrics(
        self, s: Setup, ev: dict[str, float], iw: dict[str, Any], loop: dict[str, Any]
    ) -> dict[str, Any]:
        """What summary.json adds for these data, from the final test NELBO ``ev`` and IWAE ``iw``."""
        return {}

    def eval_metrics(self, result: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        """What ``turbovae eval`` adds to its ``result`` for the evaluated examples ``x``."""
        return {}

    def real_rows(self, vae: VAE, real: str | None, run: str) -> tuple[Table | None, Table, str]:
        """``eval --fidelity``: (the real training rows or None, the real rows to compare with, what
        they are); only data with columns have rows."""
        raise DataError(f"{run}: --fidelity is for runs trained on a table (csv:PATH)")

    # ---- outputs --------------------------------------------------------------------------------------

    def write_pictures(self, s: Setup, out: Path) -> None:
        """samples.png and reconstructions.png of a trained run, with whatever else its data show
        (the model is in eval mode). Barcodes: 32 samples and 12 reconstructions, one row each."""
        from ..viz.barcodes import reconstruction_barcode, sample_barcode

        vae, palette = s.vae, self.barcode or "values"
        samples = vae.sample(32, generator=runtime.generator(s.device, 7))
        x = s.prepare_test(s.x_test[:12])
        sample_barcode(samples, palette).save(out / "samples.png", format="PNG")
        recon = vae.reconstruct(x, None if s.y_test is None else s.y_test[: len(x)])
        reconstruction_barcode(x, recon, palette).save(out / "reconstructions.png", format="PNG")

    def tracked_pictures(self, s: Setup) -> dict[str, np.ndarray]:
        """The pictures live tracking shows at each evaluation, as uint8 arrays by name (none here)."""
        return {}

    def report_outputs(self, s: Setup, figures: Path) -> ReportOutputs:
        """What the report shows of these data besides the pictures every run has."""
        return ReportOutputs()

    def samples_path(self, run_dir: Path, n: int) -> Path | None:
        """Where ``turbovae sample`` writes without ``--out`` (None: standard output)."""
        return run_dir / f"samples-{n}.png"

    def write_samples(self, vae: VAE, out: Path | None, ask: SampleRequest) -> str:
        """``turbovae sample``: the draws ``ask`` asks for into ``out``, a picture (.png) or the values
        (.npy); returns what the command prints."""
        if out is None or out.suffix not in (".png", ".npy"):
            raise ConfigError(f"--out must end in {self.sample_outs}, got {out}")
        device = next(vae.parameters()).device
        n, classes = ask.n, ask.classes
        y = None if classes is None else torch.tensor(classes, device=device).repeat_interleave(n)
        x = vae.sample(n if y is None else len(y), generator=ask.generator, mean=ask.mean,
                       temperature=ask.temperature, condition=y).cpu()  # fmt: skip
        if out.suffix == ".npy":
            buffer = io.BytesIO()
            np.save(buffer, x.numpy())
            ask.write(out, buffer.getvalue())
        else:
            self.save_samples(vae, x, out, n, classes)
        return str(out)

    def save_samples(self, vae: VAE, x: torch.Tensor, out: Path, n: int, classes: list[int] | None) -> None:
        """Samples ``x`` as a picture: one barcode row each."""
        from ..viz.barcodes import sample_barcode

        out.parent.mkdir(parents=True, exist_ok=True)
        sample_barcode(x, self.barcode or "values").save(out, format="PNG")

    def read_input(self, vae: VAE, path: Path) -> tuple[torch.Tensor, list[str]]:
        """``turbovae encode``: the inputs in ``path`` as the run's model takes them, and a name for
        each row. Here: a ``.npy`` file (one array) or a ``.npz`` file (its ``x`` array, or its only one);
        integers are divided by the run's ``max_value`` (as in training), floats are taken as they are."""
        if path.suffix.lower() not in (".npy", ".npz"):
            raise DataError(f"{path}: expected {self.inputs}")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        x = self.shaped(vae, array_input(vae, path), path)
        return x, [str(i) for i in range(len(x))]

    @staticmethod
    def shaped(vae: VAE, x: torch.Tensor, path: Path) -> torch.Tensor:
        """Inputs ``x`` in the run's event shape (the same number of values per row, reshaped)."""
        if tuple(x.shape[1:]) != tuple(vae.event_shape):
            if x[0].numel() == int(np.prod(vae.event_shape)):
                return x.reshape(len(x), *vae.event_shape)
            raise DataError(
                f"{path}: inputs of shape {tuple(x.shape[1:])}, "
                f"but the run's model takes {tuple(vae.event_shape)}"
            )
        return x

    # ---- the model card (hub.py) ----------------------------------------------------------------------

    def card_tag(self, vae: VAE) -> str:
        """The card's tag for the data (and how its data line names them)."""
        return self.name

    def card_data(self, vae: VAE, summary: dict[str, Any]) -> list[str]:
        """The card's lines about how inputs are given."""
        binarize = summary.get("binarize", vae.config.data.binarize if vae.config else "none")
        return [f"- inputs: the stored values divided by {vae.max_value:g}; binarisation: {binarize}"]

    def card_usage(self, vae: VAE, load_line: str, top: str) -> list[str]:
        """The card's usage snippet (``top``: what the posterior means are of, for a hierarchical VAE)."""
        return ["import turbovae", "", load_line, "x = vae.sample(16)  # the values, as trained on"]


def array_input(vae: VAE, path: Path) -> torch.Tensor:
    """The array of a ``.npy``/``.npz`` file as floats: integers divided by the run's ``max_value``."""
    arrays = _read(path)
    if len(arrays) == 1:
        (x,) = arrays.values()
    elif "x" in arrays:
        x = arrays["x"]
    else:
        raise DataError(
            f"{path}: holds arrays {', '.join(sorted(arrays))}; expected one array, or one named x"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.ndim < 2:
        raise DataError(f"{path}: has shape {x.shape} and dtype {x.dtype}, expected numeric (N, ...) data")
    if x.ndim > 2:
        x = to_channels_first(x, str(path))
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: contains NaN or Inf values")
        return torch.from_numpy(x.astype(np.float32))
    return torch.from_numpy(x.astype(np.float32) / vae.max_value)
