"""A user's first hour, wave 3 (issue 33): each test is an item of the issue's list, or one of its
"measured on held-out data" findings, and failed on the code before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_all_extra_installs_every_optional_feature():
    """`pip install 'turbovae[all]'` installed only the base package: there was no `all` extra."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    features = {r for name, reqs in extras.items() if name not in ("all", "dev", "optimizers") for r in reqs}
    assert set(extras["all"]) == features
    assert len(extras["all"]) == len(features)  # each once
