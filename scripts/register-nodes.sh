#!/usr/bin/env bash
# Register every node public key made by `fedlr certs` with a SuperLink, so those nodes may sign in.
# usage: bash scripts/register-nodes.sh KEYS_DIR [CONNECTION]   (CONNECTION: a [superlink.NAME] of
# $FLWR_HOME/config.toml, default: its default). Already registered keys are reported, not fatal.
set -uo pipefail
keys="${1:?usage: register-nodes.sh KEYS_DIR [CONNECTION]}"
connection="${2:-}"
shopt -s nullglob
pubs=("$keys"/node*.pub)
if [ ${#pubs[@]} -eq 0 ]; then
  echo "error: no node*.pub in $keys; create them with: fedlr certs $keys --nodes N" >&2
  exit 2
fi
failed=0
for pub in "${pubs[@]}"; do
  if out=$(flwr supernode register "$pub" ${connection:+"$connection"} 2>&1); then
    echo "registered $(basename "$pub" .pub)"
  else
    echo "$(basename "$pub" .pub): $(echo "$out" | tail -n 1)" >&2
    failed=1
  fi
done
exit $failed
