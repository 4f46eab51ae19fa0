"""vLLM's CPU build against the Hugging Face fast rollout (CPU), one run, the same rows: the search rollout of
03 (utils.search_rollout, the CPU preset's search settings) on the same prompts, greedy on both back ends so
that both do (nearly) the same work, once with generate calls cut at 16 tokens (the CPU preset's
--max_new_tokens_per_call) and once uncut. vLLM is TRL's colocated engine exactly as 03 --use_vllm builds it
(TRL's VLLMGeneration: in-process, external_launcher, bf16 on the CPU; extras/vllm_cpu.py's weight-reload
workaround and KV-cache size), driven by extras/vllm_rollout.make_generate; its construction is the engine
start. Hugging Face: utils.hf_generate_fn(fast=True) on the fp32 policy (03 with --dtype float32) and on a
bf16 copy (03's --dtype auto on a CPU with native bf16).
Reports model tokens (mask 1) per second of rollout, and whether the two back ends' rows are identical.

Run it with the vLLM venv (make setup-vllm-cpu) after a warm-up in runs/sft; record `uptime` beside it:
    .venv-vllm/bin/python benchmarks/bench_vllm_cpu.py --model runs/sft --out benchmarks/results/vllm_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402


def rollout(prompts, generate, search, tok, eos_ids, per_call: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    rows = utils.search_rollout(prompts, generate, search, tok, eos_ids, max_completion_length=512, topk=3,
                                max_searches=4, passage_max_words=30, max_new_tokens_per_call=per_call)
    return rows, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "sft"))
    p.add_argument("--retriever", default=str(ROOT / "runs" / "index_mini"))
    p.add_argument("--questions", type=int, default=8, help="rows: the first N of data/mini/train_sometimes.jsonl")
    p.add_argument("--packed", action="store_true", help="vLLM's own packed CPU kernels: no weight-reload "
                   "workaround, so no weight sync either (what a training run cannot use; for comparison)")
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    a = p.parse_args()

    import torch
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    cpu = importlib.import_module("extras.vllm_cpu")
    vllm_rollout = importlib.import_module("extras.vllm_rollout")
    tok = utils.load_tokenizer(a.model)
    model = utils.load_model(a.model, "float32", device="cpu")  # 03's policy on a CPU
    eos_ids = utils.eos_token_ids(tok, model.generation_config)
    search = utils.load_retriever(a.retriever)
    qs = utils.load_questions(str(ROOT / "data" / "mini" / "train_sometimes.jsonl"))[: a.questions]
    prompts = [utils.encode(utils.build_prompt(q["question"], tok), tok) for q in qs]
    result = {"rows": len(prompts), "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()}

    # what 03's prepare() does on the CPU, then TRL's own engine construction
    max_len = 512 + 512
    if not a.packed:
        cpu.keep_weights_reloadable()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu.kv_cache_gib(a.model, len(prompts) * max_len, 2)))
    accelerator = Accelerator(cpu=True)
    t0 = time.perf_counter()
    vg = VLLMGeneration(model, accelerator, tok, mode="colocate", max_model_length=max_len,
                        max_num_seqs=len(prompts), temperature=0.0, logprobs=0,
                        generation_kwargs={"stop": [utils.SEARCH_CLOSE], "include_stop_str_in_output": True})
    result["engine_start_s"] = time.perf_counter() - t0
    result["packed_kernels"] = a.packed
    if not a.packed:
        t0 = time.perf_counter()
        vg.sync_weights()  # one weight sync, as TRL makes before each step's rollout
        result["weight_sync_s"] = time.perf_counter() - t0
    vllm_generate = vllm_rollout.make_generate(vg, accelerator, tok, eos_ids, max_len)
    hf_generate = utils.hf_generate_fn(model, tok, fast=True)
    # 03's default rollout on a CPU with native bf16 (--dtype auto): the same fast generate on a bf16 copy
    hf_bf16_generate = utils.hf_generate_fn(utils.load_model(a.model, "bfloat16", device="cpu"), tok, fast=True)

    for per_call in (16, 0):
        runs = {}
        for name, generate in (("hf_fast", hf_generate), ("hf_fast_bf16", hf_bf16_generate), ("vllm", vllm_generate)):
            rows, seconds = rollout(prompts, generate, search, tok, eos_ids, per_call)
            model_tokens = sum(sum(r.mask) for r in rows)
            runs[name] = {"seconds": round(seconds, 1), "model_tokens": model_tokens,
                          "retrieved_tokens": sum(r.mask.count(0) for r in rows),
                          "tokens_per_s": round(model_tokens / seconds, 1), "ids": [r.completion_ids for r in rows]}
            print(f"[max_new_tokens_per_call {per_call}] {name}: {seconds:.1f} s, {model_tokens} model tokens, "
                  f"{model_tokens / seconds:.1f} tokens/s", flush=True)
        same = sum(x == y for x, y in zip(runs["hf_fast"]["ids"], runs["vllm"]["ids"]))
        same_bf16 = sum(x == y for x, y in zip(runs["hf_fast"]["ids"], runs["hf_fast_bf16"]["ids"]))
        for r in runs.values():
            del r["ids"]
        result[f"per_call_{per_call}"] = {**runs, "identical_rows": same, "identical_rows_hf_bf16": same_bf16}
        print(f"[max_new_tokens_per_call {per_call}] rows identical to hf_fast: vllm {same}, hf_fast_bf16 "
              f"{same_bf16} of {len(prompts)}", flush=True)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
