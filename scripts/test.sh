#!/usr/bin/env bash
# The test suite: lint, then the unit tier, then the mutation harness (every named privacy bug
# must fail a test: scripts/mutants.py), then the end-to-end tier (pytest marker e2e), so a
# broken unit fails in minutes. Arguments go to one pytest run as they are (-m "not e2e": the
# unit tier alone; -m e2e: the end-to-end tier; -m slow: what neither runs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FEDLR_ROOT"
ruff check .
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q -m "not e2e and not slow"
python scripts/mutants.py
exec python -m pytest -q -m "e2e and not slow" --durations=15  # where the tier's time goes
