"""04_eval.py --backend api: any OpenAI-compatible /v1/completions server (SGLang, as the paper served its
model; vLLM; `transformers serve`). Prompts are rendered locally with --model's tokenizer and sent as text;
research continues the text after each result block, with stop=["</search>"]. The ids are the local
tokenisation of the server's text, not necessarily the ids it sampled: the hf and vllm back ends give
token-exact trajectories, a text API cannot."""

import concurrent.futures
import os

import utils


def api_ids_from_text(text: str, finish_reason: str | None, matched, tok, eos_id: int) -> list[int]:
    """A text answer -> ids for the rollout. The stop string comes back included (transformers serve), or
    excluded with the match named (vLLM stop_reason, SGLang matched_stop), or excluded and unnamed (OpenAI):
    then a stop after an unclosed <search> is read as </search>, any other stop as EOS."""
    search = text.endswith(utils.SEARCH_CLOSE)
    unclosed = text.rfind(utils.SEARCH_OPEN) > text.rfind(utils.SEARCH_CLOSE)
    if not search and finish_reason == "stop" and (matched == utils.SEARCH_CLOSE or (matched is None and unclosed)):
        text, search = text + utils.SEARCH_CLOSE, True
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [eos_id] if finish_reason == "stop" and not search else ids


def backend(args, tok, eos_ids: set[int]):
    """(generate_ids, complete): the two functions 04_eval.py's methods call (see its hf_backend)."""
    import openai
    client = openai.OpenAI(base_url=args.api_base_url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                           max_retries=3, timeout=600)
    pool = concurrent.futures.ThreadPoolExecutor(args.batch_size)

    def call(prompt: str, max_tokens: int, stop: list[str]):
        try:
            r = client.completions.create(model=args.model, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0.0, top_p=1.0, stop=stop or None)
        except openai.OpenAIError as e:
            raise utils.ReSearchError(f"--backend api: {args.api_base_url} failed: {e}") from e
        c = r.choices[0]
        extra = c.model_extra or {}
        return c.text or "", c.finish_reason, extra.get("stop_reason", extra.get("matched_stop"))

    def generate_ids(contexts: list[list[int]], max_new_tokens: int):
        prompts = [tok.decode(c, skip_special_tokens=False) for c in contexts]
        outs = pool.map(lambda p: call(p, max_new_tokens, [utils.SEARCH_CLOSE]), prompts)
        return [api_ids_from_text(t, f, m, tok, tok.eos_token_id) for t, f, m in outs], None

    def complete(prompts: list[str], max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
        outs = pool.map(lambda p: call(p, max_new_tokens, stop or []), prompts)
        # FlashRAG's generator returns the text with the stop string that ended it
        return [t + m if isinstance(m, str) and m in (stop or []) and not t.endswith(m) else t for t, _, m in outs]

    return generate_ids, complete
