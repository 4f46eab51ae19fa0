"""Stage 2: a supervised warm-up that teaches the search format before RL. Not in the paper (7B/32B models,
RL alone): a small model almost never writes a valid rollout, so GRPO would have nothing to reinforce.
Rollouts come from the training data's supervision: MuSiQue decompositions and HotpotQA supporting titles
become the queries, each result block is what the retriever really returns, and a trajectory is kept only
if every search finds its hop's supporting passage (reward 1.0, asserted). --source rollouts samples them
(extras/rejection_sampling.py). Token layout as in GRPO; loss on model tokens only (TRL's SFTTrainer).

Writes --output_dir (runs/sft) once complete (built in <output_dir>.tmp, renamed): the model (03's and 04's
--model), warmup.json (data, search settings, yield, training), trajectories.jsonl (ids, mask runs).

CPU (bundled SmolLM2-135M-Instruct, mini-Wikipedia; 32 trajectories, 16 steps: ~5 min on 2 cores):
    python 02_sft_warmup.py --config configs/sft_cpu.yaml
    python benchmarks/bench_sft_warmup.py --after runs/sft --n 20     # its effect on held-out questions
One GPU (A100 80GB, Qwen2.5-7B-Instruct, LoRA, bf16, wiki-18):
    python 02_sft_warmup.py --config configs/sft_a100.yaml --retriever runs/index_wiki18
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import utils


# ---- Arguments (and every SFTConfig field: --learning_rate, --num_train_epochs, --bf16, ...) ----
@dataclass
class WarmupArguments:
    model: str = utils.DEFAULT_MODEL
    """Model to fine-tune: a hub id or a checkpoint."""
    train_data: str = str(utils.MINI_DATA / "train.jsonl")
    """A FlashRAG jsonl with MuSiQue or HotpotQA supervision (data/mini/train.jsonl); rollouts: any."""
    source: str = "supervision"
    """supervision (the data's own decompositions / supporting titles) or rollouts (rejection sampling)."""
    max_examples: int = 0
    """Train on at most this many trajectories, alternating between datasets (0 = all)."""
    hop_match: str = "passage"
    """A hop is found if a result is its supporting passage (passage) or from its article (title: wiki-18)."""
    max_hops: int = 0
    """Train only on trajectories with at most this many searches (0 = any)."""
    max_completion_length: int = 512
    """Token budget of a completion, result blocks included (as in 03, 04); longer ones are dropped."""
    rollout_model: str = ""
    """rollouts: the sampling model (default --model; another tokenizer is fine)."""
    rollout_backend: str = "hf"
    """rollouts: hf or vllm (GPU)."""
    rollout_samples: int = 4
    """rollouts: samples per question; the best that passes is kept."""
    rollout_temperature: float = 1.0
    """rollouts: sampling temperature."""
    min_f1: float = 0.8
    """rollouts: keep a valid-format, EOS-ended rollout with at least this F1."""
    use_lora: bool = False
    """Train a LoRA adapter (merged into the saved model)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: str = "all-linear"
    """"all-linear" or a comma-separated list (e.g. q_proj,v_proj)."""
    build_only: bool = False
    """Build and save the trajectories, then stop."""
    trajectories: str = ""
    """Train on a trajectories.jsonl of an earlier --build_only run."""


# ---- 1. Trajectories from the data's own supervision ----
def _clean(text: str) -> str:
    return " ".join(text.split())


def _strip_parenthetical(title: str) -> str:
    """"Kiss and Tell (1945 film)" -> "Kiss and Tell": a model could not know the disambiguation."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", title).strip() or title


def plan_hops(row: dict) -> tuple[dict | None, str]:
    """A training row's search plan, or (None, why not): question, answer, golds, final_think and hops, each
    {"queries": candidates, "support": the passage to find, "think": the text before}."""
    question = row.get("question")
    golds = row.get("golden_answers")
    golds = [golds] if isinstance(golds, str) else golds
    if not isinstance(question, str) or not question.strip():
        return None, "no_question"
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds) or not _clean(golds[0]):
        return None, "empty_answer"
    answer = _clean(golds[0])
    # an answer that cannot score F1 = 1 against its golds (e.g. "The"), or that breaks \boxed{}, cannot make
    # a reward-1.0 trajectory
    if utils.f1_score(answer, golds) < 1.0 or re.search(r"[{}\\<>]", answer):
        return None, "unscorable_answer"
    meta = row.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    passages = meta.get("supporting_passages")
    titles = meta.get("supporting_titles")
    decomposition = meta.get("decomposition")
    if passages is None or (decomposition is None and titles is None):
        return None, "no_supporting_info"
    if not isinstance(passages, list) or not passages or not all(isinstance(p, str) and p for p in passages):
        return None, "malformed_supporting_passages"
    plan = {"dataset": str(meta.get("dataset", "")), "question": question.strip(), "answer": answer,
            "golden_answers": golds, "hops": []}
    if decomposition is not None:  # MuSiQue: one hop per sub-question
        if (not isinstance(decomposition, list) or len(decomposition) != len(passages)
                or not all(isinstance(d, dict) and isinstance(d.get("question"), str)
                           and isinstance(d.get("answer"), str) and d["question"].strip() and d["answer"].strip()
                           for d in decomposition)):
            return None, "malformed_decomposition"
        hop_answers: list[str] = []
        for i, (step, support) in enumerate(zip(decomposition, passages)):
            if any(not 1 <= int(n) <= i for n in re.findall(r"#(\d+)", step["question"])):
                return None, "malformed_decomposition"
            sub = re.sub(r"#(\d+)", lambda m: hop_answers[int(m.group(1)) - 1], step["question"])
            query = _clean(sub.replace(">>", " "))  # "Hello Love >> performer" -> "Hello Love performer"
            think = (f"<think> I need to find out: {query}. </think>" if i == 0 else
                     f" <think> The result says {hop_answers[-1]}. Next I need: {query}. </think>")
            plan["hops"].append({"queries": [query], "support": support, "think": think})
            hop_answers.append(_clean(step["answer"]))
        plan["final_think"] = f" <think> The result says {hop_answers[-1]}. So the answer is {answer}. </think>"
    else:  # HotpotQA: one hop per supporting title; titles named in the question are searched first
        if (not isinstance(titles, list) or len(titles) != len(passages)
                or not all(isinstance(t, str) and t.strip() for t in titles)):
            return None, "malformed_supporting_titles"
        named = [_strip_parenthetical(t).lower() in question.lower() for t in titles]
        order = sorted(range(len(titles)), key=lambda i: not named[i])
        for n, i in enumerate(order):
            full = _clean(titles[i])
            short = _strip_parenthetical(full)
            if n == 0:
                think = f"<think> I need to search for {short}. </think>"
            elif short.lower() in question.lower():
                think = f" <think> Now I need to search for {short}. </think>"
            else:  # a bridge entity: named in what was just retrieved, not in the question
                think = f" <think> The result mentions {short}. I need to search for it. </think>"
            plan["hops"].append({"queries": [short] + ([full] if full != short else []), "support": passages[i],
                                 "think": think})
        plan["final_think"] = f" <think> From the results, the answer is {answer}. </think>"
    texts = [h["think"] for h in plan["hops"]] + [qq for h in plan["hops"] for qq in h["queries"]]
    if any(tag in t for t in texts for tag in ("<search>", "</search>", "<result>", "</result>", "<answer>")):
        return None, "tags_in_text"
    return plan, ""


def finds_hop(passages: list[dict], support: str, hop_match: str) -> bool:
    """Whether a search found the hop: its supporting passage itself, or (title) a passage of its article."""
    if hop_match == "passage":
        return any(p["contents"] == support for p in passages)
    return any(utils.passage_title(p["contents"]) == utils.passage_title(support) for p in passages)


def answer_text(answer: str) -> str:
    """The answer block, in the exact form the prompt asks for."""
    return f" {utils.ANSWER_OPEN} The final answer is \\[ \\boxed{{{answer}}} \\] {utils.ANSWER_CLOSE}"


def build_from_supervision(rows: list[dict], tokenizer, search: utils.SearchFn, sargs: utils.SearchArguments,
                           max_completion_length: int, eos_id: int,
                           hop_match: str = "passage") -> tuple[list[dict], Counter]:
    """One trajectory per usable row; a Counter of "kept" and of drop reasons."""
    stats: Counter = Counter()
    kept: list[dict] = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            stats["not_an_object"] += 1
            continue
        plan, reason = plan_hops(row)
        if plan is None or len(plan["hops"]) > sargs.max_searches:
            stats[reason or "more_hops_than_max_searches"] += 1
            continue
        prompt_ids = utils.encode(utils.build_prompt(plan["question"], tokenizer, sargs.prompt_template), tokenizer)
        segments: list[tuple[list[int], int]] = []  # (ids, 1 = the model's text / 0 = a result block)
        queries: list[str] = []
        for hop in plan["hops"]:
            for candidate in hop["queries"]:
                seg = utils.encode(f"{hop['think']} {utils.SEARCH_OPEN} {candidate} {utils.SEARCH_CLOSE}", tokenizer)
                # the query the rollout would send: read back from the decoded ids, as search_rollout does
                query = utils.extract_query(tokenizer.decode(seg, skip_special_tokens=True))
                passages = search([query], sargs.topk)[0]
                if finds_hop(passages, hop["support"], hop_match):
                    block = utils.format_result_block(passages, sargs.passage_max_words)
                    segments += [(seg, 1), (utils.encode(block, tokenizer), 0)]
                    queries.append(query)
                    break
            else:
                break  # no candidate query found the hop's passage
        if len(queries) < len(plan["hops"]):
            stats["hop_not_retrieved"] += 1
            continue
        segments.append((utils.encode(plan["final_think"] + answer_text(plan["answer"]), tokenizer) + [eos_id], 1))
        rollout = utils.Rollout(prompt_ids=prompt_ids, completion_ids=[t for ids, _ in segments for t in ids],
                                mask=[m for ids, m in segments for _ in ids], queries=queries, ended_with_eos=True)
        if len(rollout.completion_ids) > max_completion_length:
            stats["longer_than_max_completion_length"] += 1
            continue
        score = utils.compute_reward(utils.reward_text(rollout, tokenizer), plan["golden_answers"], True)
        assert score["reward"] == 1.0, f"row {n}: built trajectory scores {score}"  # plan_hops made sure
        kept.append(make_record(row, plan["dataset"], rollout, score, "supervision", tokenizer))
        stats["kept"] += 1
    return kept, stats


def make_record(row: dict, dataset: str, rollout: utils.Rollout, score: dict, source: str, tokenizer) -> dict:
    """A row of trajectories.jsonl: readable fields, mask_runs (as 03's and 04's logs, for
    extras/view_trajectories.py), and the input_ids / assistant_masks SFT trains on."""
    return {"id": str(row.get("id", "")), "dataset": dataset, "source": source,
            "question": str(row.get("question", "")).strip(), "golden_answers": row.get("golden_answers"),
            "queries": rollout.queries, "reward": score["reward"], "f1": score["f1"],
            "completion": tokenizer.decode(rollout.completion_ids, skip_special_tokens=False),
            "num_prompt_tokens": len(rollout.prompt_ids), "mask_runs": [[m, len(ids)] for ids, m in rollout.segments()],
            "input_ids": rollout.prompt_ids + rollout.completion_ids,
            "assistant_masks": [0] * len(rollout.prompt_ids) + rollout.mask}


def take_round_robin(records: list[dict], n: int) -> list[dict]:
    """The first n records, alternating between datasets."""
    if n <= 0 or n >= len(records):
        return records
    by_ds: dict[str, list[dict]] = {}
    for r in records:
        by_ds.setdefault(r["dataset"], []).append(r)
    return [r for group in itertools.zip_longest(*by_ds.values()) for r in group if r is not None][:n]


# ---- 2. Training: TRL's SFTTrainer, pre-tokenised ----
def train(records: list[dict], model_name: str, tokenizer, targs, args: WarmupArguments, save_dir: Path) -> dict:
    """Fine-tune where assistant_masks == 1; save the (merged) model and tokenizer to save_dir."""
    import datasets
    from trl import SFTTrainer

    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]}
                                          for r in records])
    peft_config = None
    if args.use_lora:
        from peft import LoraConfig
        targets = args.lora_target_modules
        if targets != "all-linear":
            targets = targets.split(",")
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 task_type="CAUSAL_LM", target_modules=targets)
    trainer = SFTTrainer(model=model_name, args=targs, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    t0 = time.perf_counter()
    result = trainer.train()
    model = trainer.model.merge_and_unload() if args.use_lora else trainer.model  # a plain checkpoint
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": trainer.state.global_step,
            "train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "trained_tokens": sum(sum(r["assistant_masks"]) for r in records),
            "total_tokens": sum(len(r["input_ids"]) for r in records)}


def main():
    import torch
    from trl import SFTConfig

    from extras.precision import native_bf16
    native, why = native_bf16()
    # float32 master weights (TRL loads a model in float32), bf16 autocast where it is native (--bf16)
    defaults = dict(output_dir="runs/sft", save_strategy="no", logging_steps=5, report_to="none", bf16=native,
                    use_cpu=not torch.cuda.is_available())  # Trainer refuses bf16 on a CPU unless told

    args, sargs, targs = utils.parse_args(WarmupArguments, utils.SearchArguments, SFTConfig, defaults=defaults)
    for flag, value, allowed in (("source", args.source, ("supervision", "rollouts")),
                                 ("rollout_backend", args.rollout_backend, ("hf", "vllm")),
                                 ("hop_match", args.hop_match, ("passage", "title"))):
        if value not in allowed:
            raise utils.ReSearchError(f"--{flag} must be {' or '.join(allowed)}, not {value!r}")
    if not Path(args.train_data).is_file() and (args.source == "supervision" or args.train_data not in utils.HUB_NAMES):
        raise utils.ReSearchError(f"--train_data {args.train_data}: no such file")
    out_dir = Path(targs.output_dir)
    if Path(args.model).exists() and out_dir.resolve() == Path(args.model).resolve():
        raise utils.ReSearchError(f"--output_dir {out_dir} is the --model: the warm-up would replace it; pick another")
    t_start = time.perf_counter()
    tokenizer = utils.load_tokenizer(args.model)
    search = utils.load_retriever(sargs.retriever)
    if Path(args.train_data).is_file():
        rows = utils.read_jsonl(args.train_data)  # a bad row is skipped later, with its reason
    else:
        rows = utils.load_questions(args.train_data, split="train")
    retriever = getattr(search, "description", sargs.retriever)
    print(f"model {args.model} | data {args.train_data} ({len(rows)} rows) | retriever {retriever} | top-k "
          f"{sargs.topk} | passage words {sargs.passage_max_words or 'all'}", flush=True)
    print(f"precision: float32 weights, bf16 autocast {'on' if targs.bf16 else 'off'} ({why})", flush=True)

    t0 = time.perf_counter()
    if args.trajectories:
        records = utils.read_jsonl(args.trajectories)
        stats = Counter(kept=len(records))
        if any(len(r.get("input_ids", "")) != len(r.get("assistant_masks", "?")) for r in records):
            raise utils.ReSearchError(f"--trajectories {args.trajectories}: not written by this script (a row "
                                      "without input_ids and assistant_masks of equal length)")
    elif args.source == "supervision":
        records, stats = build_from_supervision(rows, tokenizer, search, sargs, args.max_completion_length,
                                                tokenizer.eos_token_id, args.hop_match)
    else:
        records, stats = importlib.import_module("extras.rejection_sampling").build(
            rows, tokenizer, search, sargs, args, targs, make_record)
    build_seconds = time.perf_counter() - t0
    total = sum(stats.values())
    print(f"trajectories: kept {stats['kept']}/{total} rows in {build_seconds:.1f}s; dropped: "
          + (", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if k != "kept") or "none") + "; by dataset: "
          + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["dataset"] for r in records).items())), flush=True)
    if targs.max_length is not None:  # never let the trainer truncate a trajectory silently
        stats["longer_than_max_length"] = sum(len(r["input_ids"]) > targs.max_length for r in records)
        records = [r for r in records if len(r["input_ids"]) <= targs.max_length]
    records = [r for r in records if not args.max_hops or len(r["queries"]) <= args.max_hops]
    train_records = take_round_robin(records, args.max_examples)
    if not train_records:
        raise utils.ReSearchError(f"no usable trajectory from {args.train_data} (dropped: {dict(stats)})")
    print(f"training on {len(train_records)} of {len(records)} trajectories ({stats['longer_than_max_length']} over "
          f"--max_length), {sum(sum(r['assistant_masks']) for r in train_records)} tokens with loss", flush=True)

    tmp_dir = Path(str(out_dir) + ".tmp")  # built here; the finished folder replaces any earlier one in a rename
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    targs.output_dir = str(tmp_dir)
    (tmp_dir / "trajectories.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                        for r in train_records), encoding="utf-8")
    settings = {"stage": "02_sft_warmup", "base_model": args.model, "train_data": args.train_data,
                "source": args.source, "retriever_description": retriever, **asdict(sargs),
                "corpus": (getattr(search, "manifest", None) or {}).get("corpus"),
                "max_completion_length": args.max_completion_length, "yield": {"rows": total, **dict(stats)},
                "num_trajectories": len(records), "num_trained": len(train_records),
                "build_seconds": round(build_seconds, 1), "warmup_args": asdict(args), "training": targs.to_dict()}
    if not args.build_only:
        settings["result"] = train(train_records, args.model, tokenizer, targs, args, tmp_dir)
        print(f"  {settings['result']}", flush=True)
    settings["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (tmp_dir / "warmup.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    old = Path(str(out_dir) + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out_dir} ({'trajectories only' if args.build_only else 'model, tokenizer'}, "
          f"trajectories.jsonl, warmup.json) in {settings['total_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    utils.run_main(main)
