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


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    """A ConfigError for an unknown registry name, suggesting the closest valid one."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {kind} '{name}' (expected one of: {', '.join(options)}){hint}")
