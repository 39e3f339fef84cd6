"""Live experiment tracking while training: TensorBoard event files (``train.tensorboard=DIR``) and
MLflow (``train.mlflow=URI``, when mlflow is installed). Scalars at every log interval, pictures at
every per-epoch evaluation. Both are optional extras; a run without them tracks nothing and imports
neither. Only the process that writes the run directory (rank 0) tracks."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import ConfigError


def check_available(cfg: Config) -> None:
    """Raise the one-line error for a tracking option whose package is missing, before anything is
    written (the Tracker itself starts with the training)."""
    for key, module, extra in (("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                               ("mlflow", "mlflow", "mlflow")):  # fmt: skip
        if getattr(cfg.train, key):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"train.{key} needs the {extra} package: pip install 'turbovae[{extra}]'"
                ) from None


class Tracker:
    """Sends a run's scalars and pictures to TensorBoard and/or MLflow as they are logged."""

    def __init__(self, cfg: Config, out: Path, main: bool = True) -> None:
        self.writer: Any = None
        self.mlflow: Any = None
        if not main:
            return
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # an optional extra (check_available)

            self.writer = SummaryWriter(log_dir=str(cfg.train.tensorboard))
        if cfg.train.mlflow:
            import mlflow  # an optional extra (check_available)

            mlflow.set_tracking_uri(cfg.train.mlflow)
            mlflow.set_experiment(cfg.train.mlflow_experiment)
            self.mlflow = mlflow
            self.run = mlflow.start_run(run_name=out.name)
            flat = _flatten(cfg.to_dict())
            mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    @property
    def active(self) -> bool:
        return self.writer is not None or self.mlflow is not None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """``values``: tag -> number (``train/loss``, ``val/nelbo``, ...); non-numbers are skipped."""
        numbers = {k: float(v) for k, v in values.items() if _finite_number(v)}
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)
        if self.mlflow is not None and numbers:
            # MLflow keys allow letters, digits, _ - . / and spaces
            self.mlflow.log_metrics(numbers, step=step)

    def images(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        """``pictures``: tag -> an (H, W) or (H, W, 3) uint8 array."""
        for tag, picture in pictures.items():
            if self.writer is not None:
                self.writer.add_image(tag, picture, step, dataformats="HW" if picture.ndim == 2 else "HWC")
            if self.mlflow is not None:
                self.mlflow.log_image(picture, key=tag.replace("/", "_"), step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
