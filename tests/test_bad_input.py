"""Bad input, tried as a new user would, on every script: a one-line error naming the argument or file, exit 2,
no traceback, and nothing already written lost. (01's own index errors: test_index.py; 04's datasets and
methods: test_eval.py.)"""

import json

import pytest

from conftest import run_script

MISSING = "{tmp}/missing"


@pytest.fixture
def place(tmp_path, tiny_model_dir, mini_index):
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "not_trajectories.jsonl").write_text(json.dumps({"question": "q?"}) + "\n")
    (tmp_path / "nan_model").mkdir()
    (tmp_path / "bad.yaml").write_text("model: x\n  learning_rate: [1e-6\n")  # a stray indent
    return lambda args: [str(a).format(tmp=tmp_path, tiny=tiny_model_dir, index=mini_index) for a in args]


CASES = [
    # script, its arguments, what the message must name
    ("01_build_index.py", ["--config", MISSING + ".yaml"], "missing.yaml"),
    ("01_build_index.py", ["--index_dir", "{index}", "--query", "x", "--encoder", "some/encoder"], "bm25 index"),
    ("01_build_index.py", ["--index_dir", "{index}", "--query", "x", "--threads", "-1"], "--threads"),
    ("02_sft_warmup.py", ["--model", MISSING + "_model"], "missing_model"),
    ("02_sft_warmup.py", ["--model", "{tmp}/nan_model"], "nan_model"),
    ("02_sft_warmup.py", ["--config", MISSING + ".yaml"], "missing.yaml"),
    ("02_sft_warmup.py", ["--model", "{tiny}", "--train_data", MISSING + ".jsonl"], "missing.jsonl"),
    ("02_sft_warmup.py", ["--model", "{tiny}", "--retriever", MISSING + "_index"], "missing_index"),
    ("02_sft_warmup.py", ["--model", "{tiny}", "--retriever", "{index}", "--trajectories",
                          "{tmp}/not_trajectories.jsonl"], "--trajectories"),
    ("02_sft_warmup.py", ["--model", "{tiny}", "--source", "magic"], "--source"),
    ("02_sft_warmup.py", ["--model", "{tiny}", "--learning_rate", "fast"], "--learning_rate"),
    ("03_grpo_search.py", ["--config", MISSING + ".yaml"], "missing.yaml"),
    ("03_grpo_search.py", ["--model", MISSING + "_model", "--output_dir", "{tmp}/o"], "missing_model"),
    ("03_grpo_search.py", ["--model", "{tiny}", "--retriever", MISSING + "_index", "--output_dir", "{tmp}/o"],
     "missing_index"),
    ("03_grpo_search.py", ["--model", "{tiny}", "--retriever", "{index}", "--train_data", MISSING + ".jsonl",
                           "--output_dir", "{tmp}/o"], "missing.jsonl"),
    ("03_grpo_search.py", ["--model", "{tiny}", "--topk", "0"], "--topk"),
    ("03_grpo_search.py", ["--model", "{tiny}", "--prompt_template", "fancy", "--retriever", "{index}",
                           "--train_data", "data/mini/train.jsonl", "--output_dir", "{tmp}/o"], "--prompt_template"),
    ("04_eval.py", ["--model", "{tiny}", "--output_dir", "{tmp}/a_file/eval"], "--output_dir"),
    ("04_eval.py", ["--model", "{tiny}", "--question", ""], "--question is empty"),
    ("04_eval.py", ["--model", MISSING + "_model", "--retriever", "{index}", "--question", "Who?"], "missing_model"),
    ("04_eval.py", ["--model", "{tiny}", "--retriever", MISSING + "_index", "--question", "Who?"], "missing_index"),
    ("04_eval.py", ["--config", MISSING + ".yaml"], "missing.yaml"),
    ("04_eval.py", ["--model", "{tiny}", "--datasets", MISSING + ".jsonl"], "missing.jsonl"),
    ("04_eval.py", ["--model", "{tiny}", "--limit", "0"], "--limit"),
    ("04_eval.py", ["--model", "{tiny}", "--backend", "tpu"], "--backend"),
    ("extras/compare.py", ["{tmp}", "{tmp}/a_file"], "results.json"),
    # a --config that is not YAML: the file, line and column, for every script
    ("01_build_index.py", ["--config", "{tmp}/bad.yaml"], "bad.yaml\", line 2"),
    ("02_sft_warmup.py", ["--config", "{tmp}/bad.yaml"], "bad.yaml\", line 2"),
    ("03_grpo_search.py", ["--config", "{tmp}/bad.yaml"], "bad.yaml\", line 2"),
    ("04_eval.py", ["--config", "{tmp}/bad.yaml"], "bad.yaml\", line 2"),
    # a retrieval server that is not there: refused at start, not when a rollout first searches
    ("02_sft_warmup.py", ["--model", "{tiny}", "--retriever", "http://127.0.0.1:9"], "does not answer"),
    ("03_grpo_search.py", ["--model", "{tiny}", "--retriever", "http://127.0.0.1:9", "--train_data",
                           "data/mini/train.jsonl", "--output_dir", "{tmp}/o"], "does not answer"),
    ("04_eval.py", ["--model", "{tiny}", "--retriever", "http://127.0.0.1:9", "--question", "Who?"],
     "does not answer"),
    ("extras/view_trajectories.py", [MISSING + ".jsonl"], "missing.jsonl"),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{c[0]} {' '.join(c[1])}"[:70] for c in CASES])
def test_bad_input_gets_one_clear_line(place, script, args, message):
    p = run_script(script, *place(args), check=False, timeout=300)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_grpo_never_touches_the_model_or_a_finished_run_before_training(tmp_path, tiny_model_dir, mini_index):
    """Before the fix, 03 deleted <output_dir>/config.json first thing: with --output_dir = --model, a typo in
    --retriever destroyed the trained model's config."""
    import shutil
    model = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, model)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    p = run_script("03_grpo_search.py", "--model", model, "--output_dir", model, "--retriever", tmp_path / "typo",
                   check=False)
    assert p.returncode == 2 and "is the --model" in p.stderr and "Traceback" not in p.stderr
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    # a finished run's folder: a failed start (bad retriever, bad data) leaves its final model as it was
    done = tmp_path / "done_run"
    shutil.copytree(tiny_model_dir, done)
    (done / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    before = {f.name: f.read_bytes() for f in done.iterdir()}
    for bad in (["--retriever", tmp_path / "typo"], ["--retriever", mini_index, "--train_data", tmp_path / "x.jsonl"]):
        p = run_script("03_grpo_search.py", "--model", tiny_model_dir, "--output_dir", done, *bad, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert {f.name: f.read_bytes() for f in done.iterdir()} == before


def test_sft_refuses_to_write_over_its_input_model(tmp_path, tiny_model_dir, mini_index):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    p = run_script("02_sft_warmup.py", "--model", model, "--output_dir", model, "--retriever", mini_index,
                   check=False)
    assert p.returncode == 2 and "is the --model" in p.stderr
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
