"""Stage 2: a supervised warm-up that teaches the search format before RL.

The paper trains 7B/32B models with RL alone. A small model almost never writes a valid
<think>/<search>/<result>/<answer> rollout by itself, so GRPO gets nothing to reinforce. This stage
writes such rollouts from the training data's own supervision and fine-tunes on them first.

Sources of trajectories (--source):
  supervision  MuSiQue decompositions (sub-questions, "#1"-style references filled with earlier hop
               answers) and HotpotQA supporting titles become the search queries. Every <result> block
               is what the retriever really returns for that query, byte for byte the block the GRPO
               rollout inserts (utils.format_result_block). A trajectory is kept only when every search
               retrieves the passage that supports its hop, and it must score reward 1.0 under
               utils.compute_reward (asserted).
  rollouts     rejection sampling: any model (--rollout_model, e.g. a larger instruct model on a GPU)
               runs the same search loop (utils.search_rollout) on the training questions; rollouts with
               a valid format and F1 >= --min_f1 are kept.

Token layout = the GRPO rollout's: prompt ids (utils.encode_prompt(utils.build_prompt(...))), then each
model-text segment and each result block tokenised separately (add_special_tokens=False) and
concatenated, EOS appended. Never the whole text at once: the ids trained here are the ids RL samples.
Loss on model tokens only; the prompt and every result block are masked (TRL SFTTrainer, pre-tokenised
rows with an "assistant_masks" column, which TRL 1.16 folds into labels = -100).

Reads:  --train_data (FlashRAG jsonl with metadata.decomposition / supporting_titles / supporting_passages),
        --retriever (an index folder from 01_build_index.py, or a server URL), --model.
Writes: --output_dir (default runs/sft), only once complete (built in <output_dir>.tmp, then renamed):
        the model + tokenizer (usable as --model by 03_grpo_search.py and 04_eval.py), warmup.json
        (data, retriever, topk, passage_max_words, ... and the measured effect), trajectories.jsonl
        (one readable row per trajectory: text, ids, loss spans).

CPU (bundled SmolLM2-135M-Instruct, mini-Wikipedia; 32 trajectories, 16 steps, ~22k tokens: 12 CPU-
minutes, so ~6 min on 2 idle cores; see BENCHMARKS.md):
    python 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir runs/index_mini
    python 02_sft_warmup.py --config configs/sft_cpu.yaml
  then 03_grpo_search.py / 04_eval.py --model runs/sft. The before/after measurement on held-out
  HotpotQA dev questions (greedy; slow on a CPU: the untrained model rambles to the token budget):
    python 02_sft_warmup.py --config configs/sft_cpu.yaml --eval_before_after 20 --rollout_batch_size 20
    python benchmarks/bench_sft_warmup.py --after runs/sft --n 20 --batch_size 20   # same, on a finished run
One GPU (A100 80GB, Qwen2.5-7B-Instruct, LoRA, bf16, wiki-18 index or retrieval server):
    python 02_sft_warmup.py --config configs/sft_a100.yaml --retriever runs/index_wiki18
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import utils


# ---------------------------------------------------------------------------------------------
# Arguments (every SFTConfig field is a flag too: --learning_rate, --num_train_epochs, --bf16, ...)
# ---------------------------------------------------------------------------------------------
@dataclass
class WarmupArguments:
    model: str = utils.DEFAULT_MODEL
    """Model to fine-tune: a hub id or a local checkpoint (default: the bundled SmolLM2-135M-Instruct)."""
    train_data: str = str(utils.MINI_DATA / "train.jsonl")
    """Training questions: a FlashRAG jsonl, or (--source rollouts) a FlashRAG dataset name such as
    musique (its train split, downloaded). --source supervision needs metadata.decomposition (MuSiQue)
    or metadata.supporting_titles + supporting_passages (HotpotQA), as in data/mini/train.jsonl."""
    source: str = "supervision"
    """Where trajectories come from: "supervision" (the data's own decompositions / supporting titles)
    or "rollouts" (rejection sampling with --rollout_model)."""
    max_examples: int = 0
    """Train on at most this many kept trajectories, taken round-robin across datasets in file order
    (0 = all)."""
    hop_match: str = "passage"
    """--source supervision: a hop counts as retrieved when a result is the supporting passage itself
    ("passage", exact contents: the bundled mini corpus holds every supporting passage) or any passage of
    the supporting article ("title": for wiki-18, whose 100-word passages differ from the datasets')."""
    max_hops: int = 0
    """Train only on trajectories with at most this many searches (0 = any). The CPU preset keeps 2-hop
    ones: the shortest, and the hop count of HotpotQA."""
    max_completion_length: int = 512
    """Token budget of a completion, result blocks included (same flag and value as 03/04). Longer
    trajectories are dropped, never truncated."""
    rollout_model: str = ""
    """--source rollouts: the model that samples (default: --model). A different tokenizer is fine: its
    segments are re-tokenised segment by segment with --model's tokenizer."""
    rollout_backend: str = "hf"
    """--source rollouts: "hf" (transformers generate) or "vllm" (GPU)."""
    rollout_samples: int = 4
    """--source rollouts: samples per question; the best one that passes is kept."""
    rollout_temperature: float = 1.0
    """--source rollouts: sampling temperature."""
    vllm_gpu_memory_utilization: float = 0.4
    """--rollout_backend vllm: share of GPU memory vLLM may take (training in the same process needs the
    rest; or sample with --build_only and train later with --trajectories)."""
    rollout_batch_size: int = 8
    """--source rollouts and the before/after measurement: questions per generate batch (hf)."""
    min_f1: float = 0.8
    """--source rollouts: keep a rollout only if its format is valid, it ended with EOS, and F1 >= this."""
    use_lora: bool = False
    """Train a LoRA adapter instead of all weights (merged into the saved model, so 03/04 load it plainly)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list (e.g. q_proj,v_proj)."""
    eval_before_after: int = 0
    """If N > 0: greedy search rollouts on the first N questions of --eval_data with the model before and
    after the warm-up (format-valid rate, searches per question, F1), saved in warmup.json."""
    eval_data: str = str(utils.MINI_DATA / "hotpotqa_dev.jsonl")
    """Held-out questions for --eval_before_after (not used for training)."""
    build_only: bool = False
    """Build and save the trajectories, then stop (no training, no checkpoint)."""
    trajectories: str = ""
    """Train on an existing trajectories.jsonl (from an earlier run, e.g. a --build_only rejection-sampling
    run with vLLM on a bigger model) instead of building new ones."""


DATASETS_WITH_SUPERVISION = ("musique", "hotpotqa")
KNOWN_ROW_FIELDS = {"id", "question", "golden_answers", "metadata"}


# ---------------------------------------------------------------------------------------------
# 1. Trajectories from the data's own supervision
# ---------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    return " ".join(text.split())


def _strip_parenthetical(title: str) -> str:
    """"Kiss and Tell (1945 film)" -> "Kiss and Tell": the disambiguation is not something a model could
    know before searching."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", title).strip() or title


def plan_hops(row: dict) -> tuple[dict | None, str]:
    """The search plan of one training row, or (None, reason) when the row cannot give one.
    Plan: {"dataset", "question", "answer", "golden_answers", "hops": [{"queries": [candidates],
    "support": passage contents that must be retrieved, "think": text before the search}],
    "final_think": text before the answer}."""
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        return None, "no_question"
    golds = row.get("golden_answers")
    if isinstance(golds, str):
        golds = [golds]
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        return None, "empty_answer"
    answer = _clean(golds[0])
    if not answer:
        return None, "empty_answer"
    # An answer that cannot score F1 = 1 against its own golds (e.g. "The") or that would break the
    # answer block ({, } or tags inside \boxed{}) cannot make a reward-1.0 trajectory.
    if utils.f1_score(answer, golds) < 1.0 or re.search(r"[{}\\<>]", answer):
        return None, "unscorable_answer"
    meta = row.get("metadata")
    if not isinstance(meta, dict):
        return None, "no_supporting_info"
    passages = meta.get("supporting_passages")
    titles = meta.get("supporting_titles")
    decomposition = meta.get("decomposition")
    if passages is None or (decomposition is None and titles is None):
        return None, "no_supporting_info"
    if not isinstance(passages, list) or not passages or not all(isinstance(p, str) and p for p in passages):
        return None, "malformed_supporting_passages"

    plan = {"dataset": str(meta.get("dataset", "")), "question": q.strip(), "answer": answer,
            "golden_answers": golds, "hops": []}
    if decomposition is not None:  # MuSiQue: one hop per sub-question
        if (not isinstance(decomposition, list) or len(decomposition) != len(passages)
                or not all(isinstance(d, dict) and isinstance(d.get("question"), str)
                           and isinstance(d.get("answer"), str) and d["question"].strip() and d["answer"].strip()
                           for d in decomposition)):
            return None, "malformed_decomposition"
        hop_answers: list[str] = []
        for i, (step, support) in enumerate(zip(decomposition, passages)):
            refs = [int(n) for n in re.findall(r"#(\d+)", step["question"])]
            if any(n < 1 or n > i for n in refs):
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
        ql = q.lower()
        order = sorted(range(len(titles)), key=lambda i: _strip_parenthetical(titles[i]).lower() not in ql)
        for n, i in enumerate(order):
            short, full = _strip_parenthetical(_clean(titles[i])), _clean(titles[i])
            queries = [short] + ([full] if full != short else [])
            if n == 0:
                think = f"<think> I need to search for {short}. </think>"
            elif short.lower() in ql:
                think = f" <think> Now I need to search for {short}. </think>"
            else:  # a bridge entity: it is named in what was just retrieved, not in the question
                think = f" <think> The result mentions {short}. I need to search for it. </think>"
            plan["hops"].append({"queries": queries, "support": passages[i], "think": think})
        plan["final_think"] = f" <think> From the results, the answer is {answer}. </think>"
    texts = [h["think"] for h in plan["hops"]] + [qq for h in plan["hops"] for qq in h["queries"]]
    if any(tag in t for t in texts for tag in ("<search>", "</search>", "<result>", "</result>", "<answer>")):
        return None, "tags_in_text"
    return plan, ""


def answer_text(answer: str) -> str:
    """The final answer block, in the exact form the prompt asks for."""
    return f" {utils.ANSWER_OPEN} The final answer is \\[ \\boxed{{{answer}}} \\] {utils.ANSWER_CLOSE}"


def encode(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _title(contents: str) -> str:
    return contents.partition("\n")[0].strip().strip('"')


def build_from_supervision(rows: list[dict], tokenizer, search: utils.SearchFn, sargs: utils.SearchArguments,
                           max_completion_length: int, eos_id: int,
                           hop_match: str = "passage") -> tuple[list[dict], Counter]:
    """One trajectory per usable row. Returns (kept trajectories, Counter of drop reasons + "kept")."""
    stats: Counter = Counter()
    kept: list[dict] = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            stats["not_an_object"] += 1
            continue
        plan, reason = plan_hops(row)
        if plan is None:
            stats[reason] += 1
            continue
        if len(plan["hops"]) > sargs.max_searches:
            stats["more_hops_than_max_searches"] += 1
            continue
        prompt_ids = utils.encode_prompt(utils.build_prompt(plan["question"], tokenizer, sargs.prompt_template),
                                         tokenizer)
        segments: list[tuple[list[int], int]] = []  # (ids, 1 = model tokens / 0 = result block)
        queries: list[str] = []
        for hop in plan["hops"]:
            found = None
            for candidate in hop["queries"]:
                seg = encode(f"{hop['think']} {utils.SEARCH_OPEN} {candidate} {utils.SEARCH_CLOSE}", tokenizer)
                # The query the rollout would send: extracted from the decoded ids, exactly as search_rollout does.
                query = utils.extract_query(tokenizer.decode(seg, skip_special_tokens=True))
                passages = search([query], sargs.topk)[0]
                if any(p["contents"] == hop["support"] if hop_match == "passage" else
                       _title(p["contents"]) == _title(hop["support"]) for p in passages):
                    found = (seg, query, passages)
                    break
            if found is None:
                break
            seg, query, passages = found
            block = utils.format_result_block(passages, sargs.passage_max_words)
            segments += [(seg, 1), (encode(block, tokenizer), 0)]
            queries.append(query)
        if len(queries) < len(plan["hops"]):
            stats["hop_not_retrieved"] += 1
            continue
        segments.append((encode(plan["final_think"] + answer_text(plan["answer"]), tokenizer) + [eos_id], 1))
        completion_ids = [t for ids, _ in segments for t in ids]
        mask = [m for ids, m in segments for _ in ids]
        if len(completion_ids) > max_completion_length:
            stats["longer_than_max_completion_length"] += 1
            continue
        rollout = utils.Rollout(prompt_ids=prompt_ids, completion_ids=completion_ids, mask=mask,
                                queries=queries, ended_with_eos=True, done=True)
        score = utils.compute_reward(utils.reward_text(rollout, tokenizer), plan["golden_answers"], True)
        # Invariant, not a filter: plan_hops already refused answers that cannot score 1.0.
        assert score["reward"] == 1.0, f"row {n}: built trajectory scores {score}"
        kept.append(make_record(row, plan["dataset"], rollout, score, "supervision", tokenizer))
        stats["kept"] += 1
    return kept, stats


def make_record(row: dict, dataset: str, rollout: utils.Rollout, score: dict, source: str, tokenizer) -> dict:
    """A readable row of trajectories.jsonl; input_ids/assistant_masks are what the trainer reads."""
    input_ids = rollout.prompt_ids + rollout.completion_ids
    loss_mask = [0] * len(rollout.prompt_ids) + rollout.mask
    spans, start = [], None  # [start, end) ranges of input_ids that carry loss
    for i, m in enumerate(loss_mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append([start, i])
            start = None
    return {"id": str(row.get("id", "")), "dataset": dataset, "source": source,
            "question": str(row.get("question", "")).strip(), "golden_answers": row.get("golden_answers"),
            "queries": rollout.queries, "reward": score["reward"], "f1": score["f1"],
            "completion": tokenizer.decode(rollout.completion_ids, skip_special_tokens=False),
            "num_prompt_tokens": len(rollout.prompt_ids), "num_tokens": len(input_ids),
            "loss_spans": spans, "input_ids": input_ids, "assistant_masks": loss_mask}


# ---------------------------------------------------------------------------------------------
# 2. Trajectories from rejection sampling (--source rollouts)
# ---------------------------------------------------------------------------------------------
def vllm_generate_fn(model_name: str, temperature: float, top_p: float = 1.0, seed: int = 0,
                     gpu_memory_utilization: float = 0.4) -> utils.GenerateFn:
    """The vLLM back end of utils.search_rollout (GPU only): same signature as utils.hf_generate_fn."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_name, seed=seed, enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization)
    eos_id = llm.get_tokenizer().eos_token_id

    def generate(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=[utils.SEARCH_CLOSE], include_stop_str_in_output=True)
        outs = llm.generate([{"prompt_token_ids": c} for c in contexts], params, use_tqdm=False)
        new = []
        for o in outs:
            ids, c = list(o.outputs[0].token_ids), o.outputs[0]
            # A row that stopped on EOS must end with it: the rollout loop reads EOS as "done".
            if c.finish_reason == "stop" and c.stop_reason is None and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)
            new.append(ids)
        return new

    return generate


def resegment(rollout: utils.Rollout, src_tok, tokenizer, prompt_ids: list[int], eos_id: int) -> utils.Rollout:
    """A rollout sampled with another tokenizer, re-tokenised segment by segment with the trained model's
    (model text and result blocks separately, as the GRPO rollout builds them)."""
    ids, mask = [], []
    for seg, m in rollout.segments():
        ended = m and seg and seg[-1] == src_tok.eos_token_id
        new = encode(src_tok.decode(seg, skip_special_tokens=True), tokenizer) + ([eos_id] if ended else [])
        ids += new
        mask += [m] * len(new)
    return utils.Rollout(prompt_ids=prompt_ids, completion_ids=ids, mask=mask, queries=list(rollout.queries),
                         ended_with_eos=rollout.ended_with_eos, done=True)


def build_from_rollouts(rows: list[dict], tokenizer, search: utils.SearchFn, sargs: utils.SearchArguments,
                        args: WarmupArguments, generate: utils.GenerateFn, gen_tok, eos_ids: set[int],
                        eos_id: int) -> tuple[list[dict], Counter]:
    """Sample --rollout_samples search rollouts per question; keep the best one with a valid format and
    F1 >= --min_f1. gen_tok is the sampling model's tokenizer."""
    stats: Counter = Counter()
    usable = []
    for row in rows:
        golds = row.get("golden_answers") if isinstance(row, dict) else None
        golds = [golds] if isinstance(golds, str) else golds
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            stats["no_question"] += 1
        elif not isinstance(golds, list) or not [g for g in golds if isinstance(g, str) and g.strip()]:
            stats["empty_answer"] += 1
        else:
            usable.append((row, [str(g) for g in golds]))
    same_tok = gen_tok.get_vocab() == tokenizer.get_vocab()
    kept: list[dict] = []
    for b in range(0, len(usable), args.rollout_batch_size):
        batch = usable[b : b + args.rollout_batch_size]
        prompts = [utils.encode_prompt(utils.build_prompt(r["question"].strip(), gen_tok, sargs.prompt_template),
                                       gen_tok) for r, _ in batch]
        rollouts = utils.search_rollout([p for p in prompts for _ in range(args.rollout_samples)], generate, search,
                                        gen_tok, eos_ids, max_completion_length=args.max_completion_length,
                                        topk=sargs.topk, max_searches=sargs.max_searches,
                                        passage_max_words=sargs.passage_max_words)
        for i, (row, golds) in enumerate(batch):
            scored = []
            for r in rollouts[i * args.rollout_samples : (i + 1) * args.rollout_samples]:
                if not same_tok:
                    prompt_ids = utils.encode_prompt(
                        utils.build_prompt(row["question"].strip(), tokenizer, sargs.prompt_template), tokenizer)
                    r = resegment(r, gen_tok, tokenizer, prompt_ids, eos_id)
                scored.append((utils.compute_reward(utils.reward_text(r, tokenizer), golds, r.ended_with_eos), r))
            passing = [(s, r) for s, r in scored if s["format_ok"] and s["f1"] >= args.min_f1
                       and len(r.completion_ids) <= args.max_completion_length]
            if not passing:
                stats["no_format_valid_sample" if not any(s["format_ok"] for s, _ in scored) else "f1_below_min"] += 1
                continue
            score, best = max(passing, key=lambda sr: (sr[0]["reward"], -len(sr[1].completion_ids)))
            dataset = (row.get("metadata") or {}).get("dataset", "") if isinstance(row.get("metadata"), dict) else ""
            kept.append(make_record(row, str(dataset), best, score, "rollouts", tokenizer))
            stats["kept"] += 1
        print(f"  rejection sampling: {b + len(batch)}/{len(usable)} questions, kept {stats['kept']}", flush=True)
    return kept, stats


def take_round_robin(records: list[dict], n: int) -> list[dict]:
    """The first n records, alternating between datasets (each in file order), so a small budget still
    sees every kind of question."""
    if n <= 0 or n >= len(records):
        return records
    by_ds: dict[str, list[dict]] = {}
    for r in records:
        by_ds.setdefault(r["dataset"], []).append(r)
    out, queues = [], list(by_ds.values())
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


# ---------------------------------------------------------------------------------------------
# 5. The measured effect: greedy search rollouts on held-out questions
# ---------------------------------------------------------------------------------------------
def measure(model_path: str, questions: list[dict], tokenizer, search: utils.SearchFn,
            sargs: utils.SearchArguments, max_completion_length: int, batch_size: int) -> dict:
    """Format-valid rate (valid format and ended with EOS), mean searches per question, mean F1 / EM,
    greedy decoding (do_sample=False), same prompts, retriever and budgets as GRPO and evaluation."""
    model = utils.load_model(model_path)
    generate = utils.hf_generate_fn(model, tokenizer, do_sample=False)
    eos_ids = utils.eos_token_ids(tokenizer, model)
    t0, scores, searches = time.perf_counter(), [], []
    for b in range(0, len(questions), batch_size):
        batch = questions[b : b + batch_size]
        prompts = [utils.encode_prompt(utils.build_prompt(q["question"], tokenizer, sargs.prompt_template), tokenizer)
                   for q in batch]
        rollouts = utils.search_rollout(prompts, generate, search, tokenizer, eos_ids,
                                        max_completion_length=max_completion_length, topk=sargs.topk,
                                        max_searches=sargs.max_searches, passage_max_words=sargs.passage_max_words)
        for q, r in zip(batch, rollouts):
            scores.append(utils.compute_reward(utils.reward_text(r, tokenizer), q["golden_answers"], r.ended_with_eos))
            searches.append(r.num_searches)
    n = len(scores)
    del model
    return {"n": n, "format_valid": sum(s["format_ok"] for s in scores) / n, "searches": sum(searches) / n,
            "f1": sum(s["f1"] for s in scores) / n, "em": sum(s["em"] for s in scores) / n,
            "reward": sum(s["reward"] for s in scores) / n, "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# 3. Training (TRL SFTTrainer on pre-tokenised rows)
# ---------------------------------------------------------------------------------------------
def train(records: list[dict], model_name: str, tokenizer, targs, args: WarmupArguments, save_dir: Path) -> dict:
    """Fine-tune on input_ids with loss where assistant_masks == 1; save the (merged) model and tokenizer
    to save_dir. Returns a summary of the run."""
    import datasets
    from trl import SFTTrainer

    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]}
                                          for r in records])
    peft_config = None
    if args.use_lora:
        from peft import LoraConfig
        targets = args.lora_target_modules
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 task_type="CAUSAL_LM",
                                 target_modules=targets if targets == "all-linear" else targets.split(","))
    trainer = SFTTrainer(model=model_name, args=targs, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model
    if args.use_lora:  # a plain checkpoint: 03/04 load it with from_pretrained, no peft needed
        model = model.merge_and_unload()
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": round(seconds, 1), "steps": trainer.state.global_step,
            "train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "trained_tokens": sum(sum(r["assistant_masks"]) for r in records),
            "total_tokens": sum(len(r["input_ids"]) for r in records)}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def read_rows(path: str) -> tuple[list[dict], int]:
    """Raw rows (a bad row is skipped later with a reason, not fatal here); a hub name gives its train split."""
    rows = utils.read_jsonl(path) if Path(path).is_file() else utils.load_questions(path, split="train")
    unknown = sum(bool(set(r) - KNOWN_ROW_FIELDS) for r in rows)
    return rows, unknown


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def print_table(before: dict | None, after: dict) -> None:
    print("| model | questions | format-valid | searches/question | F1 | EM |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("before warm-up", before), ("after warm-up", after)):
        if m:
            print(f"| {name} | {m['n']} | {100 * m['format_valid']:.0f}% | {m['searches']:.2f} | "
                  f"{m['f1']:.3f} | {m['em']:.3f} |")


def main():
    import torch
    import transformers
    from trl import SFTConfig, TrlParser

    parser = TrlParser((WarmupArguments, utils.SearchArguments, SFTConfig))
    # bf16 on a GPU, fp32 on the CPU (bf16 autocast there is ~4x slower; transformers refuses it anyway)
    parser.set_defaults(output_dir="runs/sft", save_strategy="no", logging_steps=5, report_to="none",
                        bf16=torch.cuda.is_available())
    try:
        args, sargs, targs = parser.parse_args_and_config()
    except ValueError as e:  # e.g. a GPU preset (bf16) on a machine without a GPU
        raise utils.ReSearchError(f"bad arguments: {e}") from e
    if args.source not in ("supervision", "rollouts"):
        raise utils.ReSearchError(f"--source must be supervision or rollouts, not {args.source!r}")
    if args.rollout_backend not in ("hf", "vllm"):
        raise utils.ReSearchError(f"--rollout_backend must be hf or vllm, not {args.rollout_backend!r}")
    if args.hop_match not in ("passage", "title"):
        raise utils.ReSearchError(f"--hop_match must be passage or title, not {args.hop_match!r}")
    if not Path(args.train_data).is_file() and (args.source == "supervision" or args.train_data not in utils.HUB_NAMES):
        raise utils.ReSearchError(f"--train_data {args.train_data}: no such file")
    out_dir = Path(targs.output_dir)
    tmp_dir = Path(str(out_dir) + ".tmp")  # built here, renamed when complete
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    targs.output_dir = str(tmp_dir)
    t_start = time.perf_counter()

    model_name = utils.resolve_model(args.model)
    tokenizer = utils.load_tokenizer(model_name)
    eos_id = tokenizer.eos_token_id
    search = utils.load_retriever(sargs.retriever)
    rows, unknown = read_rows(args.train_data)
    retriever_desc = getattr(search, "description", sargs.retriever)
    print(f"model {model_name} | data {args.train_data} ({len(rows)} rows) | retriever {retriever_desc} | "
          f"topk {sargs.topk} | passage_max_words {sargs.passage_max_words} | max_searches {sargs.max_searches} | "
          f"max_completion_length {args.max_completion_length}", flush=True)
    if unknown:
        print(f"note: {unknown} rows carry fields other than {sorted(KNOWN_ROW_FIELDS)} (ignored)", flush=True)

    # 1/2. trajectories
    t0 = time.perf_counter()
    if args.trajectories:
        records = utils.read_jsonl(args.trajectories)
        if not all(isinstance(r.get("input_ids"), list) and isinstance(r.get("assistant_masks"), list)
                   and len(r["input_ids"]) == len(r["assistant_masks"]) for r in records):
            raise utils.ReSearchError(f"--trajectories {args.trajectories}: every row needs input_ids and "
                                      f"assistant_masks of equal length (a trajectories.jsonl written by this script)")
        stats = Counter(kept=len(records))
    elif args.source == "supervision":
        records, stats = build_from_supervision(rows, tokenizer, search, sargs, args.max_completion_length, eos_id,
                                                args.hop_match)
    else:
        gen_name = utils.resolve_model(args.rollout_model or args.model)
        gen_tok = utils.load_tokenizer(gen_name)
        if args.rollout_backend == "vllm":
            generate = vllm_generate_fn(gen_name, args.rollout_temperature, seed=targs.seed,
                                        gpu_memory_utilization=args.vllm_gpu_memory_utilization)
            try:  # the model's generation config may list more stop ids than its tokenizer (Qwen: 2)
                gen_eos = transformers.GenerationConfig.from_pretrained(gen_name).eos_token_id
            except OSError:
                gen_eos = None
            eos_ids = {gen_tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
        else:
            gen_model = utils.load_model(gen_name)
            generate = utils.hf_generate_fn(gen_model, gen_tok, do_sample=True, temperature=args.rollout_temperature)
            eos_ids = utils.eos_token_ids(gen_tok, gen_model)
        records, stats = build_from_rollouts(rows, tokenizer, search, sargs, args, generate, gen_tok, eos_ids, eos_id)
    build_seconds = time.perf_counter() - t0
    total = sum(stats.values())
    print(f"trajectories: kept {stats['kept']}/{total} rows ({100 * stats['kept'] / max(total, 1):.0f}%) in "
          f"{build_seconds:.1f}s; dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if k != "kept")
                                                or "none"), flush=True)
    by_ds = Counter(r["dataset"] for r in records)
    print("kept by dataset: " + ", ".join(f"{k} {v}" for k, v in sorted(by_ds.items())), flush=True)
    if targs.max_length is not None:  # never let the trainer truncate a trajectory silently
        too_long = [r for r in records if r["num_tokens"] > targs.max_length]
        if too_long:
            print(f"dropped {len(too_long)} trajectories longer than --max_length {targs.max_length}", flush=True)
            stats["longer_than_max_length"] += len(too_long)
            records = [r for r in records if r["num_tokens"] <= targs.max_length]
    if args.max_hops:
        n_before = len(records)
        records = [r for r in records if len(r["queries"]) <= args.max_hops]
        print(f"--max_hops {args.max_hops}: {len(records)} of {n_before} trajectories", flush=True)
    train_records = take_round_robin(records, args.max_examples)
    if not train_records:
        raise utils.ReSearchError(f"no usable trajectory from {args.train_data} (dropped: {dict(stats)})")
    write_jsonl(tmp_dir / "trajectories.jsonl", train_records)

    settings = {
        "stage": "02_sft_warmup", "base_model": args.model, "train_data": args.train_data, "source": args.source,
        "retriever": sargs.retriever, "retriever_description": retriever_desc, "corpus": (getattr(search, "manifest", None) or {}).get("corpus"),
        **{k: v for k, v in asdict(sargs).items() if k != "retriever"},
        "max_completion_length": args.max_completion_length,
        "yield": {"rows": total, **dict(stats)}, "num_trajectories": len(records), "num_trained": len(train_records),
        "build_seconds": round(build_seconds, 1), "warmup_args": asdict(args),
        "training": {k: getattr(targs, k) for k in ("learning_rate", "num_train_epochs", "max_steps",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                     "weight_decay", "bf16", "gradient_checkpointing", "max_length", "seed")},
    }

    if not args.build_only:
        questions = utils.load_questions(args.eval_data, limit=args.eval_before_after) if args.eval_before_after else []
        before = after = None
        if questions:
            print(f"measuring the base model on {len(questions)} questions of {args.eval_data} ...", flush=True)
            before = measure(model_name, questions, tokenizer, search, sargs, args.max_completion_length,
                             args.rollout_batch_size)
            print(f"  before: {before}", flush=True)
        print(f"training on {len(train_records)} trajectories "
              f"({sum(r['num_tokens'] for r in train_records)} tokens, "
              f"{sum(sum(r['assistant_masks']) for r in train_records)} with loss) ...", flush=True)
        settings["result"] = train(train_records, model_name, tokenizer, targs, args, tmp_dir)
        print(f"  {settings['result']}", flush=True)
        if questions:
            print(f"measuring the warmed-up model on the same {len(questions)} questions ...", flush=True)
            after = measure(str(tmp_dir), questions, tokenizer, search, sargs, args.max_completion_length,
                            args.rollout_batch_size)
            settings["eval_before_after"] = {"data": args.eval_data, "n": len(questions), "decoding": "greedy",
                                             "before": before, "after": after}
            print_table(before, after)
    settings["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (tmp_dir / "warmup.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")

    # Publish: the finished folder replaces any earlier one in one rename.
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
