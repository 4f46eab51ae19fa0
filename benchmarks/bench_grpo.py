"""GRPO benchmark (CPU): the search rollout and one SearchGRPOTrainer step against plain generation and
TRL's stock GRPOTrainer, with the same model, prompts, batch and lengths, measured side by side in one
run (interleaved: plain, search, plain, search, ...; medians reported).

1. Rollout throughput, model tokens per second: utils.search_rollout with the Hugging Face back end
   (utils.hf_generate_fn(..., fast=True): extras/fast_rollout.py, KV cache kept across turns), for each
   --chunks value of max_new_tokens_per_call, against ONE plain batched model.generate call on the same prompts and
   batch that produces the same rows' worth of model tokens. A batched generate runs until its
   longest row is done, so "same rows" = every row forced to the longest row's model-token count
   (max n_i steps), credited with the same N = sum n_i useful tokens: target >= 0.8x. "Packed" =
   every row forced to ceil(N / batch) tokens (equal lengths, no idle rows: the best case plain
   generate could ever have, reported for context). The search loop pays for its pauses (rows that
   searched wait for the slowest row of the call), the prefill of each result block, the stop-string
   check and retrieval. Also shown: the loop without KV-cache reuse (fast=False: one plain batched generate
   per call, every call re-reads every context). Generate and retrieval seconds are summed by wrapping the
   generate and search functions handed to utils.search_rollout.
2. Retrieval's share of the rollout's wall time. Target: < 5%.
3. One GRPO step (rollout + reference log-probs + reward + forward/backward + optimizer), full-model
   fp32: SearchGRPOTrainer (--fast_rollout true, --max_new_tokens_per_call = the last --chunks value)
   against TRL's GRPOTrainer without search on the same prompts and batch,
   its completions forced to the search run's longest completion (so the padded training batch has
   the same shape). Also the step minus its generation ("train"). The first step of each trainer is
   a warm-up and is not counted. Target: <= 1.3x.

Sampling as in training: temperature 1.0, top-p 1, top-k 0. Search settings = the CPU preset's.

    .venv/bin/python benchmarks/bench_grpo.py --model runs/sft --threads 1   # ~40 min on 2 busy cores
    .venv/bin/python benchmarks/bench_grpo.py --model runs/sft --skip_train --repeats 3
Use a warmed-up model (runs/sft): the bundled base model rarely searches, so its rollouts would not
exercise the loop. Writes runs/bench_grpo.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "sft") if (ROOT / "runs" / "sft" / "config.json").is_file()
                   else utils.DEFAULT_MODEL)
    p.add_argument("--retriever", default=str(ROOT / "runs" / "index_mini"))
    p.add_argument("--data", default=str(ROOT / "data" / "mini" / "train.jsonl"))
    p.add_argument("--questions", type=int, default=2, help="questions per batch")
    p.add_argument("--group", type=int, default=4, help="rollouts per question (batch = questions x group)")
    p.add_argument("--max_completion_length", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--passage_max_words", type=int, default=30)
    p.add_argument("--max_searches", type=int, default=4)
    p.add_argument("--chunks", default="0,32", help="max_new_tokens_per_call values to run (0 = no limit)")
    p.add_argument("--repeats", type=int, default=2, help="rollout measurements per variant")
    p.add_argument("--train_steps", type=int, default=1, help="GRPO steps measured per trainer, after one warm-up step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--skip_train", action="store_true", help="only the rollout part")
    p.add_argument("--skip_no_reuse", action="store_true", help="skip the loop without KV-cache reuse")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_grpo.json"))
    return p.parse_args()


def prompts_for(args, tok, offset: int = 0) -> tuple[list[dict], list[list[int]]]:
    qs = utils.load_questions(args.data)[offset: offset + args.questions]
    rows = [{"prompt": utils.build_prompt(q["question"], tok), "golden_answers": q["golden_answers"],
             "question_id": q["id"], "question": q["question"]} for q in qs]
    return rows, [utils.encode(r["prompt"], tok) for r in rows for _ in range(args.group)]


# ---------------------------------------------------------------------------------------------
# 1-2. Rollouts
# ---------------------------------------------------------------------------------------------
def sampling_config(model):
    """Training's sampling (temperature 1, top-p 1, top-k 0) as a GenerationConfig for utils.hf_generate_fn."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    return config


def timed(fn, timings: dict, key: str):
    """fn, adding the seconds spent inside it to timings[key + "_s"] and counting calls in timings[key + "_calls"]."""
    def call(*a):
        t0 = time.perf_counter()
        try:
            return fn(*a)
        finally:
            timings[key + "_s"] += time.perf_counter() - t0
            timings[key + "_calls"] += 1
    return call


def search_run(args, model, tok, search, prompt_ids, seed: int, reuse: bool, chunk: int) -> dict:
    import torch
    torch.manual_seed(seed)
    generate = utils.hf_generate_fn(model, tok, sampling_config(model), fast=reuse)
    timings = {"generate_s": 0.0, "generate_calls": 0, "retrieve_s": 0.0, "retrieve_calls": 0}
    t0 = time.perf_counter()
    rows = utils.search_rollout(prompt_ids, timed(generate, timings, "generate"), timed(search, timings, "retrieve"),
                                tok, utils.eos_token_ids(tok, model.generation_config),
                                max_completion_length=args.max_completion_length, topk=args.topk,
                                max_searches=args.max_searches, passage_max_words=args.passage_max_words,
                                max_new_tokens_per_call=chunk)
    wall = time.perf_counter() - t0
    del generate  # the fast path keeps its last KV cache: free it before the plain run
    model_tokens = [sum(r.mask) for r in rows]  # mask 1 = the model's own tokens, 0 = retrieved
    n = sum(model_tokens)
    return {"chunk": chunk, "reuse_cache": reuse, "wall_s": wall, "model_tokens": n, "tokens_per_s": n / wall,
            "longest_row": max(model_tokens),
            "retrieved_tokens": sum(r.mask.count(0) for r in rows),
            "generate_s": timings["generate_s"], "retrieve_s": timings["retrieve_s"],
            "generate_calls": timings["generate_calls"], "retrieve_share": timings["retrieve_s"] / wall,
            "searches_per_rollout": statistics.mean(r.num_searches for r in rows),
            "eos_rate": statistics.mean(r.ended_with_eos for r in rows)}


def plain_run(model, tok, prompt_ids, new_tokens: int, seed: int, credited: int | None = None) -> dict:
    """One batched generate, every row forced to new_tokens; tokens/s counts `credited` tokens (default:
    all it made)."""
    import torch
    torch.manual_seed(seed)
    pad = tok.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    wall = time.perf_counter() - t0
    made = (out.shape[1] - width) * len(prompt_ids)
    n = made if credited is None else credited
    return {"wall_s": wall, "new_tokens_per_row": new_tokens, "tokens_made": made, "tokens_credited": n,
            "tokens_per_s": n / wall}


def bench_rollouts(args, results: dict) -> None:
    model = utils.load_model(args.model, device="cpu")
    tok = utils.load_tokenizer(args.model)
    search = utils.load_retriever(args.retriever)
    _, prompt_ids = prompts_for(args, tok)
    variants = [(True, int(c)) for c in args.chunks.split(",")] + ([] if args.skip_no_reuse else [(False, 0)])
    runs = []
    for rep in range(args.repeats):
        seed = 1000 + rep
        for reuse, chunk in variants:
            s = search_run(args, model, tok, search, prompt_ids, seed, reuse=reuse, chunk=chunk)
            same = plain_run(model, tok, prompt_ids, s["longest_row"], seed, credited=s["model_tokens"])
            row = {"search": s, "plain_same_rows": same, "ratio_same_rows": s["tokens_per_s"] / same["tokens_per_s"]}
            line = (f"[rollout {rep + 1}/{args.repeats}, cache reuse {reuse}, max_new_tokens_per_call {chunk}] search "
                    f"{s['model_tokens']} model tokens (longest row {s['longest_row']}) in {s['wall_s']:.1f}s "
                    f"({s['tokens_per_s']:.2f}/s; {s['generate_calls']} generate calls, "
                    f"{s['searches_per_rollout']:.2f} "
                    f"searches/rollout, retrieval {100 * s['retrieve_share']:.2f}%) | plain, same rows "
                    f"{same['wall_s']:.1f}s -> ratio {row['ratio_same_rows']:.2f}")
            if (reuse, chunk) == variants[0]:  # the packed best case, for the first variant only (it costs a run)
                packed = plain_run(model, tok, prompt_ids, math.ceil(s["model_tokens"] / len(prompt_ids)), seed)
                row.update(plain_packed=packed, ratio_packed=s["tokens_per_s"] / packed["tokens_per_s"])
                line += f" | plain, packed {packed['wall_s']:.1f}s -> ratio {row['ratio_packed']:.2f}"
            runs.append(row)
            print(line, flush=True)
    summary = {}
    for reuse, chunk in variants:
        mine = [r for r in runs if r["search"]["reuse_cache"] == reuse and r["search"]["chunk"] == chunk]
        summary[f"reuse={reuse},chunk={chunk}"] = {
            "median_ratio_same_rows": statistics.median(r["ratio_same_rows"] for r in mine),
            "median_ratio_packed": (statistics.median(r["ratio_packed"] for r in mine)
                                    if all("ratio_packed" in r for r in mine) else None),
            "median_retrieve_share": statistics.median(r["search"]["retrieve_share"] for r in mine)}
    results["rollout"] = {"runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------------
# 3. One GRPO step
# ---------------------------------------------------------------------------------------------
def load_grpo_script():
    spec = importlib.util.spec_from_file_location("grpo_search", ROOT / "03_grpo_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_search"] = module
    spec.loader.exec_module(module)
    return module


def grpo_config(args, out_dir: str, steps: int, **kw):
    from trl import GRPOConfig
    return GRPOConfig(output_dir=out_dir, num_generations=args.group,
                      per_device_train_batch_size=args.questions * args.group,
                      gradient_accumulation_steps=1, max_steps=steps, max_completion_length=args.max_completion_length,
                      beta=0.001, learning_rate=1e-6, lr_scheduler_type="constant", temperature=1.0, top_p=1.0, top_k=0,
                      bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                      disable_dropout=True, seed=0, shuffle_dataset=False, **kw)


def step_times(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "step_time" in h]


def bench_train(args, results: dict) -> None:
    import transformers
    from datasets import Dataset
    from trl import GRPOTrainer

    grpo = load_grpo_script()
    tok = utils.load_tokenizer(args.model)
    steps = 1 + args.train_steps
    rows = []
    for i in range(steps):
        rows += prompts_for(args, tok, offset=i * args.questions)[0]
    dataset = Dataset.from_list(rows)
    search = utils.load_retriever(args.retriever)
    sargs = utils.SearchArguments(retriever=args.retriever, topk=args.topk, passage_max_words=args.passage_max_words,
                                  max_searches=args.max_searches, fast_rollout=True,  # KV-cache reuse, as before
                                  max_new_tokens_per_call=int(args.chunks.split(",")[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        ours = grpo.SearchGRPOTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(utils.resolve_model(args.model)),
            args=grpo_config(args, tmp + "/ours", steps), train_dataset=dataset, processing_class=tok,
            search=search, search_args=sargs, trajectory_every=0)
        longest = []
        rollout = ours.rollout_func

        def recording_rollout(prompts, trainer=None):
            out = rollout(prompts, trainer)
            longest.append(max(len(c) for c in out["completion_ids"]))
            return out

        ours.rollout_func = recording_rollout
        ours.train()
        mine = step_times(ours)[1:]
        length = int(statistics.median(longest[1:]))
        del ours, rollout, recording_rollout  # free its policy, reference model and optimizer state first
        import gc
        gc.collect()

        def stock_reward(completions, golden_answers, **kw):
            return [utils.compute_reward(c, g, True)["reward"] for c, g in zip(completions, golden_answers)]

        stock = GRPOTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(utils.resolve_model(args.model)),
            reward_funcs=[stock_reward], train_dataset=dataset, processing_class=tok,
            args=grpo_config(args, tmp + "/stock", steps,
                             generation_kwargs={"min_new_tokens": length, "max_new_tokens": length}))
        gen_times = []
        generate = stock._generate

        def timed_generate(prompts):
            t0 = time.perf_counter()
            out = generate(prompts)
            gen_times.append(time.perf_counter() - t0)
            return out

        stock._generate = timed_generate
        stock.train()
        theirs = step_times(stock)[1:]
    our_steps = [h["step_time"] for h in mine]
    our_train = [h["time/train_s"] for h in mine]
    their_steps = [h["step_time"] for h in theirs]
    their_train = [s - g for s, g in zip(their_steps, gen_times[1:])]
    res = {
        "completion_length": length, "search_steps_s": our_steps, "search_train_s": our_train,
        "search_generate_s": [h["time/generate_s"] for h in mine],
        "search_retrieve_s": [h["time/retrieve_s"] for h in mine],
        "stock_steps_s": their_steps, "stock_train_s": their_train, "stock_generate_s": gen_times[1:],
        "step_ratio": statistics.median(our_steps) / statistics.median(their_steps),
        "train_ratio": statistics.median(our_train) / statistics.median(their_train),
    }
    results["train_step"] = res
    print(f"[GRPO step] batch {args.questions}x{args.group}, completions {length} tokens, max_new_tokens_per_call "
          f"{int(args.chunks.split(',')[-1])} | SearchGRPOTrainer "
          f"{statistics.median(our_steps):.1f}s (train {statistics.median(our_train):.1f}s) | stock GRPOTrainer "
          f"{statistics.median(their_steps):.1f}s (train {statistics.median(their_train):.1f}s) | ratio step "
          f"{res['step_ratio']:.2f}, train {res['train_ratio']:.2f}", flush=True)


def main():
    args = parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"args": vars(args), "torch_threads": torch.get_num_threads(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"model {args.model} | retriever {args.retriever} | batch {args.questions} questions x {args.group} | "
          f"max_completion_length {args.max_completion_length} | topk {args.topk} | passage_max_words "
          f"{args.passage_max_words} | torch threads {torch.get_num_threads()}", flush=True)
    bench_rollouts(args, results)
    if not args.skip_train:
        bench_train(args, results)
    print("\nsummary (medians over repeats)")
    for name, r in results["rollout"]["summary"].items():
        packed = f", / packed plain generate {r['median_ratio_packed']:.2f}x" if r["median_ratio_packed"] else ""
        print(f"  rollout [{name}]: search loop / plain generate of the same rows {r['median_ratio_same_rows']:.2f}x "
              f"(target >= 0.8){packed}; retrieval share {100 * r['median_retrieve_share']:.2f}% (target < 5%)")
    if "train_step" in results:
        t = results["train_step"]
        print(f"  GRPO step, SearchGRPOTrainer / stock GRPOTrainer: {t['step_ratio']:.2f}x full step, "
              f"{t['train_ratio']:.2f}x training part (target <= 1.3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
