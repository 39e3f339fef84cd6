"""Data kinds, registered by name: what images, tables and text each do differently (``DataKind``).

A new kind of data is one file in this folder (a ``DataKind`` subclass) and one ``KINDS`` entry; its
source records the name in ``Dataset.meta["kind"]``. ``kind_of`` is the one place that decides which
kind some data are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DataError
from .base import DataKind, ReportOutputs, SampleRequest
from .image import ImageKind
from .table import TableKind
from .text import TextKind

# in the order kinds claim a data spec (text:data.csv is text)
KINDS: dict[str, DataKind] = {
    "image": ImageKind(),  # images and vectors: every source no other kind claims
    "text": TextKind(),
    "table": TableKind(),
}
DEFAULT = "image"


def kind_of(source: Any) -> DataKind:
    """The kind of a data set: ``source`` is a ``Dataset``, a VAE (its ``data_meta``) or the meta itself
    (a checkpoint's ``data_meta``). The name a source recorded in ``meta["kind"]``; a run written before
    kinds were recorded is recognised by what its meta holds."""
    if not isinstance(source, Mapping):  # a Dataset (its meta) or a VAE (its data_meta)
        source = getattr(source, "meta", None) or getattr(source, "data_meta", None)
    meta: Mapping[str, Any] = source or {}
    name = meta.get("kind") or _recognised(meta)
    if name not in KINDS:
        known = ", ".join(KINDS)
        raise DataError(f"data of kind '{name}', which this turbovae does not know (it knows {known})")
    return KINDS[name]


def _recognised(meta: Mapping[str, Any]) -> str:
    """The kind of a meta without a recorded one (runs of turbovae 0.1): a tokeniser is text, a fitted
    table transform a table, anything else image data. The only place that reads the meta's shape."""
    if meta.get("text"):
        return "text"
    table = meta.get("table")
    if isinstance(table, dict) and "layout" in table:
        return "table"
    return DEFAULT


def kind_for_source(spec: str) -> DataKind:
    """The kind of the data a spec names (``--data SPEC``): the first kind in ``KINDS`` that claims it,
    else the default kind."""
    return next((kind for kind in KINDS.values() if kind.claims(spec)), KINDS[DEFAULT])


__all__ = ["DEFAULT", "KINDS", "DataKind", "ReportOutputs", "SampleRequest", "kind_for_source", "kind_of"]
