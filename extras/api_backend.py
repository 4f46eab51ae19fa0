"""04_eval.py --backend api: any OpenAI-compatible /v1/completions server (SGLang, as the paper served its
model; vLLM; `transformers serve`). Prompts are rendered locally with --model's tokenizer. What goes over the
wire depends on what the server takes, probed once at start (one line on stderr says which):
  ids -> ids   vLLM: the prompt as token ids, the sampled ids back (return_token_ids): token-exact rows,
               the hf and vllm back ends' layout.
  ids -> text  a server that takes token ids but returns text only (SGLang's OpenAI endpoint): the prompt is
               exact; the reply is tokenised locally.
  text         a server that takes text only (`transformers serve`): the context is decoded and re-tokenised
               by the server, the reply tokenised locally; a row's ids can differ from the ones it sampled
               (decode + re-encode is not the identity: merges, byte-fallback tokens).
A research row asks for what fits after its own context when the server says its length (/v1/models
max_model_len): a prompt plus max_tokens over it is an HTTP 400 there."""

import concurrent.futures
import json
import os
import sys
import time
import urllib.error
import urllib.request
from functools import partial

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


def api_ids_from_ids(ids: list[int], finish_reason: str | None, matched, eos_ids: set[int], eos_id: int) -> list[int]:
    """The server's own sampled ids (vLLM's return_token_ids). A row that stopped at EOS (finish "stop", no
    stop string named) ends with an EOS id, as the hf back end's do."""
    if finish_reason == "stop" and (matched is None or matched in eos_ids) and (not ids or ids[-1] not in eos_ids):
        return ids + [eos_id]
    return ids


def server_max_model_len(base_url: str, model: str | None = None, wait_s: float = 0.0) -> int | None:
    """The served model's length as base_url/models reports it (vLLM, SGLang: max_model_len; the named model's,
    else the first's), waiting up to wait_s for a server that is still starting; None if it does not say."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=30) as r:
                cards = json.loads(r.read().decode())["data"]
            break
        except (urllib.error.HTTPError, ValueError, KeyError):
            return None  # up, but no model list
        except OSError as e:
            if time.monotonic() >= deadline:
                raise utils.ReSearchError(f"{base_url}/models: no answer from the server ({e})") from e
            time.sleep(2)
    lengths = [c.get("max_model_len") for c in cards if c.get("id") == model] or [c.get("max_model_len") for c in cards]
    return lengths[0] if lengths and isinstance(lengths[0], int) else None


def backend(args, tok, eos_ids: set[int]):
    """(generate_ids, complete): the two functions 04_eval.py's methods call (see its hf_backend)."""
    import openai
    client = openai.OpenAI(base_url=args.api_base_url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                           max_retries=3, timeout=600)
    pool = concurrent.futures.ThreadPoolExecutor(args.batch_size)
    max_len = server_max_model_len(args.api_base_url, args.model)

    def call(prompt, max_tokens: int, stop: list[str], extra: dict):
        try:
            r = client.completions.create(model=args.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                          top_p=1.0, stop=stop or None, extra_body=extra or None)
        except openai.OpenAIError as e:
            raise utils.ReSearchError(f"--backend api: {args.api_base_url} failed: {e}") from e
        c = r.choices[0]
        more = c.model_extra or {}
        return c.text or "", c.finish_reason, more.get("stop_reason", more.get("matched_stop")), more.get("token_ids")

    # the probe: does the server take a prompt as token ids, and does it give the sampled ids back?
    ids_extra = {"return_token_ids": True, "include_stop_str_in_output": True}
    try:
        probe = call(utils.encode("Hello", tok), 1, [], ids_extra)
        mode = "ids -> ids" if isinstance(probe[3], list) else "ids -> text"
    except utils.ReSearchError:
        mode = "text"
    print(f"--backend api: {args.api_base_url} ({mode}): "
          f"{'token-exact rows' if mode == 'ids -> ids' else 'replies re-tokenised locally'}; "
          f"max_model_len {max_len if max_len else 'not reported'}", file=sys.stderr)

    def room(n: int, max_new_tokens: int) -> int:
        """What a call may ask for after an n-token prompt: the budget, capped by the server's length."""
        return max_new_tokens if max_len is None else min(max_new_tokens, max_len - n)

    def one_row(context: list[int], max_new_tokens: int) -> list[int]:
        cap = room(len(context), max_new_tokens)
        if cap < 1:
            return []  # the context fills the server: the row ends here, out of budget
        if mode == "text":
            prompt, extra = tok.decode(context, skip_special_tokens=False), {}
        else:
            prompt, extra = context, ids_extra
        text, finish, matched, ids = call(prompt, cap, [utils.SEARCH_CLOSE], extra)
        if mode == "ids -> ids":
            return api_ids_from_ids(list(ids), finish, matched, eos_ids, tok.eos_token_id)
        return api_ids_from_text(text, finish, matched, tok, tok.eos_token_id)

    def generate_ids(contexts: list[list[int]], max_new_tokens: int):
        return list(pool.map(partial(one_row, max_new_tokens=max_new_tokens), contexts)), None

    def one_text(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        ids = utils.encode(prompt, tok)
        if max_len is not None and len(ids) >= max_len:
            raise utils.ReSearchError(f"--backend api: a prompt of {len(ids)} tokens does not fit the server's "
                                      f"max_model_len {max_len}")
        sent = prompt if mode == "text" else ids
        text, _, matched, _ = call(sent, room(len(ids), max_new_tokens), stop, {})
        # FlashRAG's generator returns the text with the stop string that ended it
        return text + matched if isinstance(matched, str) and matched in stop and not text.endswith(matched) else text

    def complete(prompts: list[str], max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
        return list(pool.map(partial(one_text, max_new_tokens=max_new_tokens, stop=stop or []), prompts))

    return generate_ids, complete


def check_prompts(args, sargs, datasets: list[dict]) -> None:
    """The vllm back end's check, against the server's length (nothing to check if it does not say)."""
    import importlib
    max_len = server_max_model_len(args.api_base_url, args.model)
    where = f"(the server's max_model_len, {args.api_base_url}/models)"
    importlib.import_module("extras.vllm_backend").check_prompts(args, sargs, datasets, max_len, where)
