"""The run directory: its rules (never replaced without --overwrite, nor continued without --resume),
metrics.jsonl, and ``load`` (the trained model of a run directory)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, from_dict
from ..errors import CheckpointError, ConfigError
from ..vae import VAE
from . import checkpoint
from .setup import build_vae

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "samples.png",
    "reconstructions.png",
    "samples.txt",
    "reconstructions.txt",
    "interpolations.txt",
    "checkpoints",
)


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing run is never replaced without --overwrite, nor continued without --resume."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise CheckpointError(
                f"cannot resume {out}: no config.yaml there (is it a turbovae run directory?)"
            )
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace it, "
            f"--resume {out} to continue it, or --out for a new directory"
        )


def _clear_run(out: Path) -> None:
    """Remove a previous run's files (only those turbovae writes) before an --overwrite run starts."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as written. ``path`` None: a log that writes
    nothing (the ranks other than 0 of a data-parallel run)."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115 - close()

    def echo(self, message: str) -> None:
        """A warning on stderr, once per job (from the rank that writes the log)."""
        if self.file is not None:
            print(f"turbovae: warning: {message}", file=sys.stderr)

    def write(self, event: str, **values: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, **values}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def saved_data_meta(out: Path) -> dict[str, Any] | None:
    """The Dataset.meta the run's checkpoints recorded (the same in all): a resumed run encodes its
    data with the transforms it was trained with, not refitted ones."""
    for path in sorted((out / "checkpoints").glob("step-*.json"), reverse=True):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text()).get("data_meta")
    return None


def prepare_dir(out: Path, cfg: Config, overwrite: bool, resume: bool) -> Path | None:
    """Prepare the run directory; on resume, the checkpoint to continue from (None: from the start)."""
    if resume:
        checkpoint.clean_temporary(out)  # left by a process killed while writing
        return checkpoint.latest(out)
    if overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The trained model of a run directory (newest valid checkpoint), in eval mode.

    The returned VAE has ``encode(x)``, ``decode(z)``, ``sample(n)``, and carries ``config`` (the run's
    Config) and ``max_value`` (inputs are ``stored_values / max_value``).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a turbovae run directory (no config.yaml)")
    try:
        cfg = from_dict(yaml.safe_load(cfg_path.read_text()) or {})
    except yaml.YAMLError as e:
        raise CheckpointError(f"{cfg_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    state_json = checkpoint.latest(run_dir)
    if state_json is None:
        raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}")
    tensors, meta = checkpoint.load(state_json)
    if "event_shape" not in meta:
        raise CheckpointError(f"checkpoint {state_json} does not record the data shape (event_shape)")
    shape = tuple(meta["event_shape"])
    vae = build_vae(cfg, shape, meta.get("data_meta"))
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if cfg.train.ema:  # the weight average is the model the run evaluated and sampled
        weights.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {state_json} does not fit its config: {str(e).splitlines()[0]}"
        ) from None
    vae.config = cfg
    vae.max_value = float(meta.get("max_value", 1.0))
    return vae.to(device).eval()
