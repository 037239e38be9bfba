#!/usr/bin/env bash
# The test suite: lint, then pytest (slow tests excluded; `bash scripts/test.sh -m slow` runs them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FEDLR_ROOT"
ruff check .
exec python -m pytest -q "$@"
