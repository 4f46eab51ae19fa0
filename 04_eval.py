"""Stage 4: evaluate as the paper did (Table 1, scored by the reference's FlashRAG code). Each method x
dataset: greedy, one sample; EM, F1 and accuracy (a gold answer inside the prediction) with n and 95%
bootstrap CIs; --judge_base_url adds the paper's LLM judge (extras/judge.py: gpt-4o-mini says whether the
prediction means a gold answer; LJ = judged correct / all questions).
  research     the model's own search loop (utils.search_rollout, as in training); the answer read as the
               reference's ReSearchPipeline reads it (eval_prediction)
  naive-gen    closed book          naive-rag   the top-k passages in the system prompt
  iter-retgen  3 rounds; round r > 1 retrieves with "question + previous generation"
  ircot        up to 5 thoughts (each ends at "." or a newline), each the next query, until one says "So the
               answer is:"; every passage found so far in the prompt, by best score, ascending
The baselines use FlashRAG's prompts (the chat template when the model's path names "chat" or "instruct",
as FlashRAG's PromptTemplate; IRCoT always plain); their predictions are the raw generations.

Writes <output_dir>/<method>/<dataset>/predictions.jsonl (with trajectories; appended per batch: a killed
run resumes) and settings.json; results.json and results.md. Before vs after, paired by question:
python extras/compare.py BEFORE_DIR AFTER_DIR

CPU, bundled model, mini-Wikipedia (as in Table 1, the baselines run the untrained model):
  python 04_eval.py --config configs/eval_cpu.yaml --model models/SmolLM2-135M-Instruct --output_dir runs/eval/before
  python 04_eval.py --config configs/eval_cpu.yaml --model runs/grpo --methods research --output_dir runs/eval/after
  python 04_eval.py --config configs/eval_cpu.yaml --model runs/grpo --question "Who directed Ed Wood?"
One GPU, the paper's setting (wiki-18, full dev sets, vLLM, the judge; OPENAI_API_KEY set):
  python 04_eval.py --config configs/eval_full.yaml --model runs/grpo_a100 --output_dir runs/eval/full
Other back ends (extras/): --backend vllm; --backend api --api_base_url URL (SGLang, as the paper).
"""

import importlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import utils

METHODS = ("naive-gen", "naive-rag", "iter-retgen", "ircot", "research")  # the paper's rows, in order
ROW_NAMES = dict(zip(METHODS, ("Naive Generation", "Naive RAG", "Iter-RetGen", "IRCoT", "ReSearch")))


@dataclass
class EvalArguments:
    model: str = utils.DEFAULT_MODEL
    """A checkpoint (e.g. runs/grpo) or a hub id (--backend api: the served model's name)."""
    datasets: list[str] = field(default_factory=lambda: ["data/mini/hotpotqa_dev.jsonl"])
    """FlashRAG jsonl paths, or hub names: hotpotqa 2wikimultihopqa musique bamboogle (NAME:SPLIT)."""
    split: str = "dev"
    """Hub split (the paper: dev; Bamboogle: test)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """naive-gen naive-rag iter-retgen ircot research."""
    limit: int | None = None
    """The first N questions of each dataset (file order)."""
    output_dir: str | None = None
    """Default runs/eval/<model name> (-vllm / -api with those back ends); an earlier run there is resumed."""
    overwrite: bool = False
    """Replace earlier predictions instead of resuming them."""
    question: str | None = None
    """Ask mode (extras/ask.py): research on this one question, printed live."""
    backend: str = "hf"
    """hf, vllm (GPU), or api (an OpenAI-compatible /v1/completions server)."""
    batch_size: int = 8
    """Questions generated together (api: requests in flight)."""
    dtype: str = "auto"
    """auto: bfloat16 where it is native (a GPU, a CPU with AMX or AVX-512 BF16), else float32."""
    max_completion_length: int = 8192
    """research: a response's token budget, result blocks included (paper 8192; CPU 512)."""
    max_answer_tokens: int = 32
    """Baselines: new tokens per answer (FlashRAG's default; the reference allowed 8192)."""
    iter_retgen_rounds: int = 3
    """Iter-RetGen: retrieval-generation rounds."""
    ircot_max_rounds: int = 5
    """IRCoT: most thoughts per question."""
    ircot_thought_tokens: int = 64
    """IRCoT: new tokens per thought at most (it ends at "." or a newline)."""
    api_base_url: str = "http://127.0.0.1:30000/v1"
    """--backend api: the server (SGLang's default port); key: $OPENAI_API_KEY."""
    judge_base_url: str | None = None
    """LLM judge endpoint (OpenAI-compatible; key $OPENAI_API_KEY), e.g. https://api.openai.com/v1."""
    judge_model: str = "gpt-4o-mini"
    """Judge model (the paper's: gpt-4o-mini)."""
    judge_retries: int = 5
    """Attempts per item (the reference: 5), backing off exponentially."""
    judge_backoff: float = 1.0
    """Seconds before the first retry."""
    judge_max_tokens: int = 1024
    """Longest judge reply (the reference: 1024)."""

    def __post_init__(self):
        self.methods = [m for spec in self.methods for m in spec.split(",") if m]
        if not self.methods or set(self.methods) - set(METHODS) or self.backend not in ("hf", "vllm", "api"):
            raise utils.ReSearchError(f"--methods {self.methods} --backend {self.backend}: the methods are "
                                      f"{' '.join(METHODS)}, the back ends hf vllm api")
        if self.question is not None and not self.question.strip():
            raise utils.ReSearchError("--question is empty: ask a question, or leave the flag out")
        for name in ("limit", "batch_size", "max_completion_length", "max_answer_tokens", "iter_retgen_rounds",
                     "ircot_max_rounds", "ircot_thought_tokens", "judge_retries", "judge_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise utils.ReSearchError(f"--{name} must be >= 1, got {getattr(self, name)}")


# ---- The baselines' prompts: FlashRAG's, exact ----
NAIVE_GEN_SYSTEM = ("Answer the question based on your own knowledge. Only give me the answer and do not "
                    "output any other words.")
# FlashRAG's PromptTemplate.base_system_prompt, its missing space after "document." included.
NAIVE_RAG_SYSTEM = ("Answer the question based on the given document.Only give me the answer and do not "
                    "output any other words.\nThe following are given documents.\n\n{reference}")
IRCOT_INSTRUCTION = (
    "You serve as an intelligent assistant, adept at facilitating users through complex, multi-hop reasoning "
    "across multiple documents. This task is illustrated through demonstrations, each consisting of a document "
    "set paired with a relevant question and its multi-hop reasoning thoughts. Your task is to generate one "
    "thought for current step, DON'T generate the whole thoughts at once! If you reach what you believe to be "
    "the final step, start with \"So the answer is:\".")
# FlashRAG's one-shot demonstration (five passages, a question, its thought), exact; kept as data.
IRCOT_EXAMPLE = (utils.REPO_ROOT / "data" / "prompts" / "ircot_demonstration.txt").read_text(encoding="utf-8")
IRCOT_ANSWER = "So the answer is:"


def chat_or_plain(system: str, user: str, e) -> str:
    """FlashRAG's PromptTemplate.get_string: system + user message through the chat template when the model's
    path, lowercased, holds "chat" or "instruct" (--prompt_template chat / base decides instead), else the
    plain "system\\n\\nuser". A tokenizer without a chat template gets the plain form (upstream's fallback)."""
    template = e.sargs.prompt_template
    name = e.args.model.lower()
    chat = template == "chat" or (template == "auto" and ("chat" in name or "instruct" in name))
    if not chat or not getattr(e.tok, "chat_template", None):
        return f"{system}\n\n{user}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return e.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def references(passages: list[dict], template: str, max_words: int) -> str:
    """FlashRAG's format_reference: the title line as stored (with its quotes), then the text."""
    out = ""
    for i, p in enumerate(passages):
        title, _, text = utils.truncate_words(p["contents"], max_words).partition("\n")
        out += template.format(i=i + 1, title=title, text=text)
    return out


# ---- Back ends: generate_ids (a utils.GenerateFn, for research) and complete(prompts, n, stop) -> texts ----
def load_engine(args: EvalArguments, sargs: utils.SearchArguments) -> SimpleNamespace:
    """What a method needs: tok, generate_ids, complete, search, eos_ids, args, sargs (and dtype, close)."""
    import transformers
    search = utils.load_retriever(sargs.retriever)
    tok = utils.load_tokenizer(args.model)
    try:  # the model's own stop ids (Qwen2.5-Instruct has two), for every back end
        eos_ids = utils.eos_token_ids(tok, transformers.GenerationConfig.from_pretrained(args.model))
    except OSError:
        eos_ids = utils.eos_token_ids(tok)
    precision = importlib.import_module("extras.precision")  # auto: bfloat16 where native, else float32
    engine = SimpleNamespace(tok=tok, search=search, eos_ids=eos_ids, args=args, sargs=sargs)
    engine.dtype = precision.choose_dtype(args.dtype)
    why = precision.native_bf16()[1]
    if args.backend == "api":  # the server computes: this machine's CPU says nothing about it
        engine.dtype = "the server's"
        why = "set where the server starts, e.g. vLLM's --dtype"
    print(f"precision: {engine.dtype} ({why})", file=sys.stderr)
    if args.backend != "hf":  # extras/vllm_backend.py, extras/api_backend.py
        backend = importlib.import_module(f"extras.{args.backend}_backend")
        engine.generate_ids, engine.complete = backend.backend(args, tok, eos_ids)
        return engine
    model = utils.load_model(args.model, dtype=engine.dtype)

    def complete(prompts: list[str], max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
        generate = utils.hf_generate_fn(model, tok, stop=stop)
        new_ids, _ = generate([utils.encode(p, tok) for p in prompts], max_new_tokens)
        texts = []
        for row in new_ids:
            end = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
            text = tok.decode(row[:end], skip_special_tokens=True)
            # up to and with the first stop string, as FlashRAG's generator returns it
            cut = min((text.find(s) + len(s) for s in stop or [] if s in text), default=len(text))
            texts.append(text[:cut])
        return texts

    engine.generate_ids = utils.hf_generate_fn(model, tok, fast=sargs.fast_rollout)
    engine.complete = complete
    return engine


# ---- Methods: a batch of questions -> one record each (prediction, searches, trajectory) ----
def eval_prediction(text: str, ended_with_eos: bool) -> str | None:
    """None if the response ran out of budget; else the FIRST <answer>...</answer> (unclosed: None), then its
    last "\\boxed", as last_boxed_only_string + remove_boxed read it: "\\boxed x" up to the next "$", or
    "\\boxed{...}" brace-matched, unstripped. The format is not checked."""
    if not ended_with_eos:
        return None
    match = re.search(r"<answer>(.*?)</answer>", text.strip(), re.DOTALL)
    if match is None:
        return None
    block = match.group(1)
    if "\\boxed " in block:
        return block.split("\\boxed ")[-1].split("$")[0]
    start = block.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    for j in range(start, len(block)):
        depth += {"{": 1, "}": -1}.get(block[j], 0)
        if block[j] == "}" and depth == 0:
            boxed = block[start : j + 1]
            if not boxed.startswith("\\boxed{"):
                return None
            return boxed[len("\\boxed{") : -1]
    return None


def run_research(batch: list[dict], e) -> list[dict]:
    tok = e.tok
    sargs = e.sargs
    seen = {}  # what each query returned, for the trajectory

    def search(queries, k):
        results = e.search(queries, k)
        seen.update(zip(queries, results))
        return results

    prompts = [utils.encode(utils.build_prompt(q["question"], tok, sargs.prompt_template), tok) for q in batch]
    rollouts = utils.search_rollout(prompts, e.generate_ids, search, tok, e.eos_ids, topk=sargs.topk,
                                    max_completion_length=e.args.max_completion_length,
                                    max_searches=sargs.max_searches, passage_max_words=sargs.passage_max_words,
                                    max_new_tokens_per_call=sargs.max_new_tokens_per_call)
    records = []
    for rollout in rollouts:
        text = utils.reward_text(rollout, tok)  # the model's own text, result contents blanked
        titles = [[utils.passage_title(p["contents"]) for p in seen.get(q, [])] for q in rollout.queries]
        trajectory = {"response": text, "ended_with_eos": rollout.ended_with_eos, "queries": rollout.queries,
                      "titles": titles, "completion_ids": rollout.completion_ids,
                      "mask_runs": [[mask, len(ids)] for ids, mask in rollout.segments()]}
        records.append({"prediction": eval_prediction(text, rollout.ended_with_eos) or "",
                        "num_searches": rollout.num_searches,
                        "format_ok": utils.compute_reward(text, [], rollout.ended_with_eos)["format_ok"],
                        "trajectory": trajectory})
    return records


def rag_prompt(question: str, passages: list[dict], e) -> str:
    docs = references(passages, "Doc {i}(Title: {title}) {text}\n", e.sargs.passage_max_words)
    return chat_or_plain(NAIVE_RAG_SYSTEM.replace("{reference}", docs), f"Question: {question}", e)


def run_naive_gen(batch: list[dict], e) -> list[dict]:
    prompts = [chat_or_plain(NAIVE_GEN_SYSTEM, f"Question: {q['question']}", e) for q in batch]
    outs = e.complete(prompts, e.args.max_answer_tokens)
    return [{"prediction": out, "num_searches": 0, "trajectory": {"generation": out}} for out in outs]


def run_naive_rag(batch: list[dict], e) -> list[dict]:
    docs = e.search([q["question"] for q in batch], e.sargs.topk)
    outs = e.complete([rag_prompt(q["question"], d, e) for q, d in zip(batch, docs)], e.args.max_answer_tokens)
    return [{"prediction": out, "num_searches": 1, "trajectory": {"generation": out}} for out in outs]


def run_iter_retgen(batch: list[dict], e) -> list[dict]:
    questions = [q["question"] for q in batch]
    queries = questions
    rounds = [[] for _ in batch]  # each question's generations
    for _ in range(e.args.iter_retgen_rounds):
        docs = e.search(queries, e.sargs.topk)
        gens = e.complete([rag_prompt(q, d, e) for q, d in zip(questions, docs)], e.args.max_answer_tokens)
        for log, gen in zip(rounds, gens):
            log.append(gen)
        # generation-augmented retrieval: the next round searches with "question + this generation"
        queries = [f"{q} {gen}" for q, gen in zip(questions, gens)]
    return [{"prediction": log[-1], "num_searches": e.args.iter_retgen_rounds, "trajectory": {"generations": log}}
            for log in rounds]


def previous(thoughts: list[str]) -> str:
    joined = " ".join(thoughts)  # FlashRAG's previous_gen, appended unless it is "" or " "
    return "" if joined in ("", " ") else joined


def run_ircot(batch: list[dict], e) -> list[dict]:
    """FlashRAG's IRCOTPipeline.run_batch: a passage's score is its best over the searches that found it;
    after the first search, the prompt lists every passage so far by that score, ascending."""
    k = e.sargs.topk
    scored = getattr(e.search, "scored", None)
    if scored is None:
        raise utils.ReSearchError(f"ircot needs passage scores; {e.sargs.retriever} gives none")
    found = scored([q["question"] for q in batch], k)
    best = [{p["id"]: (p, score) for p, score in row} for row in found]  # passage id -> (passage, best score)
    shown = [[p for p, _ in row] for row in found]  # retrieval order until a thought searches
    thoughts = [[] for _ in batch]
    searches = [1] * len(batch)
    active = list(range(len(batch)))
    for _ in range(e.args.ircot_max_rounds):
        if not active:
            break
        prompts = []
        for i in active:  # FlashRAG's plain IRCoT prompt (enable_chat=False)
            docs = references(shown[i], "Wikipedia Title: {title}\n{text}\n\n", e.sargs.passage_max_words)
            prompts.append(f"{IRCOT_INSTRUCTION}\n\n{IRCOT_EXAMPLE}\n\n{docs}Question: {batch[i]['question']}\n"
                           f"Thought:{previous(thoughts[i])}")
        for i, thought in zip(active, e.complete(prompts, e.args.ircot_thought_tokens, [".", "\n"])):
            thoughts[i].append(thought)
        active = [i for i in active if IRCOT_ANSWER not in thoughts[i][-1]]
        if not active:
            break
        for i, row in zip(active, scored([thoughts[i][-1] for i in active], k)):
            for p, score in row:
                old_score = best[i].get(p["id"], (p, score))[1]
                best[i][p["id"]] = (p, max(score, old_score))
            shown[i] = [p for p, _ in sorted(best[i].values(), key=lambda pair: pair[1])]
            searches[i] += 1
    records = []
    for count, steps in zip(searches, thoughts):
        prediction = " ".join(steps)  # FlashRAG's ircot_pred_parse
        if IRCOT_ANSWER in prediction:
            prediction = prediction.split(IRCOT_ANSWER)[1].strip()
        records.append({"prediction": prediction, "num_searches": count, "trajectory": {"thoughts": steps}})
    return records


RUNNERS = {"research": run_research, "naive-gen": run_naive_gen, "naive-rag": run_naive_rag,
           "iter-retgen": run_iter_retgen, "ircot": run_ircot}
METHOD_SETTINGS = {"research": ["max_completion_length"], "naive-gen": ["max_answer_tokens"],  # what a method reads
                   "naive-rag": ["max_answer_tokens"], "iter-retgen": ["max_answer_tokens", "iter_retgen_rounds"],
                   "ircot": ["ircot_max_rounds", "ircot_thought_tokens"]}


# ---- Scores ----
def cover_match(prediction: str, golds) -> float:
    """FlashRAG's "acc": some normalised gold answer is contained in the normalised prediction."""
    normalized = utils.normalize_answer(prediction)
    return float(any(utils.normalize_answer(g) and utils.normalize_answer(g) in normalized for g in golds))


def load_datasets(args: EvalArguments) -> list[dict]:
    """Every dataset, checked before any model loads."""
    datasets = []
    for spec in args.datasets:
        name, _, split = spec.partition(":")
        if not Path(spec).exists() and name in utils.HUB_NAMES:  # a hub dataset, NAME or NAME:SPLIT
            source = name
            split = split or args.split
            tag = f"{name}_{split}"
        else:
            source = spec
            split = "file"
            tag = f"{Path(spec).parent.name}_{Path(spec).name.split('.')[0]}".lstrip("_")
        questions = utils.load_questions(source, split=split, limit=args.limit)
        if not questions or len({q["id"] for q in questions}) != len(questions):
            raise utils.ReSearchError(f"{spec}: no questions, or ids not unique (resume matches by id)")
        datasets.append({"spec": spec, "source": source, "split": split, "tag": tag, "questions": questions,
                         "n": len(questions)})
    return datasets


def evaluate_cell(method: str, dataset: dict, e, header: dict, cell_dir: Path) -> list[dict]:
    """One method x dataset: what an earlier run finished is kept, the rest run batch by batch."""
    args = e.args
    settings = {"method": method, "dataset": dataset["source"], "split": dataset["split"], **header,
                "search": asdict(e.sargs), **{key: getattr(args, key) for key in METHOD_SETTINGS[method]}}
    pred_path = cell_dir / "predictions.jsonl"
    settings_path = cell_dir / "settings.json"
    done = {}
    cell_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        pred_path.unlink(missing_ok=True)
    if pred_path.is_file():  # an earlier run: resumed, if it made its predictions the same way
        done = importlib.import_module("extras.resume").read_predictions(
            pred_path, settings_path if settings_path.is_file() else None, settings)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    todo = [q for q in dataset["questions"] if q["id"] not in done]
    n = dataset["n"]
    print(f"[{method} · {dataset['tag']}] {n} questions, {n - len(todo)} already done", file=sys.stderr)
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start: start + args.batch_size]
            t0 = time.perf_counter()
            outs = RUNNERS[method](batch, e)
            seconds = (time.perf_counter() - t0) / len(batch)
            for question, out in zip(batch, outs):
                golds = question["golden_answers"]
                record = {"id": question["id"], "question": question["question"], "golden_answers": golds,
                          "judge": None, "em": utils.exact_match(out["prediction"], golds),
                          "f1": utils.f1_score(out["prediction"], golds), "acc": cover_match(out["prediction"], golds),
                          **out, "seconds": round(seconds, 3)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[question["id"]] = record
            f.flush()  # then to disk: a kill loses at most this batch
            os.fsync(f.fileno())
            em = [done[q["id"]]["em"] for q in dataset["questions"] if q["id"] in done]
            print(f"  {len(em)}/{n}  EM so far {100 * sum(em) / len(em):.1f}  ({seconds:.1f} s/question)",
                  file=sys.stderr)
    records = [done[q["id"]] for q in dataset["questions"]]
    if args.judge_base_url:  # extras/judge.py: the paper's judge prompt to gpt-4o-mini, on the records not judged
        judge = importlib.import_module("extras.judge")
        judge.judge_cell(records, judge.make_judge(args), args, pred_path, list(done.values()))
    return records


def main():
    args, sargs = utils.parse_args(EvalArguments, utils.SearchArguments)
    if args.question is not None:
        return importlib.import_module("extras.ask").ask(args, load_engine(args, sargs), run_research)
    datasets = load_datasets(args)
    out_dir = Path("runs") / "eval" / Path(args.model.rstrip("/")).name
    if args.backend != "hf":  # beside the hf run of the same model, not resuming it
        out_dir = out_dir.with_name(f"{out_dir.name}-{args.backend}")
    out_dir = Path(args.output_dir or out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise utils.ReSearchError(f"--output_dir {out_dir}: cannot create it ({e})") from e
    if args.backend != "hf":  # a research prompt the engine cannot hold with its budget: refused before it starts
        importlib.import_module(f"extras.{args.backend}_backend").check_prompts(args, sargs, datasets)
    engine = load_engine(args, sargs)
    resume = importlib.import_module("extras.resume")
    results_table = importlib.import_module("extras.results_table")  # EM / F1 / acc / LJ with 95% CIs
    header = {"model": args.model, "model_fingerprint": resume.model_fingerprint(args.model),
              "backend": args.backend, "dtype": engine.dtype, "decoding": "greedy",
              "retriever": getattr(engine.search, "description", sargs.retriever),
              "corpus": (getattr(engine.search, "manifest", None) or {}).get("corpus") or sargs.retriever}
    cells = {}
    for method in [m for m in METHODS if m in args.methods]:
        cells[method] = {}
        for dataset in datasets:
            records = evaluate_cell(method, dataset, engine, header, out_dir / method / dataset["tag"])
            cells[method][dataset["tag"]] = results_table.summarize(records, method)
    info = [{key: d[key] for key in ("spec", "source", "split", "tag", "n")} for d in datasets]
    judge = args.judge_model if args.judge_base_url else None
    table = results_table.markdown({**header, "judge": judge}, cells, sargs, ROW_NAMES)
    results = {"header": header, "search": asdict(sargs), "eval": asdict(args), "datasets": info, "cells": cells}
    resume.write_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    resume.write_atomic(out_dir / "results.md", table)
    print(table)
    print(f"wrote {out_dir}/results.md, results.json, */*/predictions.jsonl", file=sys.stderr)


if __name__ == "__main__":
    utils.run_main(main)
