"""02_sft_warmup.py --source rollouts: warm-up trajectories by rejection sampling. Any model
(--rollout_model, e.g. a bigger instruct model with --rollout_backend vllm on a GPU) runs the search loop
(utils.search_rollout) on the training questions; of --rollout_samples per question, the best rollout with a
valid format and F1 >= --min_f1 is kept, re-tokenised segment by segment with the trained model's tokenizer
when the two differ (model text and result blocks separately, as the GRPO rollout builds them).
"""

from collections import Counter

import utils

BATCH = 8  # questions sampled together (x --rollout_samples rows)
VLLM_MEMORY = 0.4  # --rollout_backend vllm: its share of the GPU; training in the same process needs the rest


def vllm_generate_fn(model_name: str, temperature: float, top_p: float = 1.0, seed: int = 0,
                     gpu_memory_utilization: float = 0.4) -> utils.GenerateFn:
    """The vLLM back end of utils.search_rollout (GPU only): same signature as utils.hf_generate_fn."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_name, seed=seed, enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization)
    eos_id = llm.get_tokenizer().eos_token_id

    def generate(contexts: list[list[int]], max_new_tokens: int):
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
        return new, None

    return generate


def resegment(rollout: utils.Rollout, src_tok, tokenizer, prompt_ids: list[int], eos_id: int) -> utils.Rollout:
    """A rollout sampled with another tokenizer, re-tokenised segment by segment with the trained model's
    (model text and result blocks separately, as the GRPO rollout builds them)."""
    ids, mask = [], []
    for seg, m in rollout.segments():
        ended = m and seg and seg[-1] == src_tok.eos_token_id
        new = tokenizer(src_tok.decode(seg, skip_special_tokens=True), add_special_tokens=False)["input_ids"] + ([eos_id] if ended else [])
        ids += new
        mask += [m] * len(new)
    return utils.Rollout(prompt_ids=prompt_ids, completion_ids=ids, mask=mask, queries=list(rollout.queries),
                         ended_with_eos=rollout.ended_with_eos, done=True)


def build_from_rollouts(rows: list[dict], tokenizer, search: utils.SearchFn, sargs: utils.SearchArguments,
                        args, generate: utils.GenerateFn, gen_tok, eos_ids: set[int], eos_id: int,
                        make_record) -> tuple[list[dict], Counter]:
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
    for b in range(0, len(usable), BATCH):
        batch = usable[b : b + BATCH]
        prompts = [utils.encode(utils.build_prompt(r["question"].strip(), gen_tok, sargs.prompt_template),
                                       gen_tok) for r, _ in batch]
        rollouts = utils.search_rollout([p for p in prompts for _ in range(args.rollout_samples)], generate, search,
                                        gen_tok, eos_ids, max_completion_length=args.max_completion_length,
                                        topk=sargs.topk, max_searches=sargs.max_searches,
                                        passage_max_words=sargs.passage_max_words)
        for i, (row, golds) in enumerate(batch):
            scored = []
            for r in rollouts[i * args.rollout_samples : (i + 1) * args.rollout_samples]:
                if not same_tok:
                    prompt_ids = utils.encode(
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


def build(rows: list[dict], tokenizer, search, sargs, args, targs, make_record) -> tuple[list[dict], Counter]:
    """The sampling model (hf or vLLM) and its stop ids, then build_from_rollouts."""
    import transformers
    gen_name = args.rollout_model or args.model
    gen_tok = utils.load_tokenizer(gen_name)
    if args.rollout_backend == "vllm":
        generate = vllm_generate_fn(gen_name, args.rollout_temperature, seed=targs.seed,
                                    gpu_memory_utilization=VLLM_MEMORY)
        try:  # the model's generation config may list more stop ids than its tokenizer (Qwen: 2)
            eos_ids = utils.eos_token_ids(gen_tok, transformers.GenerationConfig.from_pretrained(gen_name))
        except OSError:
            eos_ids = utils.eos_token_ids(gen_tok)
    else:
        model = utils.load_model(gen_name)
        config = transformers.GenerationConfig(**{**model.generation_config.to_dict(), "do_sample": True,
                                                  "temperature": args.rollout_temperature, "top_p": 1.0, "top_k": 0})
        generate = utils.hf_generate_fn(model, gen_tok, config)
        eos_ids = utils.eos_token_ids(gen_tok, model.generation_config)
    return build_from_rollouts(rows, tokenizer, search, sargs, args, generate, gen_tok, eos_ids,
                               tokenizer.eos_token_id, make_record)
