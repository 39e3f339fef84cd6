"""Configuration: dataclasses with defaults, YAML presets by name, dotted overrides, validation.

Resolution order (later wins): defaults → ``--config`` preset or file → CLI flags → ``key=value``
overrides such as ``train.lr=3e-4``. The resolved config is written to ``config.yaml`` in the run.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, clip, shown, unknown_name
from .likelihoods import LIKELIHOODS
from .models import ACTIVATIONS, MODELS, TEXT_MODELS, MLPConfig, ModelConfig
from .objectives import OBJECTIVES


@dataclass
class DataConfig:
    name: str = "digits"  # built-in name, a .npz/.npy file, or a folder of images
    # auto: dynamic when the likelihood needs binary data and the data are not, else none;
    # static: one fixed Bernoulli draw of the data; dynamic: a fresh draw per batch (the usual (F)MNIST setup)
    binarize: str = "auto"
    resize: str | None = None  # "HxW" for image folders of mixed sizes
    # photos of any size cut into N×N crops: training photos into crops on a grid of stride N/2 (a batch
    # draws random ones), held-out photos into non-overlapping crops; 0: whole images
    crop: int = 0
    test_fraction: float = 0.1  # held-out share for sources without a test split
    # share of the training split held out for validation (per-epoch evaluation, `best`, tune's search),
    # at most VALIDATION_MAX examples, drawn with a fixed seed; 0: none (no per-epoch evaluation, no best)
    validation: float = 0.1
    dir: str | None = None  # where to look for / download files (fashion-mnist, mnist)
    # tables (csv:PATH): declared column types by name, {name: continuous|integer|categorical|boolean|drop}
    # (the others are inferred); also "name:type,name:type" on the command line
    columns: dict[str, str] = field(default_factory=dict)
    # tables: mode (TVAE's mode-specific normalisation) | quantile (Φ⁻¹ of the training ranks)
    continuous_transform: str = "mode"
    # text (text:PATH, words): auto (characters for `words`, words otherwise) | char | word
    tokenizer: str = "auto"
    max_length: int = 64  # text: tokens kept per line; longer lines are cut, and counted
    min_freq: int = 1  # text: occurrences in the training split a token needs to enter the vocabulary
    # conditional generation (a CVAE): '' (none) | label (the source's labels: npz y, IDX labels, digits,
    # image sub-folders) | a table's categorical COLUMN (then not generated: given, by --where)
    condition: str = ""
    # tables: rules between columns every sampled row keeps (docs/tables.md#constraints), e.g.
    # ["price > 0", "0 <= carat <= 5", "start <= end", "total = a + b", "fixed(city, country)"];
    # on the command line separated by ';'
    constraints: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    # adam | adamw | adamax | sgd | schedulefree (AdamW without a schedule, evaluating its own weight
    # average: Defazio et al. 2024; eager only)
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd's momentum (Nesterov)
    # adam, adamw, adamax and schedulefree: (β₁, β₂), the decays of the first and second moments
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # the learning rate over the run: constant | warmup-cosine (linear warm-up over train.warmup_steps, then
    # cosine decay to train.final_lr of train.lr) | one-cycle (Smith 2018: up from lr/25 over the first
    # 30%, then cosine down to lr/1e4)
    schedule: str = "constant"
    warmup_steps: int = 0  # linear warm-up of the learning rate (constant and warmup-cosine)
    final_lr: float = 0.01  # warmup-cosine: the last step's lr as a fraction of train.lr
    ema: float = 0.0  # decay of an exponential moving average of the weights, used to evaluate and sample
    clip_grad: float = 0.0  # clip the gradient's global norm to this (0: no clipping)
    # differential privacy (DP-SGD, opacus' accountant; docs/tables.md#differential-privacy): the ε the whole
    # run may spend (0: not private), at δ = dp_delta; each example's gradient clipped to dp_max_grad_norm
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    # skip a step whose gradient norm exceeds this many times the run's running mean norm (0: never);
    # the mean adapts, so a lasting change of scale is followed, not skipped forever
    skip_grad: float = 0.0
    # steps with a NaN/Inf gradient are always skipped; this many in a row roll the run back to its last
    # good state with half the learning rate (reported in metrics.jsonl)
    nan_patience: int = 5
    noise_scale_every: int = 0  # steps between gradient-noise-scale probes (0: train.log_every; <0: off)
    objective: str = "elbo"  # a key of objectives.OBJECTIVES
    beta: float = 1.0  # KL weight of the β-ELBO
    kl_warmup_steps: int = 0  # β rises linearly from 0 to train.beta over these steps (0: no warm-up)
    # cyclical annealing (Fu et al. 2019): β rises from 0 over the first half of each of these cycles
    kl_cycles: int = 0
    free_bits: float = 0.0  # λ: nats per latent dimension the loss does not charge (Kingma et al. 2016)
    iwae_k: int = 5  # samples of the iwae objective
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast where the hardware runs bf16 matmuls natively (CUDA, AMX/AVX512-BF16 CPUs),
    # else fp32; on such a CPU the faster of the two, timed at the start (engine/hardware.py); fp16
    # uses a gradient scaler. Likelihood sums, KL and log-sum-exp always run in fp32.
    precision: str = "auto"
    # auto: compile the training step when the run is long enough to repay the (measured or cached)
    # compile time; on CUDA compiled steps run as CUDA graphs
    compile: str = "auto"
    # on CUDA, replay the whole step (forward, backward, optimiser) as one CUDA graph: one launch a step.
    # Needs fixed shapes (not text) and no gradient scaler (not fp16); the step is exact either way
    cuda_graph: bool = True
    # data-parallel (torchrun): train.batch_size is per rank; the lr is scaled for the global batch:
    # auto (x sqrt(N) for adam/adamw/adamax, x N for sgd) | sqrt | linear | none
    lr_scaling: str = "auto"
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before the job stops
    threads: int = 0  # CPU threads; 0 = auto: 1 or torch's default, timed, and following the load
    log_every: int = 50  # steps between loss read-backs (the only host syncs of the loop)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch
    # seconds of training (train_seconds, evaluation excluded) after which the run stops at the next log
    # interval, then evaluates and writes as at the end; 0 = none. The schedules still span train.epochs
    time_limit: float = 0.0
    # stop after this many steps in all (0: none), mid-epoch if it falls there, then evaluate and write as
    # at the end; the schedules span min(epochs x steps per epoch, max_steps)
    max_steps: int = 0
    keep_checkpoints: int = 2  # most recent checkpoints kept
    # live tracking while training (engine/tracking.py): a TensorBoard log directory, an MLflow tracking
    # URI (e.g. sqlite:///mlflow.db) and the MLflow experiment's name
    tensorboard: str | None = None
    mlflow: str | None = None
    mlflow_experiment: str = "turbovae"


@dataclass
class EvalConfig:
    iwae_k: int = 100  # importance samples for the test log-likelihood in summary.json; 0 skips it
    batch_size: int = 1000
    every_epoch: bool = True  # test NELBO after every epoch (not counted in train_seconds)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    # the family's own dataclass (models/<family>.py: MLPConfig, ConvConfig ...), chosen by model.name
    model: ModelConfig = field(default_factory=MLPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES = {
    "data.binarize": ("auto", "none", "static", "dynamic"),
    "data.continuous_transform": ("mode", "quantile"),
    "train.optimizer": ("adam", "adamw", "adamax", "sgd", "schedulefree"),
    "train.schedule": ("constant", "warmup-cosine", "one-cycle"),
    "train.lr_scaling": ("auto", "sqrt", "linear", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile": ("auto", "on", "off"),
    "data.tokenizer": ("auto", "char", "word"),
}


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("turbovae.configs").iterdir() if p.name.endswith(".yaml")
    )


MAX_YAML_BYTES = 1 << 20  # a config is a few hundred bytes; a larger file is not one
MAX_YAML_NODES = 100_000  # values and keys of a document once its aliases are expanded
MAX_STRING = 4096  # characters of one string value (PATH_MAX on Linux)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document that expands past MAX_YAML_NODES nodes: aliases share
    nodes, so a few hundred bytes can stand for a billion values ("billion laughs")."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes of ``root`` as if every alias were copied out, without copying: each shared node's
    expanded size is computed once (children before parents, by an explicit stack)."""
    size: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        if not children_done and id(node) in entered:  # reached again below itself
            raise ConfigError("YAML document holds a recursive alias (a value that contains itself)")
        entered.add(id(node))
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if not children_done:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
            continue
        size[id(node)] = 1 + sum(size.get(id(k), 1) for k in kids)
        if size[id(node)] > MAX_YAML_NODES:
            raise ConfigError(
                f"YAML document expands to more than {MAX_YAML_NODES:,} values (aliases repeating aliases, "
                "as in a 'billion laughs' bomb); a config needs no more than a few hundred"
            )


def load_yaml(text: str) -> Any:
    """Parse YAML as a config (safe tags only, aliases expanding to at most MAX_YAML_NODES values)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"YAML text of {len(text):,} characters is too long for a config")
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: safe tags only


def _read_yaml(path: Path | Any, label: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"config file {label} is {len(raw):,} bytes, too large for a config")
        data = load_yaml(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {label}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {label} is not UTF-8 text (byte {shown(e.object[e.start : e.start + 1])} at "
            f"offset {e.start})"
        ) from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of 5,000 digits
        raise ConfigError(
            f"config file {label} is not valid YAML: {clip((str(e).splitlines() or [type(e).__name__])[0])}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {label} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``fmnist-mlp``) or a YAML file path, as a nested dict."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return _read_yaml(path, str(path))
    names = preset_names()
    if name_or_path not in names:
        raise unknown_name("config preset", name_or_path, names)
    return _read_yaml(resources.files("turbovae.configs") / f"{name_or_path}.yaml", name_or_path)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field's type, or a ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is dict:
        if isinstance(value, str):  # "name:type,name:type"
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple):  # ["name:type", ...]
            pairs = [str(v).rpartition(":") for v in value]
            if any(not sep or not name.strip() for name, sep, _ in pairs):
                raise ConfigError(
                    f"{key} must map names to values, e.g. 'age:integer,sex:categorical'; got {shown(value)}"
                )
            value = {name.strip(): v.strip() for name, _, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {shown(value)}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str) and key == "data.constraints":  # rules hold commas and spaces
            value = [v.strip() for v in value.split(";") if v.strip()]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {shown(value)}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, bool | dict | list | tuple):
            raise ConfigError(f"{key} must be an integer, got {shown(value)}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {shown(value)}") from None
    if hint is float:
        if isinstance(value, bool | dict | list | tuple):
            raise ConfigError(f"{key} must be a number, got {shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be a number, got {shown(value)}") from None
    if hint is str:
        if isinstance(value, dict | list | tuple):
            raise ConfigError(f"{key} must be a string, got {shown(value)}")
        if isinstance(value, bool):  # YAML 1.1 reads `compile: off` as False: the user meant "off"
            return "on" if value else "off"
        text = str(value)
        if len(text) > MAX_STRING:
            raise ConfigError(
                f"{key} is {len(text):,} characters long, more than {MAX_STRING}: {shown(text)}"
            )
        return text
    raise AssertionError(f"unsupported config type {hint} for {key}")


# the names other libraries give to config keys, for "did you mean" (only those naming a key of the
# section in question are suggested)
KEY_ALIASES = {
    "learning_rate": "lr", "learningrate": "lr", "lr_rate": "lr", "eta": "lr",
    "batchsize": "batch_size", "bs": "batch_size", "batch": "batch_size", "minibatch_size": "batch_size",
    "latent_dim": "latent", "latent_size": "latent", "latent_dims": "latent", "z_dim": "latent",
    "zdim": "latent", "n_latent": "latent", "num_latent": "latent", "code_size": "latent",
    "n_epochs": "epochs", "num_epochs": "epochs", "epoch": "epochs", "max_epochs": "epochs",
    "hidden_dims": "hidden", "hidden_sizes": "hidden", "hidden_size": "hidden", "hidden_dim": "hidden",
    "layers": "hidden", "wd": "weight_decay", "l2": "weight_decay", "kl_weight": "beta",
    "scheduler": "schedule", "lr_schedule": "schedule", "lr_scheduler": "schedule",
    "warmup": "warmup_steps", "grad_clip": "clip_grad", "max_grad_norm": "clip_grad",
    "clip_grad_norm": "clip_grad", "random_seed": "seed", "log_interval": "log_every",
    "num_threads": "threads", "k": "iwae_k", "num_samples": "iwae_k", "iwae_samples": "iwae_k",
    "dataset": "name", "path": "name", "distribution": "likelihood",
    "decoder_likelihood": "likelihood", "architecture": "name", "arch": "name",
}  # fmt: skip


def _model_hints() -> dict[str, Any]:
    """model.* key -> its type, over the options of every model family (a key has one type in all)."""
    hints: dict[str, Any] = {}
    for spec in MODELS.values():
        hints.update(typing.get_type_hints(spec.config))
    return hints


def _hints(section: str) -> dict[str, Any]:
    """key -> type of a config section ({} for no section)."""
    if section == "model":
        return _model_hints()
    cls = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(cls) if cls is not None else {}


@dataclass
class _ModelDraft:
    """The ``model`` section while a config is resolved: each model.* value as last set, and which keys a
    flag or a key=value named (``explicit``) rather than a preset or a file. ``build`` makes the dataclass
    of the family the last ``model.name`` names, so that a key's last value wins whatever the order of
    the name and the key, as when every family's options were one dataclass. Keys of another family are
    dropped where a preset or a file carried them (the config.yaml of a run written before the families
    had dataclasses of their own holds all of them) and refused where they were named explicitly."""

    values: dict[str, Any] = field(default_factory=dict)
    explicit: set[str] = field(default_factory=set)
    hints: dict[str, Any] = field(default_factory=_model_hints)  # every family's options

    def set(self, key: str, value: Any, explicit: bool) -> None:
        if key not in self.hints:
            raise unknown_name("config key in 'model'", key, list(self.hints), KEY_ALIASES)
        self.values[key] = value
        if explicit:  # flags and overrides come after the preset and the file
            self.explicit.add(key)

    def build(self) -> ModelConfig:
        name = _coerce("model.name", self.values.get("name", Config().model.name), str)
        if name not in MODELS:
            raise unknown_name("model", name, MODELS)
        family = MODELS[name].config
        hints = typing.get_type_hints(family)
        stray = [k for k in self.values if k not in hints and k in self.explicit]
        if stray:
            raise ConfigError(
                f"model.{stray[0]} is not an option of model '{name}', whose options are: {', '.join(hints)}"
            )
        return family(**{k: _coerce(f"model.{k}", v, hints[k]) for k, v in self.values.items() if k in hints})


def _set(cfg: Config, dotted: str, value: Any, model: _ModelDraft, explicit: bool) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in fields(Config)}
    if section_name not in sections or not key:
        raise unknown_name("config section", section_name if key else dotted, sections)
    if section_name == "model":
        model.set(key, value, explicit)
        return
    hints = _hints(section_name)
    if key not in hints:
        raise unknown_name(f"config key in '{section_name}'", key, [f"{k}" for k in hints], KEY_ALIASES)
    setattr(getattr(cfg, section_name), key, _coerce(dotted, value, hints[key]))


def _apply(cfg: Config, nested: dict[str, Any], model: _ModelDraft) -> None:
    """Apply a nested mapping {section: {key: value}} (a preset or a saved config) onto ``cfg``."""
    for section_name, values in nested.items():
        if not isinstance(values, dict):
            if section_name in {f.name for f in fields(Config)}:
                raise ConfigError(f"config section '{section_name}' must be a mapping, got {shown(values)}")
            _set(cfg, str(section_name), values, model, False)  # raises the unknown-name error
            continue
        for key, value in values.items():
            _set(cfg, f"{section_name}.{key}", value, model, False)


# where a setting named without its section is looked for, in this order (``batch_size``: the training
# batch; ``eval.batch_size`` names the other)
SETTING_SECTIONS = ("train", "model", "data", "eval")


def setting_key(name: str) -> str:
    """The dotted config key a Python setting names (``TableSynthesizer(epochs=300)``): a dotted key as
    it is, a bare key in the first of SETTING_SECTIONS that has it (``epochs`` → ``train.epochs``,
    ``latent`` → ``model.latent``, ``columns`` → ``data.columns``); else one ConfigError."""
    if "." in name:
        section, _, key = name.partition(".")
        if key in _hints(section):
            return name
    else:
        for section in SETTING_SECTIONS:
            if name in _hints(section):
                return f"{section}.{name}"
    key = name.rpartition(".")[2]
    known = {k for s in SETTING_SECTIONS for k in _hints(s)}
    alias = KEY_ALIASES.get(key.lower())
    close = [alias] if alias in known else difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown setting {shown(name)}: settings are config keys, as section.key or the key alone "
        f"(epochs, batch_size, lr, latent, columns, condition ...; docs/training.md lists them){hint}"
    )


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` → ("train.lr", 0.0003). Values are parsed as YAML scalars, except for string
    keys, which take the text as typed (``train.compile=off`` is "off", not YAML's False)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.lr=3e-4")
    key = key.strip()
    section, _, name = key.partition(".")
    if _hints(section).get(name) in (str, str | None) and raw:
        return key, raw.strip()
    try:
        value = load_yaml(raw) if raw.strip() else raw
    except (yaml.YAMLError, ConfigError):
        value = raw
    return key, value


def resolve(
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or ``base``, a saved config) → preset → flags → overrides, then validated. The model
    section becomes the dataclass of the family that ``model.name`` names (see ``_ModelDraft``)."""
    cfg, model = Config(), _ModelDraft()
    if base is not None:
        _apply(cfg, base, model)
    if preset:
        _apply(cfg, load_preset(preset), model)
    for key, value in (flags or {}).items():
        if value is not None:
            _set(cfg, key, value, model, True)
    for text in overrides or []:
        _set(cfg, *parse_override(text), model, True)
    cfg.model = model.build()
    validate(cfg)
    return cfg


def parse_resize(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise ConfigError(f"data.resize must look like HxW (e.g. 32x32), got {shown(text)}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"data.resize must be positive, got {shown(text)}")
    return h, w


def validate(cfg: Config) -> None:
    """Raise ConfigError for values that cannot work; names are checked where they are built too."""

    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise unknown_name(key, value, options)
    for key, value, registry in (
        ("model", cfg.model.name, MODELS),
        ("likelihood", cfg.model.likelihood, LIKELIHOODS),
        ("activation", cfg.model.activation, ACTIVATIONS),
        ("objective", cfg.train.objective, OBJECTIVES),
    ):
        if value not in registry:
            raise unknown_name(key, value, registry)
    family = MODELS[cfg.model.name].config
    if not isinstance(cfg.model, family):  # model.name set by hand on another family's dataclass
        raise ConfigError(
            f"model.name is '{cfg.model.name}' but the model section is a {type(cfg.model).__name__}, not a "
            f"{family.__name__}: resolve the config with the new name (resolve(overrides=['model.name=...']))"
        )
    positive = {
        "model.latent": cfg.model.latent,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr,
        "train.iwae_k": cfg.train.iwae_k,
        "train.log_every": cfg.train.log_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "eval.batch_size": cfg.eval.batch_size,
        "model.likelihood_scale": cfg.model.likelihood_scale,
        "data.max_length": cfg.data.max_length,
        "data.min_freq": cfg.data.min_freq,
        "model.mixtures": cfg.model.mixtures,
    }
    for key, value in positive.items():
        if not value > 0:  # also catches NaN
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "train.beta": cfg.train.beta,
        "train.weight_decay": cfg.train.weight_decay,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.threads": cfg.train.threads,
        "eval.iwae_k": cfg.eval.iwae_k,
        "train.kl_warmup_steps": cfg.train.kl_warmup_steps,
        "train.free_bits": cfg.train.free_bits,
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.clip_grad": cfg.train.clip_grad,
        "train.time_limit": cfg.train.time_limit,
        "train.max_steps": cfg.train.max_steps,
        "train.kl_cycles": cfg.train.kl_cycles,
    }
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in {**positive, **non_negative}.items():  # inf: a loss or a schedule of infinities
        if value == float("inf") and key != "train.time_limit":
            raise ConfigError(f"{key} must be finite, got {value}")
    for key, value, low, high in (
        ("train.momentum", cfg.train.momentum, 0, 0.9999),
        ("train.final_lr", cfg.train.final_lr, 0, 1),
        ("train.ema", cfg.train.ema, 0, 0.9999999),
    ):
        if not low <= value <= high:
            raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
    _check_training(cfg)
    _check_model_and_data(cfg)
    if cfg.train.device not in ("auto", "cpu", "cuda") and not cfg.train.device.startswith("cuda:"):
        raise unknown_name("device", cfg.train.device, ("auto", "cpu", "cuda"))
    parse_resize(cfg.data.resize)
    if cfg.data.crop < 0 or (0 < cfg.data.crop < 8):
        raise ConfigError(f"data.crop must be 0 (whole images) or at least 8 pixels, got {cfg.data.crop}")


def _check_training(cfg: Config) -> None:
    """The training options' own rules and the combinations that cannot work."""
    if not (cfg.train.skip_grad == 0 or cfg.train.skip_grad > 1):
        raise ConfigError(
            f"train.skip_grad is a multiple of the running gradient norm: 0 (off) or > 1, "
            f"got {cfg.train.skip_grad}"
        )
    if not cfg.train.dist_timeout > 0:
        raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {cfg.train.dist_timeout}")
    if cfg.train.nan_patience < 1:
        raise ConfigError(f"train.nan_patience must be >= 1, got {cfg.train.nan_patience}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas must be two decays in [0, 1), as [0.9, 0.999]; got {betas}")
    if cfg.train.optimizer == "schedulefree" and cfg.train.schedule != "constant":
        raise ConfigError(
            "train.optimizer=schedulefree replaces the learning-rate schedule: use train.schedule=constant "
            "(train.warmup_steps still warms it up)"
        )
    if cfg.train.optimizer == "schedulefree" and cfg.train.ema:
        raise ConfigError("train.optimizer=schedulefree evaluates its own weight average: set train.ema=0")
    if cfg.train.kl_cycles and cfg.train.kl_warmup_steps:
        raise ConfigError("train.kl_cycles and train.kl_warmup_steps are two KL schedules: set one of them")
    if cfg.train.objective != "elbo" and (
        cfg.train.kl_warmup_steps or cfg.train.free_bits or cfg.train.kl_cycles
    ):
        raise ConfigError(
            "train.kl_warmup_steps, kl_cycles and free_bits shape the ELBO's KL term: use "
            "train.objective=elbo, "
            f"or set them to 0 for '{cfg.train.objective}'"
        )


def _check_model_and_data(cfg: Config) -> None:
    """The text model/likelihood pairing, the data split, and the model family's own options."""
    text_model, text_likelihood = cfg.model.name in TEXT_MODELS, cfg.model.likelihood == "categorical"
    if text_model != text_likelihood:
        raise ConfigError(
            f"model '{cfg.model.name}' with likelihood '{cfg.model.likelihood}': text needs --model "
            f"{'|'.join(TEXT_MODELS)} with --likelihood categorical (the categorical likelihood is for text)"
        )
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if not 0 <= cfg.data.validation < 1:
        raise ConfigError(f"data.validation must be in [0, 1), got {cfg.data.validation}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    cfg.model.check()  # the family's own options (models/<family>.py)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_dict(nested: dict[str, Any]) -> Config:
    """A saved (resolved) config back into dataclasses, validated."""
    return resolve(base=nested)


__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "from_dict",
    "load_preset",
    "preset_names",
    "resolve",
    "to_yaml",
]
