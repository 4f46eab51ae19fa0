"""The vLLM code paths, executed for real on vLLM's CPU build (`make setup-vllm-cpu` -> .venv-vllm; `make test`
builds it): 04 --backend vllm, 04 --backend api against vLLM's own OpenAI server on 127.0.0.1, 03 --use_vllm
on the colocated engine (rollout layout, sampling log-probs, weight sync), server mode's request length, and
the refusals of an engine too short for the budget. pytest runs in .venv; every vLLM process (the stage
scripts, tests/vllm_grpo_driver.py, the server) runs with .venv-vllm/bin/python. Without a working
.venv-vllm these tests skip, naming the reason.

Engine starts are the cost (~1-2 min each on 2 cores, compilation included): this file starts three (04's
offline engine, the server, 03's colocated engine), each shared by the tests that need it. vLLM's CPU
attention takes head sizes of 32 and up, so the models here are the other test files' taught models
with 2 heads of 32 (instead of 4 of 16)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_script
from test_eval import CPU, free_port, read_jsonl, train_scripted_model
from test_grpo import DIRECT_Q, SEARCH_Q, enc, write_train_data, load_script, make_trainer, scripted_completion, teach

vllm_rollout = __import__("extras.vllm_rollout", fromlist=["vllm_rollout"])

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
TAG = "mini_hotpotqa_dev"
METHODS = ["naive-gen", "naive-rag", "iter-retgen", "ircot", "research"]
SERVER_LEN = 2048  # the server's --max-model-len: small, so that request lengths matter (IRCoT's prompts ~1k)


def vllm_missing() -> str | None:
    """Why .venv-vllm cannot run vLLM, or None."""
    if not VLLM_PY.exists():
        log = ROOT / ".venv-vllm.log"
        last = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        return f"no .venv-vllm (make setup-vllm-cpu{': ' + last[0] if last else ''})"
    p = subprocess.run([str(VLLM_PY), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return None if p.returncode == 0 else f".venv-vllm cannot import vllm: {p.stderr.strip().splitlines()[-1:]}"


WHY_NOT = vllm_missing()
needs_vllm = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def run_vllm(*args, check=True, timeout=900, env=None):
    """A script or driver with .venv-vllm's python, offline, as a user runs it."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    t0 = time.perf_counter()
    p = subprocess.run([str(VLLM_PY), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=full_env)
    p.seconds = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def one_line_error(p) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# No engine
# ---------------------------------------------------------------------------------------------
def test_one_vllm_pin():
    """requirements-gpu.txt's vllm pin is the version `make setup-vllm-cpu` installs (as vllm-cpu), and the
    one .venv-vllm holds."""
    pin = re.search(r"^vllm==([0-9][0-9.]*)", (ROOT / "requirements-gpu.txt").read_text(), re.M).group(1)
    plan = subprocess.run(["make", "-n", "setup-vllm-cpu", "VLLM_VENV=/nonexistent/venv"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert re.findall(r"vllm-cpu==(\S+)", plan) == [pin]
    if WHY_NOT is None:
        p = subprocess.run([str(VLLM_PY), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                           capture_output=True, text=True, check=True)
        assert p.stdout.strip() == pin


def test_padding_rows_for_a_shared_engine_call():
    """Server mode: each rank sends as many rows; rank r reads the outputs [r * width, (r + 1) * width)."""
    ranks = [[[1, 2], [3]], [[4, 5, 6]]]
    width = max(len(r) for r in ranks)
    sent = [row for r in ranks for row in vllm_rollout.pad_rows(r, width, r[0][:1])]
    assert sent == [[1, 2], [3], [4, 5, 6], [4]]
    assert [sent[i * width: i * width + len(r)] for i, r in enumerate(ranks)] == ranks


@needs_vllm
def test_cpu_workaround_is_for_the_cpu_only():
    """extras/vllm_cpu.keep_weights_reloadable leaves vLLM untouched on a CUDA or ROCm platform (vLLM's own
    Platform with its enum set: the check the function makes), and on the CPU replaces exactly the dispatch
    that drops the weights."""
    code = """
import vllm.model_executor.layers.utils as layer_utils
from vllm.platforms import current_platform
from vllm.platforms.interface import Platform, PlatformEnum
from extras import vllm_cpu
original = layer_utils.dispatch_cpu_unquantized_gemm
for kind in (PlatformEnum.CUDA, PlatformEnum.ROCM, PlatformEnum.XPU, PlatformEnum.TPU):
    gpu = Platform()
    gpu._enum = kind
    assert not vllm_cpu.keep_weights_reloadable(gpu), kind
    assert layer_utils.dispatch_cpu_unquantized_gemm is original, kind
assert current_platform.is_cpu() and vllm_cpu.keep_weights_reloadable()
assert layer_utils.dispatch_cpu_unquantized_gemm is vllm_cpu.dispatch_plain_linear
print("ok")
"""
    assert run_vllm("-c", code, timeout=300).stdout.strip().endswith("ok")


@needs_vllm
def test_03_refuses_a_colocated_engine_shorter_than_the_budget(tmp_path):
    p = run_vllm("03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--use_vllm", "true",
                 "--vllm_max_model_length", "600", "--output_dir", tmp_path / "g", check=False, timeout=300)
    assert one_line_error(p) == ("error: --vllm_max_model_length is 600, shorter than --max_prompt_length 512 + "
                                 "--max_completion_length 512 = 1024")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------------------------
# 04 --backend vllm (one engine), compared with --backend hf
# ---------------------------------------------------------------------------------------------
# Ids that are not the tokenizer's segmentation of their text: " An" "im" "orph" "s" (a model may sample them;
# the tokenizer writes " Anim" "orph" "s"). Decoded and re-encoded, they change.
ODD_PIECES = [" An", "im", "orph", "s"]
SPELL_Q, SAY_Q = "Q: which spelling?", "Q: say it."


def odd_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(tok.tokenize(p))[0] for p in ODD_PIECES]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tokenizer, mini_index):
    """test_eval's scripted model (its research trajectory on Q1, "Paris" for naive-gen), head size 32, also
    taught: after SPELL_Q + the odd ids, " odd"; after SPELL_Q + the tokenizer's ids, " canonical"; after
    SAY_Q, the odd ids."""
    tok = tokenizer
    odd, canonical = odd_ids(tok), enc(" Animorphs", tok)
    assert odd != canonical and tok.decode(odd) == tok.decode(canonical)
    extra = [[(enc(SPELL_Q, tok) + odd, 0), (enc(" odd", tok) + [tok.eos_token_id], 1)],
             [(enc(SPELL_Q, tok) + canonical, 0), (enc(" canonical", tok) + [tok.eos_token_id], 1)],
             [(enc(SAY_Q, tok), 0), (odd + [tok.eos_token_id], 1)]]
    return train_scripted_model(tmp_path_factory.mktemp("scripted32-instruct"), tok, mini_index, heads=2, kv_heads=1,
                                extra=extra)


@pytest.fixture(scope="module")
def evals(vllm_model_dir, mini_index, tmp_path_factory):
    """04 on the first two mini HotpotQA questions (Q1 first), all five methods, with hf and with vLLM."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    out = tmp_path_factory.mktemp("evals")
    common = ["04_eval.py", "--model", vllm_model_dir, "--retriever", mini_index, *CPU, "--limit", "2",
              "--methods", *METHODS]
    hf = run_script(*common, "--output_dir", out / "hf", env={"OMP_NUM_THREADS": "1"})
    # the command returns: before the fix it wrote its results and then waited forever for vLLM's engine process
    vl = run_vllm(*common, "--backend", "vllm", "--output_dir", out / "vllm", timeout=900)
    return {"dir": out, "hf": hf, "vllm": vl}


@needs_vllm
def test_04_vllm_back_end_runs_every_method_and_matches_hf(evals):
    for m in METHODS:
        hf = read_jsonl(evals["dir"] / "hf" / m / TAG / "predictions.jsonl")
        vl = read_jsonl(evals["dir"] / "vllm" / m / TAG / "predictions.jsonl")
        assert [r["prediction"] for r in vl] == [r["prediction"] for r in hf], m
        if m == "research":  # token layout: sampled ids kept, result blocks spliced as ids, as the hf path's
            assert [r["trajectory"]["completion_ids"] for r in vl] == [r["trajectory"]["completion_ids"] for r in hf]
            assert [r["trajectory"]["mask_runs"] for r in vl] == [r["trajectory"]["mask_runs"] for r in hf]
            assert vl[0]["prediction"] == "yes" and vl[0]["num_searches"] == 1  # the script, followed
    assert read_jsonl(evals["dir"] / "vllm" / "naive-gen" / TAG / "predictions.jsonl")[0]["prediction"]
    assert json.loads((evals["dir"] / "vllm" / "results.json").read_text())["header"]["backend"] == "vllm"


@needs_vllm
def test_04_refuses_research_prompts_the_engine_cannot_hold(tmp_path, vllm_model_dir, mini_index):
    """--backend vllm's engine holds the model's context (4096 here): a research prompt that leaves less than
    --max_completion_length of it is refused before the engine starts."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"id": "long", "question": "Why? " * 1860, "golden_answers": ["x"]}) + "\n")
    p = run_vllm("04_eval.py", "--model", vllm_model_dir, "--retriever", mini_index, *CPU, "--datasets", data,
                 "--backend", "vllm", "--methods", "research", "--output_dir", tmp_path / "o", check=False, timeout=300)
    line = one_line_error(p)
    assert "question long: its prompt (" in line
    assert line.endswith("+ --max_completion_length 256 exceed the engine's length 4096 (the model's context)")


# ---------------------------------------------------------------------------------------------
# vLLM's OpenAI server (one, on loopback): 04 --backend api, and server mode's request length
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir):
    """`python -m vllm.entrypoints.openai.api_server` (`vllm serve` needs the "vllm" distribution name; the CPU
    build is "vllm-cpu") on the scripted model, fp32 as 04's CPU default, max_model_len SERVER_LEN."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    log = open(Path(vllm_model_dir).parent / "server.log", "w")
    proc = subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", vllm_model_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(SERVER_LEN),
                             "--dtype", "float32", "--seed", "0"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"vLLM's server did not come up in 10 min: {Path(log.name).read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@needs_vllm
def test_04_api_back_end_against_vllms_server_is_token_exact(evals, vllm_server, vllm_model_dir, mini_index):
    """The same rows as the offline engine's, token for token: the context goes as ids, the sampled ids come
    back (before: as text both ways, and the server's re-tokenisation changed rows)."""
    out = evals["dir"] / "api"
    p = run_script("04_eval.py", "--model", vllm_model_dir, "--retriever", mini_index, *CPU, "--limit", "2",
                   "--methods", *METHODS, "--backend", "api", "--api_base_url", vllm_server + "/v1",
                   "--output_dir", out, env={"OMP_NUM_THREADS": "1"})
    assert f"(ids -> ids): token-exact rows; max_model_len {SERVER_LEN}" in p.stderr
    for m in METHODS:
        vl = read_jsonl(evals["dir"] / "vllm" / m / TAG / "predictions.jsonl")
        api = read_jsonl(out / m / TAG / "predictions.jsonl")
        assert [r["prediction"] for r in api] == [r["prediction"] for r in vl], m
    vl = read_jsonl(evals["dir"] / "vllm" / "research" / TAG / "predictions.jsonl")
    api = read_jsonl(out / "research" / TAG / "predictions.jsonl")
    assert [r["trajectory"]["completion_ids"] for r in api] == [r["trajectory"]["completion_ids"] for r in vl]


@needs_vllm
def test_api_rows_keep_ids_that_text_would_change(vllm_server, vllm_model_dir, tokenizer):
    """Ids that text would change, both ways: the server continues exactly the context's ids (SPELL_Q + the
    odd ids -> " odd"; sent as text it reads the tokenizer's ids -> " canonical"), and the row keeps exactly
    the ids the server sampled (SAY_Q -> the odd ids; read back from text they would become " Anim" ...)."""
    api = __import__("extras.api_backend", fromlist=["api_backend"])
    tok = tokenizer
    args = SimpleNamespace(api_base_url=vllm_server + "/v1", model=vllm_model_dir, batch_size=2)
    generate, _ = api.backend(args, tok, {tok.eos_token_id})
    rows, logprobs = generate([enc(SPELL_Q, tok) + odd_ids(tok), enc(SAY_Q, tok)], 8)
    assert rows == [enc(" odd", tok) + [tok.eos_token_id], odd_ids(tok) + [tok.eos_token_id]] and logprobs is None


@needs_vllm
def test_api_refuses_research_prompts_the_server_cannot_hold(tmp_path, vllm_server, vllm_model_dir, mini_index):
    p = run_script("04_eval.py", "--model", vllm_model_dir, "--retriever", mini_index, *CPU, "--limit", "1",
                   "--max_completion_length", "1900", "--backend", "api", "--api_base_url", vllm_server + "/v1",
                   "--methods", "research", "--output_dir", tmp_path / "o", check=False)
    line = one_line_error(p)
    assert f"+ --max_completion_length 1900 exceed the engine's length {SERVER_LEN} (the server's max_model_len" in line


@needs_vllm
def test_03_refuses_a_server_shorter_than_the_budget(tmp_path, vllm_server):
    p = run_vllm("03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--use_vllm", "true", "--vllm_mode",
                 "server", "--vllm_server_base_url", vllm_server, "--max_completion_length", "1600",
                 "--output_dir", tmp_path / "g", check=False, timeout=300)
    assert one_line_error(p) == (f"error: the vLLM server's ({vllm_server}) max_model_len is {SERVER_LEN}, shorter "
                                 f"than --max_prompt_length 512 + --max_completion_length 1600 = 2112")


SERVER_MODE = """
import json, sys
from accelerate import Accelerator
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
import utils
from extras import vllm_rollout

url, model, out = sys.argv[1:4]
tok = utils.load_tokenizer(model)
# TRL's server-mode engine handle, as the trainer builds it, minus init_communicator (NCCL weight transfer:
# CUDA only); the rest is TRL's own generate through TRL's own client.
vg = VLLMGeneration.__new__(VLLMGeneration)
vg.__dict__.update(mode="server", accelerator=Accelerator(cpu=True), vllm_client=VLLMClient(base_url=url),
                   temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, logprobs=0,
                   max_completion_length=16, structured_outputs_regex=None, tensor_parallel_size=1,
                   generation_kwargs={"stop": ["</search>"], "include_stop_str_in_output": True})
max_len = vllm_rollout.server_max_model_len(url)
words = tok("one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]
many = words * (max_len // len(words) + 1)
long = many[: max_len - 40]  # room for 40 tokens
short = words[:5]
full = many[:max_len]  # no room at all
report = {"max_len": max_len, "calls": []}
# what the rollout asked before: the largest budget for every row of the request
vg.max_completion_length = 300
try:
    vg.generate(prompts=[long, short], images=None, num_generations=1)
except Exception as e:
    report["uncapped"] = str(e)[:300]
generate_once = vg.generate


def spy(prompts, **kw):  # records each request's longest prompt and max_tokens
    report["calls"].append([max(map(len, prompts)), vg.max_completion_length])
    return generate_once(prompts=prompts, **kw)


vg.generate = spy
generate = vllm_rollout.make_generate(vg, vg.accelerator, tok, {tok.eos_token_id}, max_len)
ids, logprobs = generate([long, short, full], 300)
report.update(lengths=[len(x) for x in ids], logprobs=[len(x) for x in logprobs],
              stopped=[utils.cut_at_stop(x, tok, {tok.eos_token_id}, [])[1] != "length" for x in ids])
json.dump(report, open(out, "w"))
"""


@needs_vllm
def test_server_mode_never_asks_for_more_than_fits(vllm_server, vllm_model_dir, tmp_path):
    """TRL's server client sends every row in one request with one max_tokens; vLLM answers HTTP 400 when the
    longest prompt plus max_tokens exceeds max_model_len (before: the largest budget was asked for, and the
    call failed). Each call is capped by the longest context, rows go again until they have their budget or
    stopped, and a context that fills the server ends there, out of budget."""
    run_vllm("-c", SERVER_MODE, vllm_server, vllm_model_dir, tmp_path / "out.json", timeout=300)
    r = json.loads((tmp_path / "out.json").read_text())
    assert "400" in r["uncapped"] and "maximum context length" in r["uncapped"]  # vLLM's answer to the old request
    assert r["max_len"] == SERVER_LEN and r["logprobs"] == r["lengths"]
    assert all(longest + max_tokens <= SERVER_LEN for longest, max_tokens in r["calls"])
    assert r["calls"][0] == [SERVER_LEN - 40, 40]  # capped by the longest context
    long_n, short_n, full_n = r["lengths"]
    assert 0 < long_n <= 40 and full_n == 0
    # the short row: its whole budget over more calls, unless it stopped (EOS, </search>)
    assert short_n == 300 or r["stopped"][1], r
    assert len(r["calls"]) >= 2 or r["stopped"][1], r


# ---------------------------------------------------------------------------------------------
# 03 --use_vllm on the colocated engine (one engine): the command, with a look inside
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_model32(tokenizer, tmp_path_factory):
    """test_grpo's taught model (one question answered at once, one searched once), 4 heads of 32."""
    import torch
    import transformers
    tok = tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    pairs = [(enc(p, tok), scripted_completion(tok, p)[0]) for p in (SEARCH_Q, DIRECT_Q)]
    teach(model, pairs, tok.eos_token_id, lr=3e-3)  # (1e-2 does not converge at this width)
    out = tmp_path_factory.mktemp("search32")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@needs_vllm
def test_03_colocated_vllm_two_steps(search_model32, mini_index, tmp_path):
    """The CPU preset's command with --use_vllm true and two steps (temperature 0.3, at which the taught model
    follows its script), run through
    tests/vllm_grpo_driver.py (see there): layout and log-probs of the vLLM rollout, the weight sync reaching
    the engine, finite losses, the final model saved, and the command returning."""
    data = write_train_data(tmp_path / "train.jsonl")
    out = tmp_path / "grpo"
    p = run_vllm("tests/vllm_grpo_driver.py", tmp_path / "report.json", "--",
                 "--config", "configs/grpo_cpu.yaml", "--model", search_model32, "--use_vllm", "true",
                 "--max_steps", "2", "--train_data", data, "--retriever", mini_index, "--output_dir", out,
                 "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "300",
                 "--temperature", "0.3", "--vllm_importance_sampling_correction", "true",
                 "--report_to", "none", timeout=1200)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert len(report["checks"]) == 6 and not failed, failed
    assert report["last_rollouts_logprobs_ok"]
    # the engine's log-probs of the fixed sequence are the policy's (bf16 engine vs fp32 policy: largest
    # difference within 0.1; measured 0.02 and 0.08) at the start, and after TRL's sync of a policy moved by
    # more than 20 times that (measured 8.2); before the sync they are the old weights' (8.2 off)
    tolerance = 0.1
    assert report["engine_vs_policy_before"] < tolerance and report["engine_vs_policy_after"] < tolerance, report
    assert report["policy_moved"] > 20 * tolerance and report["engine_vs_policy_unsynced"] > 20 * tolerance, report
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    # TRL's own measure, on the trained tokens of step 2 (its rollouts came after TRL's first sync): vLLM's
    # sampling log-probs (temperature-scaled, as TRL's) against the policy's
    assert steps[1]["sampling/sampling_logp_difference/mean"] < 0.05, steps[1]  # measured 0.006
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "vllm True" in p.stdout


@needs_vllm
def test_03_two_processes_each_with_a_colocated_vllm(search_model32, mini_index, tmp_path):
    """README's CPU scale-out check with --use_vllm true: accelerate launch, two CPU processes over gloo, each
    with its own colocated engine (TRL's external_launcher, tensor parallel 1), one GRPO step, the final model
    written by rank 0."""
    data = write_train_data(tmp_path / "train.jsonl")
    out = tmp_path / "grpo"
    p = run_vllm("-m", "accelerate.commands.launch", "--config_file", "configs/accelerate_ddp.yaml",
                 "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29519",
                 "03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--use_cpu", "true", "--use_vllm", "true",
                 "--model", search_model32, "--train_data", data, "--retriever", mini_index, "--output_dir", out,
                 "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
                 "--max_completion_length", "300", "--temperature", "0.3", "--report_to", "none",
                 env={"OMP_NUM_THREADS": "1"}, timeout=1200)
    assert "vllm True | processes 2" in p.stdout
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward" in m]
    assert [m["step"] for m in steps] == [1] and math.isfinite(steps[0]["loss"])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# On a CUDA machine with vLLM in the test venv (make setup-gpu): the trainer in-process, and server mode with
# its NCCL weight sync (CUDA only). Skipped here with the reason.
# ---------------------------------------------------------------------------------------------
def check_vllm_rollout(trainer, tokenizer):
    out = trainer.search_rollout([SEARCH_Q, DIRECT_Q])
    for q, ids, mask, logprobs in zip((SEARCH_Q, DIRECT_Q), out["completion_ids"], out["env_mask"], out["logprobs"]):
        assert (ids, mask) == scripted_completion(tokenizer, q)  # same layout as the HF back end
        assert len(logprobs) == len(ids) and all((lp is None) == (m == 0) for lp, m in zip(logprobs, mask))


def cuda_devices() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


@pytest.mark.skipif(cuda_devices() < 1, reason="the in-process colocate test needs a CUDA GPU (none here)")
def test_vllm_colocate_backend_same_layout_on_a_gpu(search_model32, tokenizer, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed in the test venv (make setup-gpu)")
    trainer = make_trainer(load_script(), search_model32, tokenizer, tmp_path, use_vllm=True, vllm_mode="colocate",
                           vllm_gpu_memory_utilization=0.2, vllm_max_model_length=1024)
    check_vllm_rollout(trainer, tokenizer)
    trainer.train()  # one step: weight sync, importance-sampling correction with our log-probs


@pytest.mark.skipif(cuda_devices() < 2, reason="vLLM server mode needs 2 CUDA GPUs (server, trainer)")
def test_vllm_server_backend_same_layout_on_gpus(search_model32, tokenizer, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed in the test venv (make setup-gpu)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "trl.cli.main", "vllm-serve", "--model", search_model32,
                               "--port", str(port), "--gpu_memory_utilization", "0.3", "--max_model_len", "1024"],
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES="1"), start_new_session=True)
    try:
        trainer = make_trainer(load_script(), search_model32, tokenizer, tmp_path, use_vllm=True,
                               vllm_mode="server", vllm_server_base_url=f"http://127.0.0.1:{port}")
        check_vllm_rollout(trainer, tokenizer)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
