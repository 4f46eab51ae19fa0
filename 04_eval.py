"""Stage 4: evaluate a model the way the ReSearch paper does (Table 1 of arXiv 2503.19470).

For every method x dataset it generates greedily, scores each prediction with EM, F1 and accuracy
(a normalised gold answer contained in the prediction), optionally asks an LLM judge (the paper's
exact prompt, any OpenAI-compatible endpoint), and writes a table in the paper's shape.

Methods (same retriever, same top-k, greedy decoding, one sample):
  research     the model's own search loop: utils.search_rollout, the code path and token layout
               training uses; prediction = the last \\boxed{} inside <answer> ("" when there is none)
  naive-gen    closed book: "Answer the question based on your own knowledge..." (FlashRAG)
  naive-rag    top-k passages as "Doc i(Title: ...) text" in the system prompt (FlashRAG)
  iter-retgen  3 rounds; round r > 1 retrieves with "question + previous generation" (FlashRAG)
  ircot        up to 5 one-sentence thoughts; each thought is the next query; stops at a thought
               containing "So the answer is:" (IRCoT prompt and demonstration from FlashRAG)
Baseline answers are made short by short_answer() below (first non-empty line, an "Answer:"-style
prefix dropped; for IRCoT the text after the last "So the answer is:" first).

LLM-as-judge (--judge_base_url): temperature 0, retried with backoff; an item whose judge call still
fails (no connection, HTTP error, or a reply without a valid JSON "judgement") is recorded as failed
and kept: LJ = judged correct / ALL questions, so a failure counts as wrong (results.json also gives
the count of failures and LJ over the items judged). An empty prediction is judged wrong without a
call. A rerun judges the items not judged yet or failed before, without generating again.

Reads:  questions (a FlashRAG jsonl such as data/mini/hotpotqa_dev.jsonl, or a hub name: hotpotqa,
        2wikimultihopqa, musique, bamboogle; "bamboogle:test" picks a split), a retriever (an index
        folder from 01_build_index.py or a retrieval server URL), a model (local path or hub id, or
        a model served behind an OpenAI-compatible /v1/completions endpoint).
Writes: <output_dir>/<method>/<dataset>/predictions.jsonl  one object per question, appended per
                                                            batch (an interrupted run resumes)
        <output_dir>/<method>/<dataset>/settings.json      what produced those predictions
        <output_dir>/results.json, <output_dir>/results.md  every cell, and the paper-shaped table

As in the paper's Table 1, the baselines run the untrained instruct model and the ReSearch row the
trained one. CPU, bundled model and mini-Wikipedia (offline; build the index with 01_build_index.py):
  python 04_eval.py --config configs/eval_cpu.yaml --model models/SmolLM2-135M-Instruct \
      --output_dir runs/eval/before                               # all five methods, first 4 questions
  python 04_eval.py --config configs/eval_cpu.yaml --model runs/grpo --methods research \
      --output_dir runs/eval/after                                # the trained model's ReSearch row
  python 04_eval.py --config configs/eval_cpu.yaml --model runs/grpo \
      --question "Were Scott Derrickson and Ed Wood of the same nationality?"      # ask mode

One GPU, the paper's setting (wiki-18 index or server, full dev sets from the hub, vLLM, gpt-4o-mini
judge; OPENAI_API_KEY in the environment):
  python 04_eval.py --config configs/eval_full.yaml --model Qwen/Qwen2.5-7B-Instruct \
      --methods naive-gen naive-rag iter-retgen ircot --output_dir runs/eval/full_baselines
  python 04_eval.py --config configs/eval_full.yaml --model runs/grpo_full --methods research \
      --output_dir runs/eval/full_research

A model served elsewhere (SGLang / vLLM / `transformers serve`), as the paper served its model:
  python 04_eval.py --backend api --api_base_url http://127.0.0.1:30000/v1 --model Qwen/Qwen2.5-7B-Instruct ...
"""

import concurrent.futures
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import utils

METHODS = ("research", "naive-gen", "naive-rag", "iter-retgen", "ircot")


@dataclass
class EvalArguments:
    """What to evaluate, how to generate, where to write, and the judge."""

    model: str = utils.DEFAULT_MODEL
    """Model to evaluate: a local checkpoint (e.g. runs/grpo) or a hub id. With --backend api it names
    the tokenizer (prompts are rendered locally) and, unless --api_model is set, the served model."""
    datasets: list[str] = field(default_factory=lambda: ["data/mini/hotpotqa_dev.jsonl"])
    """Question sets, evaluated in this order: FlashRAG jsonl paths, or hub names (hotpotqa,
    2wikimultihopqa, musique, bamboogle; NAME:SPLIT overrides --split, e.g. bamboogle:test)."""
    split: str = "dev"
    """Hub split for datasets given by name (the paper: dev; Bamboogle has only test)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods to run (table rows): research naive-gen naive-rag iter-retgen ircot."""
    limit: int | None = None
    """Evaluate only the first N questions of each dataset (file order, never shuffled)."""
    output_dir: str | None = None
    """Where results go (default runs/eval/<model name>). An existing run there is resumed."""
    overwrite: bool = False
    """Delete earlier predictions of the selected methods x datasets instead of resuming them."""
    question: str | None = None
    """Ask mode: run the research method on this one question and print its trajectory live."""

    backend: str = "hf"
    """hf (transformers generate, CPU or GPU), vllm (GPU), or api (an OpenAI-compatible
    /v1/completions server such as SGLang, vLLM or `transformers serve`)."""
    batch_size: int = 8
    """Questions generated together (hf backend; vllm takes a whole batch; api: concurrent requests)."""
    dtype: str = "auto"
    """Model dtype: auto = float32 on CPU (bf16 is ~4x slower there), bfloat16 on GPU."""
    device: str | None = None
    """hf backend device (default: cuda if available, else cpu)."""
    max_completion_length: int = 8192
    """research: token budget of a whole response, retrieved tokens included (paper 8192; cpu 512)."""
    max_answer_tokens: int = 32
    """Baselines: new tokens per answer (FlashRAG's default generation budget)."""
    ircot_max_rounds: int = 5
    """IRCoT: most thoughts (retrieval-reasoning rounds) per question."""
    ircot_thought_tokens: int = 32
    """IRCoT: new tokens per thought (FlashRAG's budget); the thought is then cut to its first sentence."""
    ircot_max_passages: int = 15
    """IRCoT: most distinct passages kept in the prompt across rounds (the IRCoT paper's cap)."""
    iter_retgen_rounds: int = 3
    """Iter-RetGen: retrieval-generation rounds."""

    api_base_url: str = "http://127.0.0.1:30000/v1"
    """--backend api: base URL of the OpenAI-compatible server (SGLang's default port is 30000)."""
    api_model: str | None = None
    """--backend api: model name the server knows (default: --model)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key for --backend api (a dummy key is sent if unset)."""
    api_concurrency: int = 8
    """--backend api: requests in flight at once."""
    vllm_gpu_memory_utilization: float = 0.85
    """--backend vllm: fraction of GPU memory vLLM may take."""
    vllm_max_model_len: int | None = None
    """--backend vllm: context length (default: prompt 512 + max_completion_length)."""

    judge_base_url: str | None = None
    """LLM-as-judge endpoint (OpenAI-compatible), e.g. https://api.openai.com/v1. Unset: no judge,
    the LJ columns show '-'."""
    judge_model: str = "gpt-4o-mini"
    """Judge model (the paper: gpt-4o-mini)."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key."""
    judge_retries: int = 5
    """Attempts per item (the reference uses 5); waits judge_backoff * 2**attempt between them."""
    judge_backoff: float = 1.0
    """Seconds before the first retry; doubled each time."""
    judge_max_tokens: int = 1024
    """Longest judge reply (the reference: 1024)."""
    judge_timeout: float = 60.0
    """Seconds per judge request."""
    judge_concurrency: int = 8
    """Judge requests in flight at once."""
    judge_json_mode: bool = True
    """Send response_format={"type": "json_object"}, as the reference does (servers that ignore it
    are fine; the reply is parsed either way)."""

    def __post_init__(self):
        self.methods = [m for spec in self.methods for m in spec.split(",") if m]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise utils.ReSearchError(f"--methods: unknown {bad or 'none given'}; choose from {' '.join(METHODS)}")
        if self.backend not in ("hf", "vllm", "api"):
            raise utils.ReSearchError(f"--backend must be hf, vllm or api, not {self.backend!r}")
        if self.limit is not None and self.limit < 1:
            raise utils.ReSearchError(f"--limit must be >= 1, got {self.limit}")
        for name in ("batch_size", "max_completion_length", "max_answer_tokens", "ircot_max_rounds",
                     "ircot_thought_tokens", "ircot_max_passages", "iter_retgen_rounds",
                     "api_concurrency", "judge_retries", "judge_concurrency", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise utils.ReSearchError(f"--{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Baseline prompts (FlashRAG's, which the paper's baselines ran on)
# ---------------------------------------------------------------------------------------------
NAIVE_GEN_SYSTEM = ("Answer the question based on your own knowledge. Only give me the answer and do not "
                    "output any other words.")
# Verbatim FlashRAG PromptTemplate.base_system_prompt, its missing space after "document." included.
NAIVE_RAG_SYSTEM = ("Answer the question based on the given document.Only give me the answer and do not "
                    "output any other words.\nThe following are given documents.\n\n{reference}")
USER_PROMPT = "Question: {question}"
IRCOT_INSTRUCTION = (
    "You serve as an intelligent assistant, adept at facilitating users through complex, multi-hop reasoning "
    "across multiple documents. This task is illustrated through demonstrations, each consisting of a document "
    "set paired with a relevant question and its multi-hop reasoning thoughts. Your task is to generate one "
    "thought for current step, DON'T generate the whole thoughts at once! If you reach what you believe to be "
    "the final step, start with \"So the answer is:\".")
IRCOT_EXAMPLE = (
    "Wikipedia Title: Kurram Garhi\nKurram Garhi is a small village located near the city of Bannu, which is "
    "the part of Khyber Pakhtunkhwa province of Pakistan. Its population is approximately 35000. Barren hills "
    "are near this village. This village is on the border of Kurram Agency. Other nearby villages are Peppal, "
    "Surwangi and Amandi Kala.\n\nWikipedia Title: 2001–02 UEFA Champions League second group stage\nEight "
    "winners and eight runners- up from the first group stage were drawn into four groups of four teams, each "
    "containing two group winners and two runners- up. Teams from the same country or from the same first "
    "round group could not be drawn together. The top two teams in each group advanced to the quarter- "
    "finals.\n\nWikipedia Title: Satellite tournament\nA satellite tournament is either a minor tournament or "
    "event on a competitive sporting tour or one of a group of such tournaments that form a series played in "
    "the same country or region.\n\nWikipedia Title: Trojkrsti\nTrojkrsti is a village in Municipality of "
    "Prilep, Republic of Macedonia.\n\nWikipedia Title: Telephone numbers in Ascension Island\nCountry Code:+ "
    "247< br> International Call Prefix: 00 Ascension Island does not share the same country code( +290) with "
    "the rest of St Helena.\n\nQuestion: Are both Kurram Garhi and Trojkrsti located in the same country?\n"
    "Thought: Kurram Garhi is located in the country of Pakistan. Trojkrsti is located in the country of "
    "Republic of Macedonia. Thus, they are not in the same country. So the answer is: no.\n\n")
IRCOT_ANSWER = "So the answer is:"

# The paper's judge prompt, exact ({gt_answer} = Python list repr of the gold answers).
JUDGE_PROMPT = """You will be given a question and its ground truth answer list where each item can be a ground truth answer. Provided a pred_answer, you need to judge if the pred_answer correctly answers the question based on the ground truth answer list. You should first give your rationale for the judgement, and then give your judgement result (i.e., correct or incorrect).

Here is the criteria for the judgement:
1. The pred_answer doesn't need to be exactly the same as any of the ground truth answers, but should be semantically same for the question.
2. Each item in the ground truth answer list can be viewed as a ground truth answer for the question, and the pred_answer should be semantically same to at least one of them.

question: {question}
ground truth answers: {gt_answer}
pred_answer: {pred_answer}

The output should in the following json format:
```json 
{
    "rationale": "your rationale for the judgement, as a text",
    "judgement": "your judgement result, can only be 'correct' or 'incorrect'"
}
```

Your output:"""


def chat_or_plain(system: str, user: str, tok, template: str) -> str:
    """System + user through the chat template (instruct models), or FlashRAG's plain layout
    "system\\n\\nuser" (base models). Same auto/chat/base switch as utils.build_prompt."""
    if template == "chat" or (template == "auto" and getattr(tok, "chat_template", None)):
        return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user}"


def split_passage(p: dict) -> tuple[str, str]:
    """wiki-18 contents '"Title"\\ntext' -> (title line as stored, text), as FlashRAG splits it."""
    title, _, text = p["contents"].partition("\n")
    return title, text


def title_of(p: dict) -> str:
    return split_passage(p)[0].strip().strip('"')


def format_docs(passages: list[dict], max_words: int) -> str:
    """FlashRAG's default reference block: 'Doc {i}(Title: {title}) {text}\\n' per passage."""
    out = ""
    for i, p in enumerate(passages):
        title, text = split_passage({"contents": utils.truncate_words(p["contents"], max_words)})
        out += f"Doc {i + 1}(Title: {title}) {text}\n"
    return out


def short_answer(text: str) -> str:
    """A baseline's generation -> a short answer: the first non-empty line, without a leading
    'Answer:' / 'The answer is:' / 'So the (final) answer is:' prefix, stripped. (EM/F1 then drop
    case, punctuation and articles.)"""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:so\s+)?(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:\s*", "", line, flags=re.I)
    return line.strip()


def ircot_answer(thoughts: list[str]) -> str:
    """FlashRAG's ircot_pred_parse (the text after 'So the answer is:', else everything), shortened."""
    text = " ".join(thoughts)
    if IRCOT_ANSWER in text:
        text = text.split(IRCOT_ANSWER)[-1]
    return short_answer(text)


def first_sentence(text: str) -> str:
    """IRCoT keeps one sentence per step: the first line, cut at the first sentence end (FlashRAG's
    sentence regex, which does not split after 'Mr.', 'Dr.', 'St.' and the like), unless that line
    holds 'So the answer is:', which is kept whole."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if IRCOT_ANSWER in line:
        return line
    return re.split(r"(?<=[^A-Z].[.?]) +", line)[0].strip()


# ---------------------------------------------------------------------------------------------
# Back ends. Each gives two functions:
#   generate_ids(contexts: list[list[int]], max_new_tokens) -> new ids per row (utils.GenerateFn,
#       stops at EOS or </search>; the research rollout calls it)
#   complete(prompts: list[str], max_new_tokens) -> new text per row (the baselines call it)
# ---------------------------------------------------------------------------------------------
def hf_backend(model, tok, eos_ids: set[int]):
    import torch

    generate_ids = utils.hf_generate_fn(model, tok, do_sample=False)  # the training rollout's own
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def complete(prompts: list[str], max_new_tokens: int) -> list[str]:
        ids = [utils.encode_prompt(p, tok) for p in prompts]
        width = max(len(c) for c in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in ids])
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ids])
        device = next(model.parameters()).device
        with torch.no_grad():  # greedy: sampling defaults from generation_config are switched off
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        texts = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        return texts

    return generate_ids, complete


def vllm_backend(args: EvalArguments, tok, eos_ids: set[int]):
    """vLLM, greedy. Research rows are submitted as token ids (TokensPrompt) and come back as token ids,
    so the layout is exactly the hf one: sampled ids kept, result blocks spliced in as ids."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise utils.ReSearchError("--backend vllm needs vLLM on a CUDA machine: pip install vllm") from e
    max_len = args.vllm_max_model_len or 512 + args.max_completion_length
    llm = LLM(model=utils.resolve_model(args.model), tokenizer=utils.resolve_model(args.model),
              dtype="bfloat16" if args.dtype == "auto" else args.dtype, seed=0, max_model_len=max_len,
              gpu_memory_utilization=args.vllm_gpu_memory_utilization, enable_prefix_caching=True)

    def run(prompts: list[list[int]], max_new_tokens: int, stop: list[str]):
        params = [SamplingParams(temperature=0.0, max_tokens=max(1, min(max_new_tokens, max_len - len(p))),
                                 stop=stop, include_stop_str_in_output=True, skip_special_tokens=False)
                  for p in prompts]
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def generate_ids(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        out = []
        for o in run(contexts, max_new_tokens, [utils.SEARCH_CLOSE]):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and c.stop_reason is None and (not ids or ids[-1] not in eos_ids):
                ids.append(tok.eos_token_id)  # stopped at EOS but the id was not returned
            out.append(ids)
        return out

    def complete(prompts: list[str], max_new_tokens: int) -> list[str]:
        outs = run([utils.encode_prompt(p, tok) for p in prompts], max_new_tokens, [])
        return [tok.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outs]

    return generate_ids, complete


def api_ids_from_text(text: str, finish_reason: str | None, matched, tok, eos_id: int) -> list[int]:
    """A text API's answer -> ids for the rollout. The stop string comes back included (transformers
    serve), or excluded with the match named (vLLM stop_reason, SGLang matched_stop), or excluded and
    unnamed (OpenAI): then a stop with an unclosed <search> is read as </search>, any other stop as
    EOS. The ids are the local tokenisation of the server's text: not necessarily the ids the server
    sampled (a text API cannot give token-exact trajectories; the hf and vllm back ends do)."""
    search = text.endswith(utils.SEARCH_CLOSE)
    if not search and finish_reason == "stop":
        if matched == utils.SEARCH_CLOSE or (matched is None and text.rfind(utils.SEARCH_OPEN) > text.rfind(utils.SEARCH_CLOSE)):
            text, search = text + utils.SEARCH_CLOSE, True
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if finish_reason == "stop" and not search:
        ids.append(eos_id)
    return ids


def api_backend(args: EvalArguments, tok):
    """Any OpenAI-compatible /v1/completions server (SGLang, vLLM, `transformers serve`). Prompts are
    rendered locally with --model's tokenizer and sent as text; research continues the text after
    each result block, with stop=["</search>"]."""
    import openai
    client = openai.OpenAI(base_url=args.api_base_url, api_key=os.environ.get(args.api_key_env) or "EMPTY",
                           max_retries=3, timeout=600)
    name = args.api_model or args.model
    pool = concurrent.futures.ThreadPoolExecutor(args.api_concurrency)

    def call(prompt: str, max_tokens: int, stop: list[str]):
        try:
            r = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                          top_p=1.0, stop=stop or None)
        except openai.OpenAIError as e:
            raise utils.ReSearchError(f"--backend api: {args.api_base_url} failed: {e}") from e
        c = r.choices[0]
        extra = c.model_extra or {}
        return c.text or "", c.finish_reason, extra.get("stop_reason", extra.get("matched_stop"))

    def generate_ids(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        prompts = [tok.decode(c, skip_special_tokens=False) for c in contexts]
        outs = pool.map(lambda p: call(p, max_new_tokens, [utils.SEARCH_CLOSE]), prompts)
        return [api_ids_from_text(t, f, m, tok, tok.eos_token_id) for t, f, m in outs]

    def complete(prompts: list[str], max_new_tokens: int) -> list[str]:
        return [t for t, _, _ in pool.map(lambda p: call(p, max_new_tokens, []), prompts)]

    return generate_ids, complete


@dataclass
class Engine:
    """Everything a method needs: the back end's two functions, the retriever, the settings."""
    tok: object
    generate_ids: object
    complete: object
    search: object
    eos_ids: set
    args: EvalArguments
    sargs: utils.SearchArguments


# ---------------------------------------------------------------------------------------------
# Methods: a batch of questions -> one record per question (prediction, searches, trajectory)
# ---------------------------------------------------------------------------------------------
def run_research(batch: list[dict], e: Engine) -> list[dict]:
    tok, s = e.tok, e.sargs
    seen: dict[str, list[dict]] = {}

    def search(queries, k):  # the retriever, remembering what each query returned (trajectory)
        res = e.search(queries, k)
        seen.update(zip(queries, res))
        return res

    prompts = [utils.encode_prompt(utils.build_prompt(q["question"], tok, s.prompt_template), tok) for q in batch]
    rollouts = utils.search_rollout(prompts, e.generate_ids, search, tok, e.eos_ids,
                                    max_completion_length=e.args.max_completion_length, topk=s.topk,
                                    max_searches=s.max_searches, passage_max_words=s.passage_max_words)
    out = []
    for q, r in zip(batch, rollouts):
        score = utils.compute_reward(utils.reward_text(r, tok), q["golden_answers"], r.ended_with_eos)
        searches = [{"query": qq, "titles": [title_of(p) for p in seen.get(qq, [])] if i < s.max_searches else None}
                    for i, qq in enumerate(r.queries)]
        out.append({"prediction": score["prediction"] or "", "num_searches": r.num_searches,
                    "format_ok": score["format_ok"],
                    "trajectory": {"completion": tok.decode(r.completion_ids, skip_special_tokens=True),
                                   "ended_with_eos": r.ended_with_eos, "completion_tokens": len(r.completion_ids),
                                   "retrieved_tokens": r.mask.count(0), "searches": searches}})
    return out


def run_naive_gen(batch: list[dict], e: Engine) -> list[dict]:
    prompts = [chat_or_plain(NAIVE_GEN_SYSTEM, USER_PROMPT.format(question=q["question"]), e.tok,
                             e.sargs.prompt_template) for q in batch]
    outs = e.complete(prompts, e.args.max_answer_tokens)
    return [{"prediction": short_answer(o), "num_searches": 0, "format_ok": None,
             "trajectory": {"generation": o}} for o in outs]


def rag_prompt(question: str, passages: list[dict], e: Engine) -> str:
    system = NAIVE_RAG_SYSTEM.replace("{reference}", format_docs(passages, e.sargs.passage_max_words))
    return chat_or_plain(system, USER_PROMPT.format(question=question), e.tok, e.sargs.prompt_template)


def run_naive_rag(batch: list[dict], e: Engine) -> list[dict]:
    docs = e.search([q["question"] for q in batch], e.sargs.topk)
    outs = e.complete([rag_prompt(q["question"], d, e) for q, d in zip(batch, docs)], e.args.max_answer_tokens)
    return [{"prediction": short_answer(o), "num_searches": 1, "format_ok": None,
             "trajectory": {"searches": [{"query": q["question"], "titles": [title_of(p) for p in d]}],
                            "generation": o}} for q, d, o in zip(batch, docs, outs)]


def run_iter_retgen(batch: list[dict], e: Engine) -> list[dict]:
    questions = [q["question"] for q in batch]
    gens = [""] * len(batch)
    steps: list[list[dict]] = [[] for _ in batch]
    for r in range(e.args.iter_retgen_rounds):
        # generation-augmented retrieval: later rounds search with "question + previous generation"
        queries = questions if r == 0 else [f"{q} {g}" for q, g in zip(questions, gens)]
        docs = e.search(queries, e.sargs.topk)
        gens = e.complete([rag_prompt(q, d, e) for q, d in zip(questions, docs)], e.args.max_answer_tokens)
        for st, qq, d, g in zip(steps, queries, docs, gens):
            st.append({"query": qq, "titles": [title_of(p) for p in d], "generation": g})
    return [{"prediction": short_answer(g), "num_searches": e.args.iter_retgen_rounds, "format_ok": None,
             "trajectory": {"rounds": st}} for g, st in zip(gens, steps)]


def ircot_prompt(question: str, passages: list[dict], thoughts: list[str], e: Engine) -> str:
    """FlashRAG's IRCoT template: plain text (no chat template, as FlashRAG sets enable_chat=False),
    passages as 'Wikipedia Title: {title}\\n{text}\\n\\n', then the thoughts so far after 'Thought:'."""
    ref = ""
    for p in passages:
        title, text = split_passage({"contents": utils.truncate_words(p["contents"], e.sargs.passage_max_words)})
        ref += f"Wikipedia Title: {title}\n{text}\n\n"
    return (f"{IRCOT_INSTRUCTION}\n\n{IRCOT_EXAMPLE}\n\n{ref}Question: {question}\nThought:"
            + "".join(" " + t for t in thoughts))


def run_ircot(batch: list[dict], e: Engine) -> list[dict]:
    n = len(batch)
    first = e.search([q["question"] for q in batch], e.sargs.topk)
    pools = [list(d) for d in first]  # passages so far, in the order first retrieved, no duplicates
    thoughts: list[list[str]] = [[] for _ in batch]
    steps = [[{"query": q["question"], "titles": [title_of(p) for p in d]}] for q, d in zip(batch, first)]
    searches = [1] * n
    active = list(range(n))
    for r in range(e.args.ircot_max_rounds):
        if not active:
            break
        gens = e.complete([ircot_prompt(batch[i]["question"], pools[i][: e.args.ircot_max_passages], thoughts[i], e)
                           for i in active], e.args.ircot_thought_tokens)
        retrieve = []
        for i, g in zip(active, gens):
            t = first_sentence(g)
            thoughts[i].append(t)
            steps[i].append({"thought": t})
            if IRCOT_ANSWER not in t and t and r + 1 < e.args.ircot_max_rounds:
                retrieve.append(i)  # the thought is the next query
        if retrieve:
            docs = e.search([thoughts[i][-1] for i in retrieve], e.sargs.topk)
            for i, d in zip(retrieve, docs):
                have = {p["id"] for p in pools[i]}
                pools[i] += [p for p in d if p["id"] not in have]
                searches[i] += 1
                steps[i].append({"query": thoughts[i][-1], "titles": [title_of(p) for p in d]})
        active = retrieve
    return [{"prediction": ircot_answer(t), "num_searches": s, "format_ok": None, "trajectory": {"steps": st}}
            for t, s, st in zip(thoughts, searches, steps)]


# The arguments each method reads (besides the model, the data and the search settings).
METHOD_SETTINGS = {"research": ["max_completion_length"], "naive-gen": ["max_answer_tokens"],
                   "naive-rag": ["max_answer_tokens"], "iter-retgen": ["max_answer_tokens", "iter_retgen_rounds"],
                   "ircot": ["ircot_max_rounds", "ircot_thought_tokens", "ircot_max_passages"]}
RUNNERS = {"research": run_research, "naive-gen": run_naive_gen, "naive-rag": run_naive_rag,
           "iter-retgen": run_iter_retgen, "ircot": run_ircot}


# ---------------------------------------------------------------------------------------------
# LLM-as-judge
# ---------------------------------------------------------------------------------------------
def parse_judge_reply(raw: str) -> str | None:
    """'correct' / 'incorrect' from the judge's JSON reply (bare, or in a ```json fence, or the first
    {...} in the text); None when no such JSON object with a valid "judgement" is found."""
    cands = [raw.strip()]
    m = re.search(r"```(?:json)?\s*(.*?)```", raw, re.S)
    if m:
        cands.append(m.group(1).strip())
    i, j = raw.find("{"), raw.rfind("}")
    if 0 <= i < j:
        cands.append(raw[i : j + 1])
    for c in cands:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            v = str(obj.get("judgement", "")).strip().lower()
            if v in ("correct", "incorrect"):
                return v
    return None


def make_judge(args: EvalArguments):
    """judge(question, golds, prediction) -> {"judgement": "correct"|"incorrect"|None, "status":
    "ok"|"empty"|"failed", ...}. Temperature 0; a failed call or an unparseable reply is retried
    judge_retries times with exponential backoff; then the item is 'failed' (never dropped: it counts
    in the denominator of LJ as not correct). An empty prediction is 'incorrect' without a call."""
    import openai
    client = openai.OpenAI(base_url=args.judge_base_url, api_key=os.environ.get(args.judge_api_key_env) or "EMPTY",
                           max_retries=0, timeout=args.judge_timeout)

    def judge(question: str, golds: list[str], prediction: str) -> dict:
        if not prediction.strip():
            return {"judgement": "incorrect", "status": "empty", "model": args.judge_model}
        prompt = (JUDGE_PROMPT.replace("{question}", question).replace("{gt_answer}", str(list(golds)))
                  .replace("{pred_answer}", prediction))
        extra = {"response_format": {"type": "json_object"}} if args.judge_json_mode else {}
        error, kind, raw = "", "", None
        for attempt in range(args.judge_retries):
            if attempt:
                time.sleep(args.judge_backoff * 2 ** (attempt - 1))
            try:
                r = client.chat.completions.create(model=args.judge_model, temperature=0, max_tokens=args.judge_max_tokens,
                                                   messages=[{"role": "user", "content": prompt}], **extra)
                raw = r.choices[0].message.content or ""
            except openai.APIStatusError as ex:  # the server answered with an error
                error, kind = f"HTTP {ex.status_code}: {str(ex)[:300]}", "http"
                if ex.status_code in (400, 401, 403, 404, 422):
                    break  # our request (key, model name) is wrong: retrying cannot help
                continue
            except openai.APIError as ex:  # connection refused, timeout, ...
                error, kind = f"{type(ex).__name__}: {ex} ({args.judge_base_url})", "connection"
                continue
            verdict = parse_judge_reply(raw)
            if verdict:
                return {"judgement": verdict, "status": "ok", "attempts": attempt + 1, "raw": raw[:2000],
                        "model": args.judge_model}
            error, kind = "reply is not the requested JSON with judgement correct/incorrect", "unparseable"
        return {"judgement": None, "status": "failed", "error": error, "error_kind": kind,
                "raw": raw if raw is None else raw[:2000], "model": args.judge_model}

    return judge


def judge_cell(pred_path: Path, records: list[dict], all_records: list[dict], judge, args: EvalArguments) -> None:
    """Judge every record of this evaluation not yet judged (or whose judgement failed before), in
    chunks; after each chunk predictions.jsonl (all_records) is rewritten atomically, so an
    interruption loses at most one chunk. If every call of a chunk fails to connect, the rest is
    marked failed without calling (a down server costs one chunk of retries, not hours)."""
    todo = [r for r in records if r.get("judge") is None or r["judge"].get("status") == "failed"]
    if not todo:
        return
    print(f"  judging {len(todo)} predictions with {args.judge_model} at {args.judge_base_url}", file=sys.stderr)
    chunk = max(args.judge_concurrency * 4, 8)
    with concurrent.futures.ThreadPoolExecutor(args.judge_concurrency) as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            for rec, j in zip(part, pool.map(lambda r: judge(r["question"], r["golden_answers"], r["prediction"]), part)):
                rec["judge"] = j
            write_jsonl_atomic(pred_path, all_records)
            called = [r for r in part if r["judge"]["status"] != "empty"]
            if called and all(r["judge"].get("error_kind") == "connection" for r in called):
                rest = todo[start + chunk :]
                for rec in rest:
                    if rec["prediction"].strip():
                        rec["judge"] = {"judgement": None, "status": "failed", "model": args.judge_model,
                                        "error_kind": "connection",
                                        "error": f"not attempted: judge unreachable ({called[0]['judge']['error']})"}
                    else:
                        rec["judge"] = {"judgement": "incorrect", "status": "empty", "model": args.judge_model}
                write_jsonl_atomic(pred_path, all_records)
                print(f"error: judge unreachable: {called[0]['judge']['error']}; {len(called) + len(rest)} items "
                      "counted as judge failures (rerun with the judge up to judge them)", file=sys.stderr)
                return


# ---------------------------------------------------------------------------------------------
# Files: settings, resume, results
# ---------------------------------------------------------------------------------------------
def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_predictions(path: Path) -> dict[str, dict]:
    """Finished predictions by id. A last line cut short by an interruption is dropped (and cut from
    the file, so appending continues cleanly); a broken line anywhere else is an error."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1].strip():  # no final newline: an interrupted write
        try:
            json.loads(lines[-1])
            with open(path, "ab") as f:  # complete but unterminated: terminate it before appending
                f.write(b"\n")
        except json.JSONDecodeError:
            print(f"{path}: dropping a truncated last line (interrupted run)", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
            lines = lines[:-1]
    out: dict[str, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise utils.ReSearchError(f"{path}:{n}: broken line ({e.msg}); fix or delete it, or use --overwrite") from e
        if row["id"] in out:
            raise utils.ReSearchError(f"{path}:{n}: duplicate id {row['id']!r}; use --overwrite")
        out[row["id"]] = row
    return out


def model_fingerprint(path: str) -> str:
    """Identifies the weights (so a resumed run never mixes two checkpoints): sizes plus the first
    and last MiB of every weight file of a local checkpoint; a hub id stands for itself."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def dataset_spec(spec: str, split: str) -> tuple[str, str, str]:
    """'bamboogle:test' -> ('bamboogle', 'test', 'bamboogle_test'); a path -> (path, 'file', tag)."""
    name, _, sp = spec.partition(":")
    if sp and name in utils.HUB_NAMES and not Path(spec).exists():
        return name, sp, f"{name}_{sp}"
    if Path(spec).exists() or spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        p = Path(spec)
        stem = p.name.split(".")[0]
        return spec, "file", f"{p.parent.name}_{stem}" if p.parent.name else stem
    return spec, split, f"{spec}_{split}"


LABELS = {"hotpotqa": "HotpotQA", "2wikimultihopqa": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle"}
ROW_NAMES = {"naive-gen": "Naive Generation", "naive-rag": "Naive RAG", "iter-retgen": "Iter-RetGen",
             "ircot": "IRCoT", "research": "ReSearch"}


def summarize(records: list[dict], method: str) -> dict:
    n = len(records)
    judged = [r["judge"] for r in records if r.get("judge") is not None]
    cell = {"n": n,
            "em": 100 * sum(r["em"] for r in records) / n,
            "f1": 100 * sum(r["f1"] for r in records) / n,
            "acc": 100 * sum(r["acc"] for r in records) / n,
            "mean_searches": sum(r["num_searches"] for r in records) / n,
            "format_valid": (100 * sum(bool(r["format_ok"]) for r in records) / n) if method == "research" else None,
            "seconds": sum(r.get("seconds", 0.0) for r in records),
            "lj": None, "judge_correct": None, "judge_failed": None, "judged": len(judged)}
    if len(judged) == n:  # LJ only when every item has been through the judge
        correct = sum(j.get("judgement") == "correct" for j in judged)
        failed = sum(j.get("status") == "failed" for j in judged)
        cell.update(lj=100 * correct / n, judge_correct=correct, judge_failed=failed,
                    lj_excluding_failed=(100 * correct / (n - failed)) if n > failed else None)
    return cell


def fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def results_markdown(header: dict, cells: dict, methods: list[str], datasets: list[dict]) -> str:
    lines = [f"**Model** `{header['model']}` · **retriever** {header['retriever']} · **corpus** {header['corpus']} · "
             f"**top-k** {header['topk']} · **passage words** {header['passage_max_words'] or 'all'} · "
             f"**backend** {header['backend']} · **judge** {header['judge'] or 'none'}", "",
             "Questions: " + ", ".join(f"{d['label']} ({d['source'] if d['split'] == 'file' else 'split ' + d['split']}, "
                                       f"first {d['n']})" for d in datasets), "",
             "EM / LJ (%) as in the paper's Table 1; LJ = judged correct / all questions (judge failures count as "
             "wrong; '-' = not judged).", ""]
    lines.append("| method | " + " | ".join(f"{d['label']} EM | {d['label']} LJ" for d in datasets) + " |")
    lines.append("|---|" + "---:|---:|" * len(datasets))
    order = [m for m in ("naive-gen", "naive-rag", "iter-retgen", "ircot", "research") if m in methods]  # paper's rows
    for m in order:
        row = []
        for d in datasets:
            c = cells[m][d["tag"]]
            lj = fmt(c["lj"]) + (f" ({c['judge_failed']} failed)" if c.get("judge_failed") else "")
            row += [fmt(c["em"]), lj]
        lines.append(f"| {ROW_NAMES[m]} | " + " | ".join(row) + " |")
    lines += ["", "| method | dataset | n | EM | F1 | Acc | LJ | judge failed | format valid | searches/q | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in order:
        for d in datasets:
            c = cells[m][d["tag"]]
            lines.append(f"| {ROW_NAMES[m]} | {d['label']} | {c['n']} | {fmt(c['em'])} | {fmt(c['f1'])} | "
                         f"{fmt(c['acc'])} | {fmt(c['lj'])} | {'-' if c['judge_failed'] is None else c['judge_failed']} | "
                         f"{fmt(c['format_valid'], 1)} | {c['mean_searches']:.2f} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def load_engine(args: EvalArguments, sargs: utils.SearchArguments) -> Engine:
    search = utils.load_retriever(sargs.retriever)
    tok = utils.load_tokenizer(args.model)
    if args.backend == "hf":
        model = utils.load_model(args.model, dtype=args.dtype, device=args.device)
        eos_ids = utils.eos_token_ids(tok, model)
        generate_ids, complete = hf_backend(model, tok, eos_ids)
    elif args.backend == "vllm":
        eos_ids = utils.eos_token_ids(tok)
        generate_ids, complete = vllm_backend(args, tok, eos_ids)
    else:
        eos_ids = utils.eos_token_ids(tok)
        generate_ids, complete = api_backend(args, tok)
    return Engine(tok, generate_ids, complete, search, eos_ids, args, sargs)


def ask(args: EvalArguments, e: Engine) -> None:
    """Print one research trajectory as it happens: generated text, each search, the titles found."""
    tok, s = e.tok, e.sargs
    print(f"model {args.model} · retriever {getattr(e.search, 'description', s.retriever)} · top-k {s.topk}\n")

    def generate(contexts, max_new_tokens):
        outs = e.generate_ids(contexts, max_new_tokens)
        print(tok.decode(outs[0], skip_special_tokens=True), end="", flush=True)
        return outs

    def search(queries, k):
        res = e.search(queries, k)
        print(f"\n  [search] {queries[0]!r}\n" + "".join(f"  [{i + 1}] {title_of(p)}\n" for i, p in enumerate(res[0])),
              end="", flush=True)
        return res

    prompt = utils.encode_prompt(utils.build_prompt(args.question, tok, s.prompt_template), tok)
    r = utils.search_rollout([prompt], generate, search, tok, e.eos_ids, max_completion_length=args.max_completion_length,
                             topk=s.topk, max_searches=s.max_searches, passage_max_words=s.passage_max_words)[0]
    score = utils.compute_reward(utils.reward_text(r, tok), [], r.ended_with_eos)
    print(f"\n\nanswer: {score['prediction']!r} · searches {r.num_searches} · format valid {score['format_ok']} · "
          f"{len(r.completion_ids)} tokens ({r.mask.count(0)} retrieved)")


def main():
    try:
        args, sargs = utils.arg_parser(EvalArguments, utils.SearchArguments).parse_args_and_config()
    except ValueError as e:  # e.g. a key in the --config file that no argument has
        raise utils.ReSearchError(f"bad arguments: {e}") from e
    if args.question is not None:
        ask(args, load_engine(args, sargs))
        return

    # Every dataset is read (and checked) before any model is loaded.
    datasets = []
    for spec in args.datasets:
        src, split, tag = dataset_spec(spec, args.split)
        qs = utils.load_questions(src, split=split, limit=args.limit)
        if not qs:
            raise utils.ReSearchError(f"{spec}: no questions")
        ids = [q["id"] for q in qs]
        if len(set(ids)) != len(ids):
            raise utils.ReSearchError(f"{spec}: question ids are not unique (resume matches predictions by id)")
        path = Path(src)
        label = f"{path.parent.name}/{path.name.split('.')[0]}" if split == "file" else LABELS.get(src, src)
        datasets.append({"spec": spec, "source": src, "split": split, "tag": tag, "questions": qs, "n": len(qs),
                         "label": label})
    out_dir = Path(args.output_dir or Path("runs") / "eval" / Path(args.model.rstrip("/")).name)
    out_dir.mkdir(parents=True, exist_ok=True)

    e = load_engine(args, sargs)
    manifest = getattr(e.search, "manifest", None) or {}
    header = {"model": args.model, "model_fingerprint": model_fingerprint(utils.resolve_model(args.model)),
              "retriever": getattr(e.search, "description", sargs.retriever),
              "corpus": manifest.get("corpus") or manifest.get("corpus_path") or sargs.retriever,
              "topk": sargs.topk, "passage_max_words": sargs.passage_max_words, "backend": args.backend,
              "judge": args.judge_model if args.judge_base_url else None}
    judge = make_judge(args) if args.judge_base_url else None

    cells: dict[str, dict] = {}
    for m in args.methods:
        cells[m] = {}
        for d in datasets:
            cell_dir = out_dir / m / d["tag"]
            cell_dir.mkdir(parents=True, exist_ok=True)
            # What determines this method's predictions; a resumed run must match it exactly.
            settings = {"method": m, "dataset": d["source"], "split": d["split"], "model": args.model,
                        "model_fingerprint": header["model_fingerprint"], "backend": args.backend,
                        "decoding": "greedy", "search": asdict(sargs),
                        **{k: getattr(args, k) for k in METHOD_SETTINGS[m]}}
            pred_path, set_path = cell_dir / "predictions.jsonl", cell_dir / "settings.json"
            if args.overwrite:
                for p in (pred_path, set_path):
                    p.unlink(missing_ok=True)
            if set_path.is_file():
                old = json.loads(set_path.read_text())
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k) and k != "model")
                if diff:
                    raise utils.ReSearchError(f"{cell_dir} holds predictions made with other settings ({', '.join(diff)}); "
                                              "pass --overwrite to replace them, or choose another --output_dir")
            else:
                write_json_atomic(set_path, settings)
            done = read_predictions(pred_path)
            todo = [q for q in d["questions"] if q["id"] not in done]
            print(f"[{m} · {d['tag']}] {d['n']} questions, {d['n'] - len(todo)} already done", file=sys.stderr)
            with open(pred_path, "a", encoding="utf-8") as f:
                for start in range(0, len(todo), args.batch_size):
                    batch = todo[start : start + args.batch_size]
                    t0 = time.perf_counter()
                    outs = RUNNERS[m](batch, e)
                    dt = (time.perf_counter() - t0) / len(batch)
                    recs = []
                    for q, o in zip(batch, outs):
                        p, golds = o["prediction"], q["golden_answers"]
                        recs.append({"id": q["id"], "question": q["question"], "golden_answers": golds,
                                     "prediction": p, "em": utils.exact_match(p, golds), "f1": utils.f1_score(p, golds),
                                     "acc": utils.cover_match(p, golds), "judge": None,
                                     "num_searches": o["num_searches"], "format_ok": o["format_ok"],
                                     "seconds": round(dt, 3), "trajectory": o["trajectory"]})
                    # Append the whole batch, then flush to disk: an interruption loses at most this batch.
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                    f.flush()
                    os.fsync(f.fileno())
                    done.update((r["id"], r) for r in recs)
                    cur = [done[q["id"]]["em"] for q in d["questions"] if q["id"] in done]
                    print(f"  {len(cur)}/{d['n']}  EM so far {100 * sum(cur) / len(cur):.1f}  ({dt:.1f} s/question)",
                          file=sys.stderr)
            records = [done[q["id"]] for q in d["questions"]]
            if judge is not None:  # all of done is rewritten: records beyond --limit stay in the file
                judge_cell(pred_path, records, list(done.values()), judge, args)
            cells[m][d["tag"]] = summarize(records, m)

    ds_info = [{k: d[k] for k in ("spec", "source", "split", "tag", "label", "n")} for d in datasets]
    write_json_atomic(out_dir / "results.json", {"header": header, "search": asdict(sargs), "eval": asdict(args),
                                                  "datasets": ds_info, "cells": cells})
    table = results_markdown(header, cells, args.methods, ds_info)
    tmp = out_dir / "results.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, out_dir / "results.md")
    print(table)
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'} and */*/predictions.jsonl", file=sys.stderr)


if __name__ == "__main__":
    utils.run_main(main)
