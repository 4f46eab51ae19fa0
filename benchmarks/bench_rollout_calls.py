"""Where a search rollout's time goes, call by call (CPU). Two measurements, one run:

1. One generate call on 8 rows of ~340 tokens (cached) that resumes them with: no new ids / ONE row
   with a 130-token result block / all eight with one; the block prefilled inside the batched call
   (extras.fast_rollout.PREFILL_ALONE disabled: every row padded to the block's width) and alone (the default).
2. A sampled search rollout (2 questions x 4, the CPU preset's search settings) traced call by call:
   rows, decode steps and seconds per generate call, total decode steps against the longest row.
Both use the KV-cache-reusing generate (utils.hf_generate_fn(..., fast=True), extras/fast_rollout.py:
--fast_rollout true), the only one that keeps a cache for a block to be prefilled into.

    .venv/bin/python benchmarks/bench_rollout_calls.py --model runs/sft --chunk 32 --seed 1002
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

fast_rollout = importlib.import_module("extras.fast_rollout")


def one_call(model, tok, alone: int) -> dict:
    """Seconds of a 1-token call resuming 0 / 1 / 8 rows with a 130-token block, after a 40-token call."""
    fast_rollout.PREFILL_ALONE = alone
    qs = utils.load_questions(str(ROOT / "data" / "mini" / "train.jsonl"))[:8]
    ctx = [utils.encode(utils.build_prompt(q["question"], tok), tok) for q in qs]
    gen = utils.hf_generate_fn(model, tok, fast=True)  # greedy, KV cache kept across calls
    ctx = [c + o for c, o in zip(ctx, gen(ctx, 40))]
    block = tok(" <result>\n" + "word " * 128 + "\n</result>", add_special_tokens=False)["input_ids"]
    out = {}
    for label, extra in (("no block", [[]] * 8), ("one row +130", [block] + [[]] * 7), ("all +130", [block] * 8)):
        contexts = [c + e for c, e in zip(ctx, extra)]
        t0 = time.perf_counter()
        new = gen(contexts, 1)
        out[label] = time.perf_counter() - t0
        ctx = [c + n for c, n in zip(contexts, new)]
    return out


def trace(model, tok, search, chunk: int, seed: int) -> None:
    import torch
    torch.manual_seed(seed)
    qs = utils.load_questions(str(ROOT / "data" / "mini" / "train.jsonl"))[:2]
    prompts = [utils.encode(utils.build_prompt(q["question"], tok), tok) for q in qs for _ in range(4)]
    sampling = copy.deepcopy(model.generation_config)  # training's sampling: temperature 1, top-p 1, top-k 0
    sampling.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    gen = utils.hf_generate_fn(model, tok, sampling, fast=True)
    calls = []

    def spy(contexts, n):
        t0 = time.perf_counter()
        out = gen(contexts, n)
        calls.append((len(contexts), max(len(o) for o in out), round(time.perf_counter() - t0, 1)))
        return out

    t0 = time.perf_counter()
    rows = utils.search_rollout(prompts, spy, search, tok, utils.eos_token_ids(tok, model.generation_config),
                                max_completion_length=512, topk=3, max_searches=4, passage_max_words=30,
                                max_new_tokens_per_call=chunk)
    model_tokens = [sum(r.mask) for r in rows]  # mask 1 = the model's own tokens, 0 = retrieved
    print(f"[trace seed {seed}, max_new_tokens_per_call {chunk}] {time.perf_counter() - t0:.1f}s, {len(calls)} calls, "
          f"{sum(c[1] for c in calls)} decode steps (longest row {max(model_tokens)} model tokens), "
          f"model tokens {sum(model_tokens)}, retrieved tokens "
          f"{sum(r.mask.count(0) for r in rows)} | per call (rows, steps, s): {calls}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "sft"))
    p.add_argument("--retriever", default=str(ROOT / "runs" / "index_mini"))
    p.add_argument("--chunk", type=int, default=32, help="max_new_tokens_per_call of the traced rollout")
    p.add_argument("--seed", type=int, default=1002)
    args = p.parse_args()
    model, tok = utils.load_model(args.model, device="cpu"), utils.load_tokenizer(args.model)
    default = fast_rollout.PREFILL_ALONE
    for name, alone in (("block inside the batched call", 10**9), ("block prefilled alone", default)):
        t = one_call(model, tok, alone)
        print(f"[one call, {name}] " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
    fast_rollout.PREFILL_ALONE = default
    trace(model, tok, utils.load_retriever(args.retriever), args.chunk, args.seed)


if __name__ == "__main__":
    main()
