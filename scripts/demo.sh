#!/usr/bin/env bash
# The main job on the built-in defaults: `bash scripts/demo.sh [fedlr simulate options]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FEDLR_ROOT"
exec fedlr simulate "$@"
