"""User-facing errors: a problem the user can fix. The CLI prints one line and exits with code 2."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any

SHOWN_CHARS = 80  # the most of a user's value an error message shows

# a bounded repr: a few items of each container, a few levels deep, so that formatting a value costs
# little however large it is (a YAML alias bomb expands to a billion items)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS


class TurboVAEError(Exception):
    """Base class for errors caused by user input (config, data, paths, checkpoints)."""


class ConfigError(TurboVAEError):
    """An invalid option or configuration value."""


class DataError(TurboVAEError):
    """Missing, unreadable, corrupt or unsuitable data."""


class CheckpointError(TurboVAEError):
    """A missing, corrupt, unsafe or incompatible checkpoint or run directory."""


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` as an error message shows it: its repr, cut to ``limit`` characters with "...", and built
    without formatting the whole value."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def clip(text: str, limit: int = 200) -> str:
    """A message (an exception's text, a first line) cut to ``limit`` characters with "..."."""
    text = str(text).replace("\r", " ").replace("\n", " ")  # one line
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def unknown_name(
    kind: str, name: str, choices: Iterable[str], aliases: dict[str, str] | None = None
) -> ConfigError:
    """A ConfigError for an unknown registry name, suggesting the closest valid one (``aliases``: the
    usual other names of valid ones, e.g. learning_rate for lr, which spelling alone would not find)."""
    options = sorted(choices)
    text = str(name) if isinstance(name, str | int | float) else ""
    alias = (aliases or {}).get(text.lower())
    if alias in options:
        close = [alias]
    else:
        close = difflib.get_close_matches(text, options, n=1) if 0 < len(text) <= 200 else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {kind} {shown(name)} (expected one of: {', '.join(options)}){hint}")
