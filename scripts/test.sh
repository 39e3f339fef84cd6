#!/usr/bin/env bash
# The whole test command: lint, format, types, then the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
python -m pytest "$@"
