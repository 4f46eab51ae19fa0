"""04_eval.py --backend vllm (GPU): greedy vLLM for every method. Research rows go in as token ids and come
back as token ids, so the layout is exactly the hf back end's: sampled ids kept, result blocks spliced in."""

import utils

GPU_MEMORY_UTILIZATION = 0.85  # the share of GPU memory vLLM takes (the evaluation is alone on the GPU)


def backend(args, tok, eos_ids: set[int]):
    """(generate_ids, complete): the two functions 04_eval.py's methods call (see its hf_backend)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise utils.ReSearchError("--backend vllm needs vLLM on a CUDA machine: make setup-gpu") from e
    max_len = 512 + args.max_completion_length  # the longest prompt the paper allows + the response budget
    llm = LLM(model=args.model, tokenizer=args.model, dtype="bfloat16" if args.dtype == "auto" else args.dtype,
              seed=0, max_model_len=max_len, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
              enable_prefix_caching=True)

    def run(prompts: list[list[int]], max_new_tokens: int, stop: list[str]):
        params = [SamplingParams(temperature=0.0, max_tokens=max(1, min(max_new_tokens, max_len - len(p))),
                                 stop=stop, include_stop_str_in_output=True, skip_special_tokens=True,
                                 stop_token_ids=sorted(eos_ids)) for p in prompts]
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def generate_ids(contexts: list[list[int]], max_new_tokens: int):
        out = []
        for o in run(contexts, max_new_tokens, [utils.SEARCH_CLOSE]):
            c, ids = o.outputs[0], list(o.outputs[0].token_ids)
            if c.finish_reason == "stop" and c.stop_reason in (None, *eos_ids) and (not ids or ids[-1] not in eos_ids):
                ids.append(tok.eos_token_id)  # stopped at EOS, but the id was not returned
            out.append(ids)
        return out, None

    def complete(prompts: list[str], max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
        outs = run([utils.encode(p, tok) for p in prompts], max_new_tokens, stop or [])
        return [o.outputs[0].text for o in outs]  # up to and with the first stop string, as FlashRAG's

    return generate_ids, complete
