"""User-facing errors: a problem the user can fix. The CLI prints one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TurboVAEError(Exception):
    """Base class for errors caused by user input (config, data, paths, checkpoints)."""


class ConfigError(TurboVAEError):
    """An invalid option or configuration value."""


class DataError(TurboVAEError):
    """Missing, unreadable, corrupt or unsuitable data."""


class CheckpointError(TurboVAEError):
    """A missing, corrupt, unsafe or incompatible checkpoint or run directory."""


def unknown_name(
    kind: str, name: str, choices: Iterable[str], aliases: dict[str, str] | None = None
) -> ConfigError:
    """A ConfigError for an unknown registry name, suggesting the closest valid one (``aliases``: the
    usual other names of valid ones, e.g. learning_rate for lr, which spelling alone would not find)."""
    options = sorted(choices)
    alias = (aliases or {}).get(name.lower())
    close = [alias] if alias in options else difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {kind} '{name}' (expected one of: {', '.join(options)}){hint}")
