"""Which training questions does a checkpoint answer sometimes? Samples --group rollouts per question at
temperature 1, as GRPO does, with the search settings the checkpoint was warmed up with (its warmup.json),
and writes per question its answer rate; with --keep_out, the questions answered sometimes but not always
(some rollout with F1 > 0, some with F1 = 0): the ones whose groups carry an answer signal, a recipe lever
of the learning benchmark (BENCHMARKS.md).

    python benchmarks/probe_questions.py --model runs/learn/sft --questions data/mini/train.jsonl \\
        --out runs/learn/probe_train.jsonl --keep_out runs/learn/train_sometimes.jsonl
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--questions", default="data/mini/train.jsonl")
    p.add_argument("--retriever", default="runs/learn/index_mini")
    p.add_argument("--group", type=int, default=4, help="rollouts per question")
    p.add_argument("--batch_size", type=int, default=32, help="rollouts generated together")
    p.add_argument("--out", required=True, help="per question: id, answer rate, format rate, mean reward")
    p.add_argument("--keep_out", help="the questions answered sometimes but not always, as training rows")
    p.add_argument("--max_new_tokens_per_call", type=int, default=16, help="as configs/grpo_cpu.yaml")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import torch
    from transformers import GenerationConfig
    torch.manual_seed(a.seed)
    meta_path = Path(a.model) / "warmup.json"
    if not meta_path.is_file():
        raise utils.ReSearchError(f"--model {a.model}: no warmup.json (not a 02_sft_warmup.py output)")
    meta = json.loads(meta_path.read_text())  # the search settings it was warmed up with, as GRPO will use them
    tok, model = utils.load_tokenizer(a.model), utils.load_model(a.model)
    search, eos = utils.load_retriever(a.retriever), utils.eos_token_ids(tok, model.generation_config)
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=list(eos))
    generate = utils.hf_generate_fn(model, tok, sampling, fast=True)
    rows = utils.read_jsonl(a.questions)
    flat = [r for r in rows for _ in range(a.group)]
    scores: dict[str, list[dict]] = {}
    t0 = time.time()
    for start in range(0, len(flat), a.batch_size):
        batch = flat[start:start + a.batch_size]
        prompts = [utils.encode(utils.build_prompt(r["question"], tok, meta["prompt_template"]), tok) for r in batch]
        outs = utils.search_rollout(prompts, generate, search, tok, eos,
                                    max_completion_length=meta["max_completion_length"], topk=meta["topk"],
                                    max_searches=meta["max_searches"], passage_max_words=meta["passage_max_words"],
                                    max_new_tokens_per_call=a.max_new_tokens_per_call)
        for r, o in zip(batch, outs):
            scores.setdefault(r["id"], []).append(
                utils.compute_reward(utils.reward_text(o, tok), r["golden_answers"], o.ended_with_eos))
        print(f"{min(start + a.batch_size, len(flat))}/{len(flat)} rollouts, {time.time() - t0:.0f} s", flush=True)
    stats = [{"id": r["id"], "answered": sum(s["f1"] > 0 for s in scores[r["id"]]) / a.group,
              "format_ok": sum(s["format_ok"] for s in scores[r["id"]]) / a.group,
              "reward": sum(s["reward"] for s in scores[r["id"]]) / a.group} for r in rows]
    Path(a.out).write_text("".join(json.dumps(s) + "\n" for s in stats))
    some = {s["id"] for s in stats if 0 < s["answered"] < 1}
    print(f"{len(rows)} questions x {a.group}: answered sometimes {len(some)}, always "
          f"{sum(s['answered'] == 1 for s in stats)}, never {sum(s['answered'] == 0 for s in stats)}; mean format "
          f"{sum(s['format_ok'] for s in stats) / len(stats):.2f}; {time.time() - t0:.0f} s")
    if a.keep_out:
        Path(a.keep_out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["id"] in some))


if __name__ == "__main__":
    utils.run_main(main)
