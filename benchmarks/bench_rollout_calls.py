"""Where a search rollout's time goes, call by call (CPU). Two measurements, one run:

1. One generate call on 8 rows of ~340 tokens (cached) that resumes them with: no new ids / ONE row
   with a 130-token result block / all eight with one; the block prefilled inside the batched call
   (utils.PREFILL_ALONE disabled: every row padded to the block's width) and alone (the default).
2. A sampled search rollout (2 questions x 4, the CPU preset's search settings) traced call by call:
   rows, decode steps and seconds per generate call, total decode steps against the longest row.

    .venv/bin/python benchmarks/bench_rollout_calls.py --model runs/sft --chunk 32 --seed 1002
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402


def one_call(model, tok, alone: int) -> dict:
    """Seconds of a 1-token call resuming 0 / 1 / 8 rows with a 130-token block, after a 40-token call."""
    utils.PREFILL_ALONE = alone
    qs = utils.load_questions(str(ROOT / "data" / "mini" / "train.jsonl"))[:8]
    ctx = [utils.encode_prompt(utils.build_prompt(q["question"], tok), tok) for q in qs]
    gen = utils.hf_generate_fn(model, tok, do_sample=False)
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
    prompts = [utils.encode_prompt(utils.build_prompt(q["question"], tok), tok) for q in qs for _ in range(4)]
    gen = utils.hf_generate_fn(model, tok, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    calls = []

    def spy(contexts, n):
        t0 = time.perf_counter()
        out = gen(contexts, n)
        calls.append((len(contexts), max(len(o) for o in out), round(time.perf_counter() - t0, 1)))
        return out

    t0 = time.perf_counter()
    rows = utils.search_rollout(prompts, spy, search, tok, utils.eos_token_ids(tok, model), max_completion_length=512,
                                topk=3, max_searches=4, passage_max_words=30, max_new_tokens_per_call=chunk)
    print(f"[trace seed {seed}, max_new_tokens_per_call {chunk}] {time.perf_counter() - t0:.1f}s, {len(calls)} calls, "
          f"{sum(c[1] for c in calls)} decode steps (longest row {max(r.num_model_tokens for r in rows)} model tokens), "
          f"model tokens {sum(r.num_model_tokens for r in rows)}, retrieved tokens "
          f"{sum(r.num_retrieved_tokens for r in rows)} | per call (rows, steps, s): {calls}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "sft"))
    p.add_argument("--retriever", default=str(ROOT / "runs" / "index_mini"))
    p.add_argument("--chunk", type=int, default=32, help="max_new_tokens_per_call of the traced rollout")
    p.add_argument("--seed", type=int, default=1002)
    args = p.parse_args()
    model, tok = utils.load_model(args.model, device="cpu"), utils.load_tokenizer(args.model)
    default = utils.PREFILL_ALONE
    for name, alone in (("block inside the batched call", 10**9), ("block prefilled alone", default)):
        t = one_call(model, tok, alone)
        print(f"[one call, {name}] " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
    utils.PREFILL_ALONE = default
    trace(model, tok, utils.load_retriever(args.retriever), args.chunk, args.seed)


if __name__ == "__main__":
    main()
