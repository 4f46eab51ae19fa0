"""The warm-up's measured effect: greedy search rollouts (utils.search_rollout + utils.hf_generate_fn(...,
fast=True): greedy, KV cache kept across turns) on held-out HotpotQA dev questions with the model before and
after 02_sft_warmup.py: format-valid rate (utils.compute_reward's format_ok: valid format and ended with EOS),
mean searches per question, F1, EM, reward. Same prompts, retriever and budgets as GRPO and evaluation; the
search settings (retriever, topk, passage_max_words, max_searches, prompt_template, max_completion_length)
are read from the warmed-up checkpoint's warmup.json so both models meet the result blocks that were
trained on. Generate calls are not cut (max_new_tokens_per_call 0): only the seconds would change.

    python 02_sft_warmup.py --config configs/sft_cpu.yaml          # writes runs/sft
    python benchmarks/bench_sft_warmup.py --before models/SmolLM2-135M-Instruct --after runs/sft --n 50
"""

import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


@dataclass
class BenchArguments:
    before: str = utils.DEFAULT_MODEL
    """The model before the warm-up."""
    after: str = "runs/sft"
    """The warmed-up checkpoint (a 02_sft_warmup.py output folder, with its warmup.json)."""
    eval_data: str = str(utils.MINI_DATA / "hotpotqa_dev.jsonl")
    """Held-out questions (not used by the warm-up)."""
    n: int = 50
    """The first n questions."""
    batch_size: int = 25
    """Questions per generate batch."""
    output: str = ""
    """Also write the table and figures as json here."""


def measure(model_path: str, questions: list[dict], tokenizer, search: utils.SearchFn,
            sargs: utils.SearchArguments, max_completion_length: int, batch_size: int) -> dict:
    """Format-valid rate, mean searches per question, mean F1 / EM / reward and seconds, greedy decoding."""
    model = utils.load_model(model_path)
    generate = utils.hf_generate_fn(model, tokenizer, fast=True)  # generation_config None = greedy
    eos_ids = utils.eos_token_ids(tokenizer, model.generation_config)
    t0, scores, searches = time.perf_counter(), [], []
    for b in range(0, len(questions), batch_size):
        batch = questions[b : b + batch_size]
        prompts = [utils.encode(utils.build_prompt(q["question"], tokenizer, sargs.prompt_template), tokenizer)
                   for q in batch]
        rollouts = utils.search_rollout(prompts, generate, search, tokenizer, eos_ids,
                                        max_completion_length=max_completion_length, topk=sargs.topk,
                                        max_searches=sargs.max_searches, passage_max_words=sargs.passage_max_words)
        for q, r in zip(batch, rollouts):
            scores.append(utils.compute_reward(utils.reward_text(r, tokenizer), q["golden_answers"], r.ended_with_eos))
            searches.append(r.num_searches)
    del model, generate  # the fast generate holds its last KV cache
    ci = importlib.import_module("04_eval").bootstrap_ci  # [mean, low, high] x 100, seeded, over questions
    return {"n": len(scores), "format_valid": ci([s["format_ok"] for s in scores]), "searches": ci(searches),
            "f1": ci([s["f1"] for s in scores]), "em": ci([s["em"] for s in scores]),
            "reward": ci([s["reward"] for s in scores]), "seconds": round(time.perf_counter() - t0, 1)}


def print_table(before: dict | None, after: dict) -> None:
    """Means with 95% bootstrap CIs over the questions (format-valid, F1, EM in %)."""
    def c(v, scale=1.0):
        return f"{v[0] * scale:.1f} [{v[1] * scale:.1f}, {v[2] * scale:.1f}]"
    print("| model | questions | format-valid % | searches/question | F1 % | EM % |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("before warm-up", before), ("after warm-up", after)):
        if m:
            cells = [c(m["format_valid"]), c(m["searches"], 0.01), c(m["f1"]), c(m["em"])]
            print(f"| {name} | {m['n']} | " + " | ".join(cells) + " |")


def main():
    from trl import TrlParser
    (args,) = TrlParser((BenchArguments,)).parse_args_and_config()
    meta_path = Path(args.after) / "warmup.json"
    if not meta_path.is_file():
        raise utils.ReSearchError(f"--after {args.after}: no warmup.json (not a 02_sft_warmup.py output)")
    meta = json.loads(meta_path.read_text())
    sargs = utils.SearchArguments(retriever=meta["retriever"], topk=meta["topk"],
                                  passage_max_words=meta["passage_max_words"], max_searches=meta["max_searches"],
                                  prompt_template=meta["prompt_template"])
    search = utils.load_retriever(sargs.retriever)
    tokenizer = utils.load_tokenizer(args.after)
    questions = utils.load_questions(args.eval_data, limit=args.n)
    retriever = getattr(search, "description", sargs.retriever)
    print(f"{len(questions)} questions of {args.eval_data} | retriever {retriever} | "
          f"topk {sargs.topk} | passage_max_words {sargs.passage_max_words} | max_searches {sargs.max_searches} | "
          f"max_completion_length {meta['max_completion_length']} | greedy", flush=True)
    res = {}
    for name, path in (("before", utils.resolve_model(args.before)), ("after", args.after)):
        res[name] = measure(path, questions, tokenizer, search, sargs, meta["max_completion_length"], args.batch_size)
        print(f"{name} ({path}): {res[name]}", flush=True)
    print_table(res["before"], res["after"])
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "search": vars(sargs), **res}, indent=2) + "\n")


if __name__ == "__main__":
    utils.run_main(main)
