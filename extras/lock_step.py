"""Several processes (accelerate launch): every rank makes the same number of generate calls in the search
rollout. vLLM's server mode gathers every rank's prompts into one request, and under ZeRO-3 without the
weight gather for generation, or FSDP, every forward is a collective: a rank whose rows are all done keeps
making one-token dummy calls until every rank is done (logged as search/idle_generate_calls)."""

import torch


def wrap(generate, gather, device="cpu"):
    """(generate_in_step, wait_for_other_ranks). gather(tensor) -> every rank's tensors (accelerator.gather).
    Each call of generate_in_step first tells the other ranks this one still generates; once its rollout is
    done, a rank calls wait_for_other_ranks(any context), which returns the dummy calls it made."""

    def any_rank_active(this_rank: bool) -> bool:
        flags = gather(torch.tensor([float(this_rank)], device=device))
        return flags.sum().item() > 0

    def generate_in_step(contexts: list[list[int]], max_new_tokens: int):
        any_rank_active(True)
        return generate(contexts, max_new_tokens)

    def wait_for_other_ranks(context: list[int]) -> int:
        idle_calls = 0
        while any_rank_active(False):
            generate([context], 1)  # its output is dropped
            idle_calls += 1
        return idle_calls

    return generate_in_step, wait_for_other_ranks
