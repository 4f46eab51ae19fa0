"""Run by tests/test_vllm.py with .venv-vllm/bin/python (vLLM's CPU build): 03_grpo_search.py's main(), as
its command line runs it (argv after "--"), with --use_vllm true on the colocated engine. Its trainer's
train() is wrapped to look inside, with the engine the run itself built:
  before training: the vLLM rollout of the taught model on its two questions (word_search as retriever) has
    the script's ids and mask, as the Hugging Face path's rollout of the same prompts; sampling log-probs at
    every model token and None at retrieved ones; the engine's and the policy's log-probs of a fixed
    sequence (the searching script) agree;
  after training: TRL's weight sync (the call it makes before each rollout) reaches the engine: the trained
    policy, moved by a fixed random amount, differs from the engine until the sync, and agrees after it.
Writes a JSON report to argv[1]; exits non-zero on any failed check or error."""

import json
import math
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import test_grpo  # noqa: E402  (the taught model's script, word_search)
from conftest import load_stage  # noqa: E402

import utils  # noqa: E402

MAX_COMPLETION = 300


def policy_logprobs(model, seq: list[int]) -> list[float]:
    """The policy's log-prob of each id of seq given the ids before it (from the second on), fp32."""
    import torch
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq], device=model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:], device=model.device)[:, None])[:, 0].tolist()


def engine_logprobs(llm, seq: list[int]) -> list[float]:
    """The engine's log-prob of the same ids (vLLM's prompt log-probs; temperature 1: raw logits)."""
    from vllm import SamplingParams
    out = llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], seq[1:])]


def rollout(trainer, generate, tok):
    return utils.search_rollout([test_grpo.enc(q, tok) for q in (test_grpo.SEARCH_Q, test_grpo.DIRECT_Q)], generate,
                                test_grpo.word_search(), tok, set(trainer.eos_token_ids),
                                max_completion_length=MAX_COMPLETION, topk=test_grpo.SEARCH_ARGS.topk)


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main():
    report_path, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    grpo = load_stage("03_grpo_search.py", "grpo_search")
    report = {"checks": {}}
    train = grpo.SearchGRPOTrainer.train

    def checked_train(trainer, *args, **kwargs):
        tok = trainer.processing_class
        llm = trainer.vllm_generation.llm
        seq = test_grpo.enc(test_grpo.SEARCH_Q, tok) + test_grpo.scripted_completion(tok, test_grpo.SEARCH_Q)[0]
        with trainer.generation_backend() as generate:  # the vLLM generate 03 hands the search loop
            rows = rollout(trainer, generate, tok)
        trainer.model.eval()  # (the trainer sets train mode again)
        hf_rows = rollout(trainer, utils.hf_generate_fn(trainer.model, tok), tok)  # greedy, the policy itself
        checks = report["checks"]
        for r, h, q in zip(rows, hf_rows, (test_grpo.SEARCH_Q, test_grpo.DIRECT_Q)):
            checks[f"vllm layout = script: {q}"] = (r.completion_ids, r.mask) == test_grpo.scripted_completion(tok, q)
            checks[f"vllm mask = hf mask: {q}"] = (r.completion_ids, r.mask) == (h.completion_ids, h.mask)
            checks[f"log-probs at model tokens only: {q}"] = len(r.logprobs) == len(r.mask) and all(
                (lp is None) == (m == 0) and (lp is None or math.isfinite(lp)) for lp, m in zip(r.logprobs, r.mask))
        report["engine_vs_policy_before"] = max_diff(engine_logprobs(llm, seq), policy_logprobs(trainer.model, seq))
        out = train(trainer, *args, **kwargs)
        # The weight sync, made visible: the policy after its steps is moved by a fixed random amount (the two
        # steps themselves may move it by nothing: the taught model's groups get equal rewards, advantage 0),
        # then TRL's own sync (the call it makes before each rollout) must carry it into the engine.
        trained = policy_logprobs(trainer.model, seq)
        import torch
        torch.manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        moved = policy_logprobs(trainer.model, seq)
        report["policy_moved"] = max_diff(trained, moved)
        report["engine_vs_policy_unsynced"] = max_diff(engine_logprobs(llm, seq), moved)
        trainer.vllm_generation.sync_weights()
        report["engine_vs_policy_after"] = max_diff(engine_logprobs(llm, seq), moved)
        report["last_rollouts_logprobs_ok"] = all(
            r.logprobs is not None and len(r.logprobs) == len(r.mask)
            and all((lp is None) == (m == 0) for lp, m in zip(r.logprobs, r.mask)) for r in trainer._rollouts)
        return out

    grpo.SearchGRPOTrainer.train = checked_train
    sys.argv = ["03_grpo_search.py", *argv]
    try:
        grpo.main()
    finally:
        Path(report_path).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
