#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv and installs fedlr with its dev tools, pinned by
# constraints.txt. Sourced by scripts/demo.sh and scripts/test.sh; reinstalls only when
# pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
FEDLR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FEDLR_VENV="${FEDLR_VENV:-$FEDLR_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fedlr needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x "$FEDLR_VENV/bin/python" ] || "$PYTHON" -m venv "$FEDLR_VENV"

stamp="$FEDLR_VENV/.fedlr-install-stamp"
want="$(cat "$FEDLR_ROOT/pyproject.toml" "$FEDLR_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "fedlr: installing into $FEDLR_VENV (first run takes a few minutes)" >&2
  "$FEDLR_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -c "$FEDLR_ROOT/constraints.txt" -e "$FEDLR_ROOT[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$FEDLR_VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
