"""Sharing trained models in the Hugging Face Hub layout: ``save_pretrained`` writes it, ``from_pretrained``
loads it (a local folder, or a Hub repository through ``huggingface_hub``), ``push`` uploads a run.

The layout (``FORMAT``):

- ``config.json``: the run's config, the data's shape (``event_shape``), ``max_value`` (inputs are stored
  values / max_value) and ``data_meta`` (a table's fitted transforms, a text model's vocabulary);
- ``model.safetensors``: the model's weights (the EMA average where the run used one, as ``load`` does);
- ``config.yaml``: the same config as YAML, so that ``turbovae train --config config.yaml`` retrains it;
- ``README.md``: the model card (data, metrics, the training command, usage).

``huggingface_hub`` is optional (``pip install 'turbovae[hub]'``) and imported only to download or upload.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import Config, from_dict, to_yaml
from .data.dataset import available_memory
from .engine.rundir import load
from .engine.setup import build_to_load
from .errors import CheckpointError, ConfigError, shown
from .kinds import kind_of
from .models import model_spec
from .vae import VAE

FORMAT = "turbovae-hub-1"
CONFIG, WEIGHTS, CARD, CONFIG_YAML = "config.json", "model.safetensors", "README.md", "config.yaml"
FILES = (CONFIG, WEIGHTS, CONFIG_YAML, CARD)
# data sets turbovae loads by name that the Hub holds too (the model card's `datasets:`)
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist", "mnist": "ylecun/mnist"}
BUILTIN_DATA = ("digits", "fashion-mnist", "mnist", "words")
# a Hub repository id: NAME or NAMESPACE/NAME of letters, digits, '-', '_' and '.'
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
INSTALL = "pip install 'turbovae[hub]'"


def _version() -> str:
    from . import __version__  # at call time: the package's __init__ imports this module

    return __version__


# ---- writing ----------------------------------------------------------------------------------------


def hub_config(vae: VAE) -> dict[str, Any]:
    """config.json: everything besides the weights that rebuilds the model."""
    if vae.config is None:
        raise ConfigError("the model has no config (vae.config); save a model from turbovae.load or a run")
    return {
        "format": FORMAT,
        "turbovae_version": _version(),
        "model_type": vae.config.model.name,
        "config": shared_config(vae.config).to_dict(),
        "event_shape": list(vae.event_shape),
        "max_value": vae.max_value,
        "latent": vae.latent,
        "data_meta": vae.data_meta,
    }


def shared_config(cfg: Config) -> Config:
    """The config as an exported model shares it: no local path of the machine it was trained on. A data
    file or folder keeps its name only (``csv:/home/me/x.csv`` -> ``csv:x.csv``: the card says to point it
    at your copy); ``data.dir``, ``train.tensorboard`` and ``train.mlflow`` (local folders, or a URI that
    may hold a password) are cleared."""
    shared = copy.deepcopy(cfg)
    name = shared.data.name
    if name not in BUILTIN_DATA:
        kind, sep, path = name.rpartition(":") if re.match(r"^[a-z]+:", name) else ("", "", name)
        shared.data.name = f"{kind}{sep}{Path(path).name or path}"
    shared.data.dir = shared.train.tensorboard = shared.train.mlflow = None
    return shared


def save_pretrained(
    vae: VAE, out: str | Path, run_dir: str | Path | None = None, repo_id: str | None = None
) -> Path:
    """Write ``vae`` in the Hub layout into the folder ``out`` (created if needed). ``run_dir``: the run
    it came from, whose summary.json and eval.json give the model card's metrics; ``repo_id``: the
    repository the card's usage snippet names (default: the folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hub_config(vae)
    weights = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    # one metadata key: safetensors writes a map of several in no fixed order, and the file should not change
    # from one export to the next (the format is in config.json)
    (out / WEIGHTS).write_bytes(st_save(weights, metadata={"format": "pt"}))
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    (out / CONFIG_YAML).write_text(to_yaml(shared_config(vae.config)))
    (out / CARD).write_text(model_card(vae, Path(run_dir) if run_dir else None, repo_id or str(out)))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # also JSON nested deeper than Python recurses
        return {}
    return value if isinstance(value, dict) else {}


def _data_line(name: str) -> str:
    """The data's name as the card shows it: a built-in data set by name, a file by its name only (a
    local path says nothing to a reader and may say too much about the machine)."""
    if name in BUILTIN_DATA:
        return f"`{name}` (built into turbovae)"
    kind, _, path = name.rpartition(":")
    return f"a local {kind or 'file or folder'} `{Path(path).name or name}`"


# the numbers of summary.json and eval.json the card shows: the held-out metrics, not how the run was
# timed, chunked or counted
_SUMMARY_METRICS = re.compile(r"^(test|val)_|^iwae_k$")
_NOT_EVAL_METRICS = re.compile(r"seconds|batch_size|chunk|delta|threshold|^(n|latent)$")


def _metrics(values: dict[str, Any], summary: bool) -> list[tuple[str, str]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not _SUMMARY_METRICS.search(key) if summary else _NOT_EVAL_METRICS.search(key):
            continue
        rows.append(
            (key, f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value))
        )
    return rows


def _front_matter(vae: VAE, data: str) -> str:
    cfg = vae.config
    meta: dict[str, Any] = {
        "library_name": "turbovae",
        "tags": ["turbovae", "vae", "variational-autoencoder", cfg.model.name, kind_of(vae).card_tag(vae)],
    }
    if data in HUB_DATASETS:
        meta["datasets"] = [HUB_DATASETS[data]]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(vae: VAE, run_dir: Path | None, repo_id: str) -> str:
    """README.md: YAML front matter (library, tags, data sets), then the data, the model, the metrics
    of summary.json and eval.json, the command that trains the run again, and how to load it."""
    cfg = vae.config
    summary = _read_json(run_dir / "summary.json") if run_dir else {}
    data = str(summary.get("data", cfg.data.name))
    spec = model_spec(cfg.model.name)
    lines = [
        _front_matter(vae, data),
        f"# turbovae {cfg.model.name} VAE: {Path(data).name}",
        "",
        f"A variational autoencoder trained with [turbovae](https://pypi.org/project/turbovae/) "
        f"{_version()}: {spec.text_of(cfg.model.name, cfg.to_dict()['model'])}, likelihood "
        f"`{cfg.model.likelihood}`, {sum(p.numel() for p in vae.parameters()):,} parameters.",
        *_card_data(vae, data, summary),
        *_card_metrics(summary, _read_json(run_dir / "eval.json") if run_dir else {}),
        "",
        "## Training",
        "",
        f"With `{CONFIG_YAML}` from this repository (the run's whole config):",
        "",
        "```bash",
        f"turbovae train --config {CONFIG_YAML}",
        "```",
    ]
    if data not in BUILTIN_DATA:
        lines += ["", f"`data.name` in `{CONFIG_YAML}` names the file the run read: point it at your copy."]
    lines += _card_usage(vae, repo_id)
    return "\n".join(lines)


def _card_data(vae: VAE, data: str, summary: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Data",
        "",
        f"- {_data_line(data)}: {kind_of(vae).card_tag(vae)} examples of shape {tuple(vae.event_shape)}",
    ]
    if "n_train" in summary:
        lines.append(f"- {summary['n_train']:,} training and {summary.get('n_test', 0):,} test examples")
    return lines + kind_of(vae).card_data(vae, summary)  # how inputs are given (not for text)


def _card_metrics(summary: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    lines = []
    for title, values, source in (
        ("held-out", summary, "summary.json"),
        ("evaluation", evaluation, "eval.json"),
    ):
        rows = _metrics(values, summary=source == "summary.json")
        if rows:
            lines += ["", f"## Metrics: {title} (`{source}`)", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in rows]
    if "epochs" in summary:
        epochs, steps = summary["epochs"], summary.get("steps", "?")
        plural = "" if epochs == 1 else "s"
        lines += ["", f"Trained for {epochs} epoch{plural} ({steps} steps) on {summary.get('device', '?')}."]
    return lines


def _card_usage(vae: VAE, repo_id: str) -> list[str]:
    load_line = f'vae = turbovae.from_pretrained("{repo_id}")'
    group = vae.structure.posterior_group
    top = f" ({group})" if group else ""
    lines = ["", "## Usage", "", "```python", *kind_of(vae).card_usage(vae, load_line, top)]
    return [*lines, "```", "", f"`pip install turbovae`; loading from the Hub needs `{INSTALL}`.", ""]


# ---- reading ----------------------------------------------------------------------------------------


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"this needs the huggingface_hub package: {INSTALL}") from None
    return huggingface_hub


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _download(
    repo_id: str, revision: str | None, token: str | None, cache_dir: str | Path | None, endpoint: str | None
) -> Path:
    hf = _hf()
    try:
        folder = hf.snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            endpoint=endpoint,
            allow_patterns=list(FILES),
        )
    except Exception as e:  # huggingface_hub's HTTP, offline and not-found errors
        raise CheckpointError(
            f"'{repo_id}' is not a local folder, and downloading it from the Hub failed: {_first_line(e)}"
        ) from e
    return Path(folder)


def from_pretrained(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> VAE:
    """A model saved by ``turbovae export --format hub`` / ``turbovae push``, in eval mode.

    Args:
        name_or_path: a local folder in the Hub layout, or a Hub repository id (``user/name``),
            downloaded with ``huggingface_hub.snapshot_download`` (needs ``turbovae[hub]``).
        device: where to put the model.
        revision, token, cache_dir, endpoint: passed to ``snapshot_download`` for a repository id.

    Returns:
        The VAE, as ``turbovae.load`` returns it for the run it came from (same weights, config,
        ``max_value`` and ``data_meta``)."""
    path = Path(name_or_path)
    if not path.is_dir():
        text = str(name_or_path)
        if path.exists() or not REPO_ID.match(text) or ".." in text or "--" in text:
            raise CheckpointError(f"{text} is neither a folder nor a Hub repository id (user/name)")
        path = _download(text, revision, token, cache_dir, endpoint)
    return load_pretrained(path, device)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The model in a local folder in the Hub layout."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file():
        hint = "; it is a run directory: turbovae.load reads it" if (folder / "config.yaml").is_file() else ""
        raise CheckpointError(f"{folder} is not a turbovae model folder (no {CONFIG}){hint}")
    config = _read_json(config_path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a turbovae model config (format {FORMAT} expected)")
    max_value = config.get("max_value", 1.0)
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not 0 < max_value < math.inf:
        raise CheckpointError(f"{config_path}: max_value must be a positive number, got {shown(max_value)}")
    try:
        with open(weights_path, "rb") as f:  # a regular file of a size that fits: not /dev/zero
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"{weights_path} is not a regular file")
            free = available_memory()
            if free is not None and 2 * info.st_size > free:
                raise CheckpointError(
                    f"{weights_path} holds {info.st_size / 2**30:,.1f} GiB, more than the memory available"
                )
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"{weights_path} is unreadable: {e.strerror or e}") from None
    try:
        weights = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{weights_path} is not a valid safetensors file: {_first_line(e)}") from None
    if not isinstance(config.get("config"), dict) or not isinstance(config.get("data_meta") or {}, dict):
        raise CheckpointError(f"{config_path}: its config and data_meta must be JSON objects")
    try:
        cfg = from_dict(config["config"])
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: its config is malformed: {_first_line(e)}") from None
    stored = sum(t.numel() * t.element_size() for t in weights.values())
    vae = build_to_load(cfg, config.get("event_shape"), config.get("data_meta"), stored, str(config_path))
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path} does not fit {config_path}: {_first_line(e)}") from None
    vae.config = cfg
    vae.max_value = float(max_value)
    return vae.to(device).eval()


# ---- uploading --------------------------------------------------------------------------------------


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Upload the trained model of ``run_dir`` to the Hub repository ``repo_id`` (created if it does not
    exist) in the Hub layout; returns the commit's URL. ``api``: an ``HfApi``-like object to use
    instead of ``huggingface_hub.HfApi(endpoint=endpoint, token=token)``."""
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ConfigError(f"'{repo_id}' is not a Hub repository id (expected user/name)")
    if api is None:
        api = _hf().HfApi(endpoint=endpoint, token=token)
    vae = load(run_dir, "cpu")
    with tempfile.TemporaryDirectory(prefix="turbovae-push-") as tmp:
        save_pretrained(vae, tmp, run_dir=run_dir, repo_id=repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                commit_message=commit_message or f"turbovae {_version()}: upload {Path(run_dir).name}",
            )
        except Exception as e:  # huggingface_hub's HTTP and authentication errors, a lost connection
            raise ConfigError(f"could not upload to '{repo_id}': {_first_line(e)}") from e
    return str(getattr(info, "commit_url", info))


__all__ = ["FORMAT", "from_pretrained", "load_pretrained", "model_card", "push", "save_pretrained"]
