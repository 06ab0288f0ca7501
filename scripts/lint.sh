#!/usr/bin/env bash
# The lint gate of `make test` and CI: ruff with the rules kept in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${RUFF:-.venv/bin/ruff}"
"$RUFF" check beam_curator tests bench templates scripts
