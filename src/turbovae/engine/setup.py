"""Everything built from a config before the first step: the data, checked, and the VAE (``setup``);
user errors in config or data surface here, before any file is written."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import conditioning, runtime
from ..config import Config, parse_resize
from ..data import Dataset, load_dataset
from ..data.batches import binarize, class_means, mean_value, value_range
from ..errors import CheckpointError, ConfigError, DataError, clip, shown
from ..kinds import DataKind, kind_of
from ..likelihoods import build_likelihood
from ..models import build_network, model_spec
from ..vae import VAE
from . import distributed

if TYPE_CHECKING:
    from ..data.tables import Table


@dataclass
class Setup:
    """Everything built from a config before the first step."""

    cfg: Config
    device: torch.device
    data: Dataset
    # on the device, stored dtype (uint8 stays uint8); memory-mapped data (data.mapped): a view of the file
    # on the host, gathered per batch (data.batches.gather)
    x_train: torch.Tensor
    x_test: torch.Tensor  # on the device; fixed binarisation under dynamic binarisation
    train_max: float
    test_max: float
    binarize_mode: str  # resolved: none | static | dynamic
    vae: VAE
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    # the validation split, held out of the training data (0 rows: data.validation = 0); a fixed draw
    # under binarisation, like the test split
    x_val: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    val_max: float = 1.0
    # a conditional run (data.condition): the class ids (N,) int64 of every split, on the device, split
    # exactly as the x's (the validation rows held out of the training rows); None otherwise
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def labels(self, name: str) -> torch.Tensor | None:
        """The class ids of split ``name`` (test, val or train) of a conditional run, else None."""
        return {"test": self.y_test, "val": self.y_val, "train": self.y_train}[name]

    @property
    def kind(self) -> DataKind:
        """What kind of data these are (image, table, text): what the run does differently for them."""
        return kind_of(self.data)

    def prepare_test(self, raw: torch.Tensor) -> torch.Tensor:
        return self.kind.preparer(self.test_max, False, None)(raw)

    def prepare_val(self, raw: torch.Tensor) -> torch.Tensor:
        return self.kind.preparer(self.val_max, False, None)(raw)

    @property
    def mapped(self) -> bool:
        """The training rows are a memory-mapped file's, on the host (see ``data/arrays.py``)."""
        return self.data.mapped

    @property
    def has_validation(self) -> bool:
        return len(self.x_val) > 0

    def split(self, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(data, prepare) to evaluate a split on (test, val or train): binary data stay a fixed draw, so
        numbers repeat."""
        if name == "test":
            return self.x_test, self.prepare_test
        if name == "val":
            if not self.has_validation:
                raise ConfigError("this run has no validation split (data.validation = 0)")
            return self.x_val, self.prepare_val
        if self.binarize_mode == "dynamic":
            return binarize(self.x_train, self.train_max, seed=3), self.kind.preparer(1.0, False, None)
        return self.x_train, self.kind.preparer(self.train_max, False, None)


VALIDATION_MAX = 5000  # examples: 10% of 60,000 would be 6,000
VALIDATION_SEED = 0  # the split is a property of the data, the same for every training seed


def validation_size(n: int, share: float) -> int:
    """How many of ``n`` training examples the validation split holds: ``share``, at most VALIDATION_MAX."""
    return min(VALIDATION_MAX, round(share * n)) if share > 0 else 0


def validation_split(n: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices of ``n`` training examples: ``share`` of them, at most
    VALIDATION_MAX, drawn with a fixed seed; both in their original order."""
    n_val = validation_size(n, share)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[n_val:].sort().values, order[:n_val].sort().values


def held_out(data: Dataset, share: float) -> tuple[torch.Tensor | slice, torch.Tensor | slice, int]:
    """(training rows, validation rows, how many of those) of ``data.x_train``: ``validation_split``'s,
    or for memory-mapped data the last rows (slices: the training rows stay a view of the file)."""
    n = len(data.x_train)
    n_val = validation_size(n, share)
    if data.mapped:
        return slice(0, n - n_val), slice(n - n_val, n), n_val
    fit_idx, val_idx = validation_split(n, share)
    return fit_idx, val_idx, n_val


def resolve_binarize(mode: str, likelihood_support: str, binary: bool) -> str:
    if mode == "auto":
        return "dynamic" if likelihood_support == "binary" and not binary else "none"
    return mode


def check_binarised_bytes(cfg: Config, data: Dataset, likelihood: Any, mode: str) -> None:
    """An 8-bit likelihood (a mass over 256 values: categorical-256, discretized-logistic) on binarised
    data would score two of its 256 values and say nothing: refuse, and say what the data are."""
    if mode == "none" or not (likelihood.discrete and likelihood.support == "unit"):
        return
    levels = data.meta.get("levels")
    stored = ""
    if levels and levels != 256:
        stored = f"; '{data.name}' has {levels} levels (0..{levels - 1}), not 256"
    raise ConfigError(
        f"likelihood '{cfg.model.likelihood}' scores 8-bit values, but data.binarize = {cfg.data.binarize} "
        f"makes the data 0/1{stored}: use --likelihood bernoulli for binarised data, or --binarize none "
        "with an 8-bit likelihood on 8-bit images"
    )


def build_vae(cfg: Config, event_shape: tuple[int, ...], data_meta: dict[str, Any] | None = None) -> VAE:
    m = cfg.model
    likelihood = build_likelihood(m.likelihood, event_shape, m.likelihood_scale, data_meta, m.mixtures)
    net = build_network(m.name, event_shape, m.latent, likelihood.params_per_dim, m,
                        n_classes=conditioning.n_classes(data_meta))  # fmt: skip
    # a hierarchical net's latent vector is all its groups, flattened (the noise the loop draws)
    vae = VAE(net, likelihood, getattr(net, "latent_size", m.latent))
    vae.data_meta = data_meta or {}
    return vae


MAX_EVENT_SIZE = 2**31  # values in one example


def build_to_load(
    cfg: Config, event_shape: Any, data_meta: dict[str, Any] | None, stored_bytes: int, where: str
) -> VAE:
    """``build_vae`` for a model whose weights are to be loaded from a file of ``stored_bytes`` bytes:
    the shape is checked, and the model is counted on the meta device first (where building costs
    nothing), so that a config or a forged checkpoint that claims a huge model (an event_shape of
    [1, 1e5, 1e5], a latent of 1e9) is one CheckpointError, not an attempt to allocate terabytes: its
    weights must fit in the file they are read from, and in the memory available."""
    if not (
        isinstance(event_shape, (list, tuple))
        and event_shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in event_shape)
        and math.prod(event_shape) <= MAX_EVENT_SIZE
    ):
        raise CheckpointError(
            f"{where}: event_shape {shown(event_shape)} is not a list of positive sizes of at most "
            f"{MAX_EVENT_SIZE:,} values in all"
        )
    shape = tuple(event_shape)
    try:
        with torch.device("meta"):
            net = build_vae(cfg, shape, data_meta)
        need = sum(t.numel() * t.element_size() for t in net.state_dict().values())  # what a file holds
    except NotImplementedError:
        need = None  # a model the meta device cannot build (it reads values while it is built)
    except (RuntimeError, ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
        if "meta" in str(e):
            need = None
        else:
            raise CheckpointError(
                f"{where}: the model its config describes cannot be built: {clip(str(e))}"
            ) from None
    if need is None:
        return build_vae(cfg, shape, data_meta)
    if need > stored_bytes:
        raise CheckpointError(
            f"{where}: its config describes a model of {need:,} bytes of weights, but its weights file holds "
            f"{stored_bytes:,} bytes: the config or the file is corrupt or edited"
        )
    free = _available_bytes(torch.device("cpu"))
    if free is not None and 2 * need > free:
        raise CheckpointError(
            f"{where}: loading its model needs {2 * need / 2**30:,.1f} GiB of memory, but "
            f"{free / 2**30:,.1f} GiB are available"
        )
    return build_vae(cfg, shape, data_meta)


def setup(
    cfg: Config,
    device: torch.device | None = None,
    data_meta: dict[str, Any] | None = None,
    rows: Table | None = None,
) -> Setup:
    """Load and check the data and build the model: user errors surface here, before any file is written.

    ``data_meta``: a trained run's ``Dataset.meta``, whose fitted transforms (a table's) are reused.
    ``rows``: a table's rows in memory (a DataFrame's), used instead of reading ``data.name``'s file."""
    device = device or runtime.select_device(cfg.train.device)
    data = load_dataset(
        cfg.data.name,
        resize=parse_resize(cfg.data.resize),
        crop=cfg.data.crop,
        test_fraction=cfg.data.test_fraction,
        split_seed=0,
        data_dir=cfg.data.dir,
        columns=cfg.data.columns,
        continuous_transform=cfg.data.continuous_transform,
        meta=data_meta,
        tokenizer=cfg.data.tokenizer,
        max_length=cfg.data.max_length,
        min_freq=cfg.data.min_freq,
        condition=cfg.data.condition,
        rows=rows,
        constraints=cfg.data.constraints,
        private=cfg.train.dp_epsilon > 0,
    )
    kind = kind_of(data)
    condition_on(data, cfg.data.condition, kind)
    low, high, binary = value_range([data.x_train, data.x_test], data.max_value)  # a chunk at a time
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"data '{data.name}' contains NaN or Inf values")
    check_memory(cfg, data.event_shape, data.meta, device)
    vae = build_vae(cfg, data.event_shape, data.meta)
    mode = resolve_binarize(cfg.data.binarize, vae.likelihood.support, binary)
    kind.check(data, cfg)  # text: a model of token sequences, no binarisation
    if mode != "none" and (low < 0 or high > 1):
        raise DataError(
            f"binarisation needs data in [0, 1], but '{data.name}' has values in [{low:g}, {high:g}]"
        )
    check_binarised_bytes(cfg, data, vae.likelihood, mode)
    if mode != "none":
        binary, low, high = True, 0.0, 1.0
    try:
        vae.likelihood.check_data(low, high, binary, data.name)
    except DataError as e:
        advice = kind.misfit(data, cfg)  # a table: not the advice for images (gaussian, uint8)
        if advice:
            raise DataError(advice) from e
        raise
    if mode == "static" and data.mapped:
        raise ConfigError(
            f"data.binarize = static would copy the memory-mapped '{data.name}' into memory as one fixed "
            "draw: use data.binarize=dynamic (a fresh draw per batch) or data.binarize=none"
        )
    n_all = len(data.x_train)
    fit_idx, val_idx, n_val = held_out(data, cfg.data.validation)
    cfg.train.batch_size = kind.batch_size(data, cfg, n_all - n_val)  # config.yaml records the batch used
    if len(data.x_train) < cfg.train.batch_size:
        raise DataError(
            f"data '{data.name}' has {len(data.x_train)} training examples, fewer than train.batch_size "
            f"= {cfg.train.batch_size}; lower --batch-size"
        )
    if len(data.x_test) == 0:
        raise DataError(f"data '{data.name}' has an empty test split")
    x_train, x_val, x_test = data.x_train[fit_idx], data.x_train[val_idx], data.x_test
    if data.mapped:
        x_val = x_val.clone()  # at most VALIDATION_MAX rows, evaluated every epoch: in memory
    train_max = val_max = test_max = data.max_value
    if mode == "static":
        x_train, train_max = binarize(x_train, data.max_value, seed=1), 1.0
    if mode in ("static", "dynamic"):
        x_test, test_max = binarize(x_test, data.max_value, seed=2), 1.0
        x_val, val_max = binarize(x_val, data.max_value, seed=4), 1.0
    if n_val and len(x_train) < cfg.train.batch_size:
        raise DataError(
            f"data '{data.name}' has {len(x_train)} training examples once {n_val} are held out for "
            f"validation (data.validation = {cfg.data.validation:g}), fewer than train.batch_size = "
            f"{cfg.train.batch_size}; lower --batch-size or data.validation"
        )
    init = getattr(vae.net, "init_from_data", None)  # e.g. the MLP's model.init_output_bias
    if init is not None:  # before placing: the training rows may be memory-mapped

        def per_class() -> torch.Tensor:  # asked for by conditional networks only
            assert data.y_train is not None
            return class_means(x_train, data.y_train[fit_idx], conditioning.n_classes(data.meta), train_max)

        init(lambda: mean_value(x_train, train_max), per_class)
    vae = runtime.place(vae, device, model_spec(cfg.model.name).channels_last)
    precision = runtime.resolve_precision(cfg.train.precision, device)
    ys: list[torch.Tensor | None] = [None, None, None]
    if data.y_train is not None and data.y_test is not None and cfg.data.condition:
        ys = [data.y_train[fit_idx].to(device), data.y_test.to(device), data.y_train[val_idx].to(device)]
    if not data.mapped:  # (mapped: the training rows stay in the file, gathered per batch)
        x_train = x_train.to(device)
    return Setup(cfg, device, data, x_train, x_test.to(device), train_max, test_max, mode,
                 vae, precision, x_val.to(device), val_max, *ys)  # fmt: skip


def condition_on(data: Dataset, condition: str, kind: DataKind) -> None:
    """A conditional run (``data.condition``): the data's class ids 0..K-1 in ``y_train``/``y_test`` and
    ``meta["condition"]`` (what they mean), as the data's kind takes them (``DataKind.take_condition``:
    an image's labels, a table's categorical column)."""
    if not condition:
        return
    kind.take_condition(data, condition)
    if len(data.meta["condition"]["names"]) < 2:
        raise DataError(f"data '{data.name}': --condition {condition} needs at least 2 classes, found 1")


# float32 copies of the parameters that training holds at its peak, besides the weights: gradients,
# the optimiser's state, the NaN guard's snapshot (weights + optimiser state), and a checkpoint's bytes
# (the same again); the weight average adds one copy to each of the three
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "adamax": 2, "sgd": 1, "schedulefree": 2}


def check_memory(
    cfg: Config, event_shape: tuple[int, ...], data_meta: dict[str, Any] | None, device: torch.device
) -> None:
    """Refuse, before anything is allocated, a model whose training cannot fit in the memory available
    (the parameters counted on the meta device, where building a network costs nothing)."""
    try:
        with torch.device("meta"):
            net = build_vae(cfg, event_shape, data_meta)
        params = sum(p.numel() for p in net.parameters())
        weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    except NotImplementedError:  # a model the meta device cannot build
        return
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        if "meta" in str(e):  # a model that reads values while it is built
            return
        widths = ", ".join(f"model.{k}={shown(v)}" for k, v in _width_keys(cfg).items())
        raise ConfigError(f"the model ({widths}) cannot be built: {clip(str(e))}") from None
    k = _OPTIMIZER_STATES.get(cfg.train.optimizer, 2) + (1 if cfg.train.ema else 0)
    on_device = weights * (2 + k + 1 + k)  # weights, gradients, optimiser (+ average), their snapshot
    on_host = weights * (1 + k)  # a checkpoint's bytes
    needs = [(on_device + (on_host if device.type == "cpu" else 0), device)]
    if device.type != "cpu":
        needs.append((on_host + weights, torch.device("cpu")))  # built on the CPU, then moved
    for need, where in needs:
        free = _available_bytes(where)
        if free is not None and need > free:
            widths = ", ".join(f"model.{k}={shown(v)}" for k, v in _width_keys(cfg).items())
            raise ConfigError(
                f"the model ({widths}) has {params:,} parameters: training it needs at least "
                f"{need / 2**30:,.1f} GiB of {where.type} memory (weights, gradients, optimiser state, the "
                f"NaN guard's snapshot and a checkpoint), but {free / 2**30:,.1f} GiB are available; use "
                "a smaller model"
            )


def _width_keys(cfg: Config) -> dict[str, Any]:
    m, width = cfg.model, model_spec(cfg.model.name).width  # the widths the family scales (tune's search)
    keys: dict[str, Any] = {"latent": m.latent}
    keys.update({width: getattr(m, width)} if width else {})
    return keys


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on ``device`` (None: unknown): CUDA's free memory; on the CPU,
    MemAvailable, or less where a cgroup (a container's memory limit) leaves less."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def check_shares(s: Setup, ctx: distributed.Context) -> None:
    """Data-parallel: enough training examples for one global batch, and held-out examples for every rank."""
    need = s.cfg.train.batch_size * ctx.world
    if len(s.x_train) < need:
        raise DataError(
            f"data '{s.data.name}' has {len(s.x_train)} training examples, fewer than one global batch: "
            f"train.batch_size {s.cfg.train.batch_size} per rank x {ctx.world} ranks = {need}; lower "
            "--batch-size or use fewer ranks"
        )
    for split, x in (("test", s.x_test), ("validation", s.x_val)):
        if len(x) < ctx.world and (split == "test" or s.has_validation):
            raise DataError(f"data '{s.data.name}' has {len(x)} {split} examples, fewer than the {ctx.world} "
                            "ranks that share the evaluation")  # fmt: skip
