"""Conditional generation (a conditional VAE, Sohn, Lee & Yan 2015): what the condition is and how a
user's words name one.

A conditional run (``data.condition``: ``label`` or a table's categorical COLUMN) gives every example an
integer class id y in 0..K-1. The networks see y as a one-hot vector (concatenated to the encoder's
input and the decoder's z; the hierarchical network adds learned projections of it to its top-down
state). What the ids mean is saved with the run in ``data_meta["condition"]``::

    {"kind": "label" | "column", "column": NAME (tables), "names": [K names], "counts": [K training counts]}

so that ``sample --label NAME`` and ``--where COLUMN=VALUE`` work after ``turbovae.load``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError

# Fashion-MNIST's classes, in the order of its label ids (Xiao, Rasul & Vollgraf 2017)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]  # fmt: skip
CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES}


def n_classes(data_meta: dict[str, Any] | None) -> int:
    """K, the number of classes of a conditional run's data (0: unconditional)."""
    cond = (data_meta or {}).get("condition")
    return len(cond["names"]) if cond else 0


def one_hot(y: torch.Tensor | None, k: int, like: torch.Tensor) -> torch.Tensor:
    """y (...) int64 class ids -> (..., k) in ``like``'s dtype and device; a clear error without y."""
    if y is None:
        raise ConfigError(
            f"this model is conditional ({k} classes): pass the condition (condition=class ids, "
            "--label or --where)"
        )
    # a comparison rather than F.one_hot, which checks the ids' range (a host sync) and so cannot run
    # under vmap (DP-SGD's per-example gradients, engine/privacy.py); ids are checked where they come in
    classes = torch.arange(k, device=like.device)
    return (y.long().to(like.device).unsqueeze(-1) == classes).to(dtype=like.dtype)


def label_ids(
    labels: torch.Tensor, dataset: str, names: Sequence[str] | None = None
) -> tuple[list[int], list[str]]:
    """(the distinct label values, in order; their names) of a source's integer labels: the source's
    class names where it has them (``names``, or known ones such as Fashion-MNIST's), else the values."""
    values = sorted(int(v) for v in torch.unique(labels).tolist())
    known = list(names) if names is not None else CLASS_NAMES.get(dataset)
    if known is not None and values and values[0] >= 0 and values[-1] < len(known):
        return list(range(len(known))), known
    return values, [str(v) for v in values]


def remap(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Label values -> class ids 0..K-1 (positions in ``values``)."""
    # by search among the values, not a table indexed by them: a label of 10^9 would make 8 GB of table
    known = torch.tensor(list(values), dtype=torch.long)
    ordered, order = known.sort()
    labels = labels.long()
    at = torch.searchsorted(ordered, labels).clamp(max=len(ordered) - 1)
    return torch.where(ordered[at] == labels, order[at], torch.full_like(labels, -1))


def resolve(condition: dict[str, Any], text: str | int, what: str = "label") -> int:
    """The class id a user's ``text`` names: a class name, else an index 0..K-1. An unknown one is a
    ConfigError naming the valid ones."""
    names = [str(n) for n in condition["names"]]
    text = str(text).strip()
    if text in names:
        return names.index(text)
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names) and condition.get("kind") != "column":
        return int(text)
    shown = ", ".join(f"{i}={n}" if n != str(i) else n for i, n in enumerate(names))
    raise ConfigError(f"unknown {what} '{text}' (this run's classes: {shown})")


def resolve_many(condition: dict[str, Any], spec: str, what: str = "label") -> list[int]:
    """``--label 3,7`` -> class ids; names containing commas can be given one at a time."""
    names = [str(n) for n in condition["names"]]
    if spec in names:
        return [names.index(spec)]
    parts = spec.split(",")
    if any(not part.strip() for part in parts):  # '' or 3,,7: a class left out, not "no class"
        shown = ", ".join(names[:20])
        raise ConfigError(f"--{what} '{spec[:80]}' names an empty class (this run's classes: {shown})")
    return [resolve(condition, part, what) for part in parts]


def parse_where(condition: dict[str, Any], where: str) -> int:
    """``COLUMN=VALUE`` -> the class id of VALUE in a table run conditioned on COLUMN."""
    if condition.get("kind") != "column":
        raise ConfigError("--where needs a table run trained with --condition COLUMN; use --label for labels")
    column, sep, value = where.partition("=")
    if not sep:
        raise ConfigError(f"--where must be COLUMN=VALUE, got '{where}'")
    if column.strip() != condition["column"]:
        raise ConfigError(
            f"--where: this run is conditioned on column '{condition['column']}', not '{column.strip()}'"
        )
    return resolve(condition, value, what=f"value of '{condition['column']}'")


def warn_odd_classes(names: Sequence[str], y_train: torch.Tensor, y_test: torch.Tensor, where: str) -> None:
    """One warning line each for classes that ``--label NAME`` cannot tell apart (a name given twice)
    and for classes without training examples (only in the test split, or nowhere): their samples
    come from an untrained class."""
    k = len(names)
    seen: dict[str, int] = {}
    twice = [f"'{n}' ({seen[n]} and {i})" for i, n in enumerate(names) if seen.setdefault(n, i) != i]
    if twice:
        print(f"turbovae: warning: {where}: class names given twice: {', '.join(twice[:5])}; --label NAME "
              "takes the first, name the classes apart to ask for the others", file=sys.stderr)  # fmt: skip
    train = torch.bincount(y_train.long(), minlength=k)[:k]
    test = torch.bincount(y_test.long(), minlength=k)[:k] if len(y_test) else torch.zeros_like(train)
    unseen = [f"{names[i]} ({int(test[i])} in the test split)" for i in range(k) if train[i] == 0]
    if unseen:
        print(f"turbovae: warning: {where}: {len(unseen)} class(es) have no training examples, and their "
              f"samples will not look like them: {', '.join(unseen[:5])}", file=sys.stderr)  # fmt: skip


def integer_ids(values: Any, where: str) -> torch.Tensor:
    """Class ids given as numbers (an array or tensor) as int64; fractions, NaN and non-numbers are a
    DataError (1.0 is 1; 1.5 was truncated to 1 before)."""
    a = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{where}: class ids must be integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        whole = np.isfinite(a) & (a == np.round(a))
        if not whole.all():
            bad = a[~whole].reshape(-1)[0]
            raise DataError(f"{where}: class ids must be whole numbers, got {bad!r} (not truncated)")
    return torch.from_numpy(a.astype(np.int64).reshape(-1))


def check_labels(y: torch.Tensor, n: int, k: int, where: str) -> torch.Tensor:
    """Class ids (n,) int64 in 0..k-1, or a DataError."""
    if y.shape != (n,):
        raise DataError(f"{where}: {tuple(y.shape)} labels for {n} examples, expected ({n},)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(f"{where}: class ids must be in 0..{k - 1}, got [{int(y.min())}, {int(y.max())}]")
    return y.long()


def draw_classes(condition: dict[str, Any], n: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """n class ids drawn from the training frequencies (``counts``), for unconditioned draws."""
    counts = torch.tensor(condition.get("counts") or [1] * len(condition["names"]), dtype=torch.float32)
    return torch.multinomial(counts.to(device), n, replacement=True, generator=generator)
