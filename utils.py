"""What the stages share, in the order a question meets it: the prompt, the search rollout (where the
retrieved-token mask is built), the reward; then the retriever, data and model loaders. Exact strings are the
reference's (Agent-RL/ReSearch, branch re-search); differences: README "Faithfulness"."""

from __future__ import annotations

import gzip
import itertools
import json
import operator
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

    import yaml
    from trl import TrlParser

    if {"-h", "--help"} & set(sys.argv):
        importlib.import_module("extras.help").attach_docstrings(*dataclass_types)
    parser = TrlParser(dataclass_types)
    parser.set_defaults(**(defaults or {}))  # a stage's own defaults for TRL's fields
    try:
        return tuple(parser.parse_args_and_config())
    except yaml.YAMLError as e:  # its message names the file, line and column
        raise ReSearchError(f"--config: not valid YAML: {' '.join(str(e).split())}") from e
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
    logprobs: list = field(default_factory=list)  # sampling log-probs (vLLM); None where unknown or retrieved
    queries: list[str] = field(default_factory=list)
    turn_start: int = 0  # where the current turn starts in completion_ids: after the last result block
    ended_with_eos: bool = False
    done: bool = False

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    def segments(self) -> list[tuple[list[int], int]]:
        """Consecutive runs of (ids, mask value)."""
        runs = itertools.groupby(zip(self.completion_ids, self.mask), key=operator.itemgetter(1))
        return [([token for token, _ in run], mask) for mask, run in runs]


# generate(contexts, max_new_tokens) -> (each row's new ids, their sampling log-probs or None). A row that
# stopped early may be padded. Hugging Face gives no log-probs (None); vLLM does.
GenerateFn = Callable[[list[list[int]], int], tuple[list[list[int]], list[list[float]] | None]]
SearchFn = Callable[[list[str], int], list[list[dict]]]  # search(queries, k) -> passages, best first


def hf_generate_fn(model, tokenizer, generation_config=None, fast: bool = False, stop=(SEARCH_CLOSE,)) -> GenerateFn:
    """One batched generate per call, rows stopped at EOS or a stop string. generation_config samples (TRL's);
    None = greedy. fast: the CPU presets' generate (extras/fast_rollout.py), same tokens, KV cache kept."""
    import copy
    import importlib

    import torch
    from transformers import StoppingCriteriaList, StopStringCriteria

    if fast:
        return importlib.import_module("extras.fast_rollout").hf_generate_fn(model, tokenizer, generation_config)
    stop_criteria = StoppingCriteriaList()
    if stop:  # built once: generate(stop_strings=...) would rebuild it from the whole vocabulary on every call
        stop_criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop)))
    config = copy.deepcopy(generation_config or model.generation_config)
    if generation_config is None:  # real greedy, whatever sampling defaults the checkpoint ships
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    def generate(contexts: list[list[int]], max_new_tokens: int):
        width = max(len(c) for c in contexts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=model.device)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=model.device)
        config.update(max_new_tokens=max_new_tokens, pad_token_id=pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, generation_config=config,
                                 stopping_criteria=stop_criteria)
        return out[:, width:].tolist(), None

    return generate


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """The tokenizer's EOS and a generation config's eos_token_id(s) (Qwen2.5-Instruct has two)."""
    extra = getattr(generation_config, "eos_token_id", None)
    if not isinstance(extra, list):
        extra = [extra]
    return ({tokenizer.eos_token_id} | set(extra)) - {None}


def cut_at_stop(new_ids: list[int], tokenizer, eos_ids: set[int], before: list[int]) -> tuple[list[int], str]:
    """A row's new ids up to its stop, and why: "search" (to the token completing </search>), "eos" (EOS
    kept) or "length". Ids after the first EOS or pad are padding. `before`: the turn's earlier ids (a
    </search> can straddle calls). One decode if no </search>, else a binary search for its last token."""
    end = next((i for i, t in enumerate(new_ids) if t in eos_ids or t == tokenizer.pad_token_id), len(new_ids))

    def has_close(n: int) -> bool:
        return SEARCH_CLOSE in tokenizer.decode(before + new_ids[:n], skip_special_tokens=True)

    if has_close(end):
        low = 1
        high = end
        while low < high:  # the shortest prefix that completes </search>
            mid = (low + high) // 2
            if has_close(mid):
                high = mid
            else:
                low = mid + 1
        return new_ids[:low], "search"
    if end < len(new_ids) and new_ids[end] in eos_ids:
        return new_ids[: end + 1], "eos"
    return new_ids[:end], "length"


def search_rollout(prompt_ids: list[list[int]], generate: GenerateFn, search: SearchFn, tokenizer,
                   eos_ids: set[int], *, max_completion_length: int, topk: int = 5, max_searches: int = 8,
                   passage_max_words: int = 0, max_new_tokens_per_call: int = 0) -> list[Rollout]:
    """ReSearch's rollout, batched. Unfinished rows generate together; a row pauses at </search>; the
    paused rows' queries go to the retriever in one batch; each gets its result block (mask 0) and they
    resume together. A row ends at EOS or when max_completion_length (result blocks count) is spent. Past
    max_searches a search gets LIMIT_BLOCK; an empty query an empty block."""
    rows = [Rollout(prompt_ids=list(p)) for p in prompt_ids]
    active = rows
    while active:
        budget = max(max_completion_length - len(row.completion_ids) for row in active)
        if max_new_tokens_per_call:
            budget = min(budget, max_new_tokens_per_call)  # the same tokens, in shorter calls
        new_ids, logprobs = generate([row.prompt_ids + row.completion_ids for row in active], budget)
        if logprobs is None:
            logprobs = [[None] * len(ids) for ids in new_ids]
        paused: list[Rollout] = []
        for row, new, new_logprobs in zip(active, new_ids, logprobs):
            room = max_completion_length - len(row.completion_ids)
            # a </search> can straddle two calls: decode the turn's last ids with the new ones
            tail = row.completion_ids[max(row.turn_start, len(row.completion_ids) - len(SEARCH_CLOSE)) :]
            kept, stop = cut_at_stop(list(new[:room]), tokenizer, eos_ids, tail)
            row.completion_ids += kept
            row.mask += [1] * len(kept)  # the model's own tokens: trained
            row.logprobs += list(new_logprobs[: len(kept)])
            if stop == "eos":
                row.ended_with_eos = True
                row.done = True
            elif len(row.completion_ids) >= max_completion_length:
                row.done = True  # the budget is spent
            elif stop == "search":
                turn_text = tokenizer.decode(row.completion_ids[row.turn_start :], skip_special_tokens=True)
                row.queries.append(extract_query(turn_text))
                paused.append(row)
            elif len(kept) < min(room, budget):
                row.done = True  # fewer ids than asked, no stop: the back end ended the row (its own length cap)
        to_search = [row for row in paused if row.num_searches <= max_searches]
        found = search([row.queries[-1] for row in to_search], topk) if to_search else []
        blocks = {id(row): format_result_block(passages, passage_max_words) for row, passages in zip(to_search, found)}
        for row in paused:
            block = encode(blocks.get(id(row), LIMIT_BLOCK), tokenizer)
            block = block[: max_completion_length - len(row.completion_ids)]
            # THE RETRIEVED-TOKEN MASK (ReSearch sec. 3.1): the block's ids get mask 0. They stay in the
            # context the model attends to; 03's loss multiplies by this mask (TRL's tool_mask), so they
            # are left out of the policy-gradient loss, the KL term and the entropy.
            row.completion_ids += block
            row.mask += [0] * len(block)
            row.logprobs += [None] * len(block)
            row.turn_start = len(row.completion_ids)
            row.done = len(row.completion_ids) >= max_completion_length  # the budget ran out inside the block
        active = [row for row in rows if not row.done]
    return rows


# ---- 3. The reward: ReSearch's rule-based outcome reward, on the model's own text ----
def reward_text(rollout: Rollout, tokenizer) -> str:
    """The model's own tokens, result blocks reduced to their tags: a passage holding </result> or \\boxed{}
    changes nothing, an answer only in a passage earns nothing."""
    blanked = f" {RESULT_OPEN}\n{RESULT_CLOSE}"
    return "".join(tokenizer.decode(ids, skip_special_tokens=True) if mask else blanked
                   for ids, mask in rollout.segments())


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
    if len(tags) % 4 or any(tag != cycle[i % 4] for i, tag in enumerate(tags)):
        return False
    return extract_answer(response) is not None


def extract_answer(response: str) -> str | None:
    """The last complete \\boxed{...} (nested braces allowed) in the last <answer> block, stripped."""
    answer_start = response.rfind(ANSWER_OPEN)
    if answer_start < 0:
        return None
    answer_end = response.find(ANSWER_CLOSE, answer_start)
    block = response[answer_start + len(ANSWER_OPEN) : answer_end if answer_end >= 0 else len(response)]
    boxed = block.rfind("\\boxed{")
    if boxed < 0:
        return None
    content_start = boxed + len("\\boxed{")
    depth = 1
    for j in range(content_start, len(block)):
        depth += {"{": 1, "}": -1}.get(block[j], 0)
        if depth == 0:
            return block[content_start:j].strip()
    return None


def normalize_answer(text: str) -> str:
    """SQuAD: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _golds(golds) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(prediction: str, golds) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in _golds(golds)))


def f1_score(prediction: str, golds) -> float:
    """Token F1, max over golds; 0 where the prediction or the gold is yes/no/noanswer and they differ."""
    best = 0.0
    pred = normalize_answer(prediction)
    for gold in map(normalize_answer, _golds(golds)):
        if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
            continue
        same = sum((Counter(pred.split()) & Counter(gold.split())).values())
        if same:
            precision = same / len(pred.split())
            recall = same / len(gold.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def compute_reward(response: str, golden_answers, ended_with_eos: bool) -> dict:
    """The paper's reward, on reward_text(): 0 for a bad format (no answer included) or no EOS; else the
    answer's F1 if > 0, else 0.1 (the format was right)."""
    prediction = extract_answer(response)
    f1 = f1_score(prediction, golden_answers) if prediction is not None else 0.0
    em = exact_match(prediction, golden_answers) if prediction is not None else 0.0
    format_ok = check_format(response) and ended_with_eos  # check_format needs a \boxed{} answer
    if not format_ok:
        reward = 0.0
    elif f1 > 0:
        reward = f1
    else:
        reward = 0.1
    return {"reward": reward, "f1": f1, "em": em, "format_ok": format_ok, "prediction": prediction}


# ---- 4. The retriever, questions, models ----
def load_retriever(spec: str) -> SearchFn:
    """An index folder (01_build_index.py loads it), or a server URL (extras/retrieval_server.py), checked
    with one query: a dead server fails here, not when a rollout first searches."""
    import importlib
    if spec.startswith(("http://", "https://")):
        search = importlib.import_module("extras.retrieval_server").http_retriever(spec)
    else:
        search = importlib.import_module("01_build_index").load_index(spec)
    try:
        search(["Wikipedia"], 1)
    except ReSearchError as e:
        raise ReSearchError(f"--retriever {spec} does not answer: {e}") from e
    return search


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
    import importlib
    if Path(spec).exists() or spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        raw = read_jsonl(spec)
        where = f"{spec}:"
    elif spec in HUB_NAMES:  # FlashRAG's datasets on the Hugging Face hub (internet)
        raw = importlib.import_module("extras.hub_data").load_rows(spec, split)
        where = f"{spec} row "
    else:
        raise ReSearchError(f"unknown dataset {spec!r}: not a file, and not one of {', '.join(HUB_NAMES)}")
    questions = []
    for n, row in enumerate(raw[:limit], 1):
        question = row.get("question")
        golds = row.get("golden_answers", row.get("answer", []))
        if not isinstance(question, str) or not question.strip():
            raise ReSearchError(f"{where}{n}: missing or empty \"question\"")
        questions.append({"id": str(row.get("id", n - 1)), "question": question.strip(),
                          "golden_answers": _golds(golds or []), "metadata": row.get("metadata") or {}})
    return questions


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
    """A causal LM for generation, on a GPU if there is one. dtype auto: bfloat16 where it is native (a GPU, or a
    CPU with AMX / AVX-512 BF16: extras/precision.py), else float32."""
    import importlib

    import torch
    import transformers
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = importlib.import_module("extras.precision").choose_dtype(dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path),
                                                                  dtype=getattr(torch, dtype))
    except (OSError, AttributeError, ValueError) as e:
        raise ReSearchError(f"cannot load model {name_or_path!r} as {dtype}: {e}") from e
    return model.to(device).eval()
