"""03_grpo_search.py --use_vllm true: the search rollout's generate on TRL's vLLM engine (colocate: in the
trainer's process; server: `trl vllm-serve` on other GPUs). Each context (prompt + completion so far) goes in
as one prompt with one sample, stopping at "</search>" (kept in the output, as the trainer asks vLLM to); the
new ids come back with their sampling log-probs. The token layout and mask are the Hugging Face back end's."""

import torch

import utils


def generate_fn(trainer) -> utils.GenerateFn:
    from trl.extras.profiling import profiling_context

    def generate(contexts: list[list[int]], max_new_tokens: int):
        vg, n = trainer.vllm_generation, len(contexts)
        if trainer.accelerator.num_processes > 1:
            # The server (and tensor-parallel colocate) gathers every rank's prompts, runs them with ONE
            # max_tokens and hands rank r rows [r*n, (r+1)*n): pad every rank to the same count and budget.
            sizes = trainer.accelerator.gather(torch.tensor([n, max_new_tokens], device=trainer.accelerator.device))
            width, max_new_tokens = sizes.view(-1, 2).max(0).values.tolist()
            contexts = contexts + [contexts[0]] * (width - n)  # the padding's output is dropped below
        vg.max_completion_length = max_new_tokens  # this turn's budget; the loop trims each row to its own
        _, ids, logprobs, _ = vg.generate(prompts=contexts, images=None, num_generations=1,
                                          profiler=profiling_context(trainer, "vLLM.generate"))
        return [list(x) for x in ids][:n], [[lp[0] for lp in seq] for seq in logprobs][:n]

    return generate
