"""Live experiment tracking while training: TensorBoard event files (``train.tensorboard=DIR``) and
MLflow (``train.mlflow=URI``, when mlflow is installed). Scalars at every log interval, pictures at
every per-epoch evaluation. Both are optional extras; a run without them tracks nothing and imports
neither. Only the process that writes the run directory (rank 0) tracks."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import ConfigError, clip

# MLflow retries a failed HTTP request 7 times with a backoff factor of 2 (255 s in all) and waits 120 s
# for an answer: a run would stall minutes on a closed port. Fewer and shorter, unless the user set them.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


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


# MLflow retries a failed HTTP request 7 times with a backoff factor of 2 (255 s) and waits 120 s for an
# answer: a training run would stall minutes on a closed port. Fewer and shorter, unless the user set them.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class Tracker:
    """Sends a run's scalars and pictures to TensorBoard and/or MLflow as they are logged.

    Tracking never kills or stalls a run: a backend that fails, at its start or later (a store MLflow
    refuses or cannot reach, a TensorBoard folder that is a file, a full disk), is one warning line on
    stderr, and the run goes on without that backend; the run directory's own files are unaffected."""

    def __init__(self, cfg: Config, out: Path, main: bool = True) -> None:
        self.writer: Any = None
        self.mlflow: Any = None
        if not main:
            return
        if cfg.train.tensorboard:
            self._guarded("tensorboard", self._start_tensorboard, cfg)
        if cfg.train.mlflow:
            self._guarded("mlflow", self._start_mlflow, cfg, out)

    def _start_tensorboard(self, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter  # an optional extra (check_available)

        _quiet_tensorboard_writer_threads()
        self.writer = SummaryWriter(log_dir=str(cfg.train.tensorboard))

    def _start_mlflow(self, cfg: Config, out: Path) -> None:
        for key, value in MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        import mlflow  # an optional extra (check_available)

        # their INFO and WARNING lines (creating tables, a new experiment, no Databricks credentials): a
        # failure is the one warning line of _guarded
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(str(cfg.train.mlflow))
        mlflow.set_experiment(cfg.train.mlflow_experiment)
        self.run = mlflow.start_run(run_name=out.name)
        flat = _flatten(cfg.to_dict())
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def _guarded(self, backend: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """``action(*args, **kwargs)`` for ``backend``; any failure is one warning, and the backend is off."""
        try:
            action(*args, **kwargs)
        except Exception as e:  # MLflow, its HTTP and SQL layers, TensorBoard and the OS raise their own
            lines = str(e).strip().splitlines()
            print(f"turbovae: warning: train.{backend} failed, and the run goes on without it: "
                  f"{type(e).__name__}: {clip(lines[0] if lines else '', 200)}", file=sys.stderr)  # fmt: skip
            self._drop(backend)

    def _drop(self, backend: str) -> None:
        if backend == "tensorboard":
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
        else:
            client, self.mlflow = self.mlflow, None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.end_run(status="FAILED")

    @property
    def active(self) -> bool:
        return self.writer is not None or self.mlflow is not None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """``values``: tag -> number (``train/loss``, ``val/nelbo``, ...); non-numbers are skipped."""
        numbers = {k: float(v) for k, v in values.items() if _finite_number(v)}
        if self.writer is not None:
            self._guarded("tensorboard", _add_scalars, self.writer, numbers, step)
        if self.mlflow is not None and numbers:
            # MLflow keys allow letters, digits, _ - . / and spaces
            self._guarded("mlflow", self.mlflow.log_metrics, numbers, step=step)

    def images(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        """``pictures``: tag -> an (H, W) or (H, W, 3) uint8 array."""
        for tag, picture in pictures.items():
            if self.writer is not None:
                form = "HW" if picture.ndim == 2 else "HWC"
                self._guarded("tensorboard", self.writer.add_image, tag, picture, step, dataformats=form)
            if self.mlflow is not None:
                self._guarded("mlflow", self.mlflow.log_image, picture, key=tag.replace("/", "_"), step=step)

    def close(self) -> None:
        if self.writer is not None:
            self._guarded("tensorboard", self.writer.close)
        if self.mlflow is not None:
            self._guarded("mlflow", self.mlflow.end_run)


def _quiet_tensorboard_writer_threads() -> None:
    """TensorBoard writes its events in a thread of its own: a failure there (a full disk) printed that
    thread's traceback, then the next write or the close re-raises it here, where it is _guarded's one
    warning. Only TensorBoard's writer threads are silenced; any other thread's exception is reported."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another TensorBoard: its traceback, if any, as before
        return
    previous = threading.excepthook
    if getattr(previous, "turbovae_quiet", False):
        return

    def hook(args: Any) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.turbovae_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _add_scalars(writer: Any, numbers: dict[str, float], step: int) -> None:
    for tag, value in numbers.items():
        writer.add_scalar(tag, value, step)


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
