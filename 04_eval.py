"""Stage 4: evaluate as the paper did (Table 1, scored by the reference's FlashRAG code). Each method x
dataset: greedy, one sample; EM, F1 and accuracy (a gold answer inside the prediction) with n and 95%
bootstrap CIs; --judge_base_url adds the paper's LLM judge (extras/judge.py: gpt-4o-mini says whether the
prediction means a gold answer; LJ = judged correct / all questions).
  research     the model's own search loop (utils.search_rollout, as in training); the answer read as the
               reference's ReSearchPipeline reads it (utils.eval_prediction)
  naive-gen    closed book          naive-rag   the top-k passages in the system prompt
  iter-retgen  3 rounds; round r > 1 retrieves with "question + previous generation"
  ircot        up to 5 thoughts (each ends at "." or a newline), each the next query, until one says "So the
               answer is:"; every passage found so far in the prompt, by best score, ascending
The baselines use FlashRAG's prompts; their predictions are the raw generations.

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

import hashlib
import importlib
import json
import os
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
    """Default runs/eval/<model name>; an earlier run there is resumed."""
    overwrite: bool = False
    """Replace earlier predictions instead of resuming them."""
    question: str | None = None
    """Ask mode (extras/ask.py): research on this one question, printed live."""
    backend: str = "hf"
    """hf, vllm (GPU), or api (an OpenAI-compatible /v1/completions server)."""
    batch_size: int = 8
    """Questions generated together (api: requests in flight)."""
    dtype: str = "auto"
    """auto: float32 on a CPU (bf16 is ~4x slower there), bfloat16 on a GPU."""
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



def chat_or_plain(system: str, user: str, tok, template: str) -> str:
    """System + user message through the chat template, or FlashRAG's plain "system\\n\\nuser"."""
    if template == "chat" or (template == "auto" and getattr(tok, "chat_template", None)):
        return tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user}"


def references(passages: list[dict], template: str, max_words: int) -> str:
    """FlashRAG's format_reference: the title line as stored (with its quotes), then the text."""
    out = ""
    for i, p in enumerate(passages):
        title, _, text = utils.truncate_words(p["contents"], max_words).partition("\n")
        out += template.format(i=i + 1, title=title, text=text)
    return out


# ---- Back ends: generate_ids (a utils.GenerateFn, for research) and complete(prompts, n, stop) -> texts ----
def load_engine(args: EvalArguments, sargs: utils.SearchArguments) -> SimpleNamespace:
    """What a method needs: tok, generate_ids, complete, search, eos_ids, args, sargs."""
    import transformers
    search, tok = utils.load_retriever(sargs.retriever), utils.load_tokenizer(args.model)
    try:  # the model's own stop ids (Qwen2.5-Instruct has two), for every back end
        eos_ids = utils.eos_token_ids(tok, transformers.GenerationConfig.from_pretrained(args.model))
    except OSError:
        eos_ids = utils.eos_token_ids(tok)
    if args.backend != "hf":
        generate_ids, complete = importlib.import_module(f"extras.{args.backend}_backend").backend(args, tok, eos_ids)
        return SimpleNamespace(tok=tok, generate_ids=generate_ids, complete=complete, search=search,
                               eos_ids=eos_ids, args=args, sargs=sargs)
    model = utils.load_model(args.model, dtype=args.dtype)

    def complete(prompts: list[str], max_new_tokens: int, stop: list[str] | None = None) -> list[str]:
        texts = []
        for row in utils.hf_generate_fn(model, tok, stop=stop)([utils.encode(p, tok) for p in prompts],
                                                              max_new_tokens):
            text = tok.decode(row[: next((i for i, t in enumerate(row) if t in eos_ids), len(row))],
                              skip_special_tokens=True)
            cut = min((text.find(s) + len(s) for s in stop or [] if s in text), default=len(text))
            texts.append(text[:cut])  # up to and with the first stop string, as FlashRAG's generator
        return texts

    return SimpleNamespace(tok=tok, generate_ids=utils.hf_generate_fn(model, tok, fast=sargs.fast_rollout),
                           complete=complete, search=search, eos_ids=eos_ids, args=args, sargs=sargs)


# ---- Methods: a batch of questions -> one record each (prediction, searches, trajectory) ----
def run_research(batch: list[dict], e) -> list[dict]:
    tok, s, seen = e.tok, e.sargs, {}

    def search(queries, k):  # the retriever, remembering what each query returned (for the trajectory)
        res = e.search(queries, k)
        seen.update(zip(queries, res))
        return res

    prompts = [utils.encode(utils.build_prompt(q["question"], tok, s.prompt_template), tok) for q in batch]
    out = []
    for r in utils.search_rollout(prompts, e.generate_ids, search, tok, e.eos_ids, topk=s.topk,
                                  max_completion_length=e.args.max_completion_length, max_searches=s.max_searches,
                                  passage_max_words=s.passage_max_words,
                                  max_new_tokens_per_call=s.max_new_tokens_per_call):
        text = utils.reward_text(r, tok)  # the model's own text, result contents blanked
        out.append({"prediction": utils.eval_prediction(text, r.ended_with_eos) or "", "num_searches": r.num_searches,
                    "format_ok": utils.compute_reward(text, [], r.ended_with_eos)["format_ok"], "trajectory": {
                        "response": text, "ended_with_eos": r.ended_with_eos, "queries": r.queries,
                        "titles": [[utils.passage_title(p["contents"]) for p in seen.get(q, [])] for q in r.queries],
                        "completion_ids": r.completion_ids, "mask_runs": [[m, len(ids)] for ids, m in r.segments()]}})
    return out


def rag_prompt(question: str, passages: list[dict], e) -> str:
    docs = references(passages, "Doc {i}(Title: {title}) {text}\n", e.sargs.passage_max_words)
    return chat_or_plain(NAIVE_RAG_SYSTEM.replace("{reference}", docs), f"Question: {question}", e.tok,
                         e.sargs.prompt_template)


def run_naive_gen(batch: list[dict], e) -> list[dict]:
    prompts = [chat_or_plain(NAIVE_GEN_SYSTEM, f"Question: {q['question']}", e.tok, e.sargs.prompt_template)
               for q in batch]
    return [{"prediction": o, "num_searches": 0, "trajectory": {"generation": o}}
            for o in e.complete(prompts, e.args.max_answer_tokens)]


def run_naive_rag(batch: list[dict], e) -> list[dict]:
    docs = e.search([q["question"] for q in batch], e.sargs.topk)
    outs = e.complete([rag_prompt(q["question"], d, e) for q, d in zip(batch, docs)], e.args.max_answer_tokens)
    return [{"prediction": o, "num_searches": 1, "trajectory": {"generation": o}} for o in outs]


def run_iter_retgen(batch: list[dict], e) -> list[dict]:
    questions, gens, rounds = [q["question"] for q in batch], [""] * len(batch), [[] for _ in batch]
    for r in range(e.args.iter_retgen_rounds):
        # generation-augmented retrieval: later rounds search with "question + previous generation"
        queries = questions if r == 0 else [f"{q} {g}" for q, g in zip(questions, gens)]
        docs = e.search(queries, e.sargs.topk)
        gens = e.complete([rag_prompt(q, d, e) for q, d in zip(questions, docs)], e.args.max_answer_tokens)
        for log, g in zip(rounds, gens):
            log.append(g)
    return [{"prediction": g, "num_searches": e.args.iter_retgen_rounds, "trajectory": {"generations": log}}
            for g, log in zip(gens, rounds)]


def previous(thoughts: list[str]) -> str:
    joined = " ".join(thoughts)  # FlashRAG's previous_gen, appended unless it is "" or " "
    return "" if joined in ("", " ") else joined


def run_ircot(batch: list[dict], e) -> list[dict]:
    """FlashRAG's IRCOTPipeline.run_batch: a passage's score is its best over the searches that found it;
    after the first search, the prompt lists every passage so far by that score, ascending."""
    n, k = len(batch), e.sargs.topk
    scored = getattr(e.search, "scored", None)
    if scored is None:
        raise utils.ReSearchError(f"ircot needs passage scores; {e.sargs.retriever} gives none")
    pools = [{p["id"]: [p, s] for p, s in row} for row in scored([q["question"] for q in batch], k)]
    shown = [[p for p, _ in pool.values()] for pool in pools]  # retrieval order until a thought searches
    thoughts, searches, active = [[] for _ in batch], [1] * n, list(range(n))
    for _ in range(e.args.ircot_max_rounds):
        if not active:
            break
        prompts = [f"{IRCOT_INSTRUCTION}\n\n{IRCOT_EXAMPLE}\n\n"
                   + references(shown[i], "Wikipedia Title: {title}\n{text}\n\n", e.sargs.passage_max_words)
                   + f"Question: {batch[i]['question']}\nThought:" + previous(thoughts[i]) for i in active]
        for i, t in zip(active, e.complete(prompts, e.args.ircot_thought_tokens, [".", "\n"])):
            thoughts[i].append(t)
        active = [i for i in active if IRCOT_ANSWER not in thoughts[i][-1]]
        for i, row in zip(active, scored([thoughts[i][-1] for i in active], k) if active else []):
            for p, s in row:  # keep each passage's best score
                pools[i][p["id"]] = [p, max(s, pools[i].get(p["id"], [p, s])[1])]
            shown[i] = [p for p, _ in sorted(pools[i].values(), key=lambda ps: ps[1])]
            searches[i] += 1
    preds = [" ".join(t) for t in thoughts]  # FlashRAG's ircot_pred_parse:
    return [{"prediction": p.split(IRCOT_ANSWER)[1].strip() if IRCOT_ANSWER in p else p, "num_searches": count,
             "trajectory": {"thoughts": t}} for p, count, t in zip(preds, searches, thoughts)]


RUNNERS = {"research": run_research, "naive-gen": run_naive_gen, "naive-rag": run_naive_rag,
           "iter-retgen": run_iter_retgen, "ircot": run_ircot}
METHOD_SETTINGS = {"research": ["max_completion_length"], "naive-gen": ["max_answer_tokens"],  # what a method reads
                   "naive-rag": ["max_answer_tokens"], "iter-retgen": ["max_answer_tokens", "iter_retgen_rounds"],
                   "ircot": ["ircot_max_rounds", "ircot_thought_tokens"]}


# ---- Results with error bars ----
def model_fingerprint(path: str) -> str:
    """Weight files' sizes and first MiB: a resumed run never mixes two checkpoints."""
    h, files = hashlib.sha256(), sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    for f in files:
        with open(f, "rb") as fh:
            h.update(f"{f.name}:{f.stat().st_size}".encode() + fh.read(1 << 20))
    return h.hexdigest()[:16] if files else path


def cover_match(prediction: str, golds) -> float:
    """FlashRAG's "acc": some normalised gold answer is contained in the normalised prediction."""
    p = utils.normalize_answer(prediction)
    return float(any(utils.normalize_answer(g) and utils.normalize_answer(g) in p for g in golds))


def bootstrap_ci(values, baseline=None, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """[mean, low, high] x 100: the mean of values (or of values - baseline, paired by question) and its 95%
    percentile bootstrap interval over questions; seeded, so every table is reproducible."""
    import numpy as np
    x = np.asarray(values, dtype=float) - (0.0 if baseline is None else np.asarray(baseline, dtype=float))
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n_boot)]
    return [100 * float(v) for v in (x.mean(), *np.percentile(means, [2.5, 97.5]))]


def scores(rec: dict) -> dict:
    """EM, F1, acc and, once judged, LJ (a failed judgement counts as wrong)."""
    judged = {"lj": float(rec["judge"]["judgement"] == "correct")} if rec.get("judge") else {}
    return {"em": rec["em"], "f1": rec["f1"], "acc": rec["acc"], **judged}


def summarize(records: list[dict], method: str) -> dict:
    n, per = len(records), [scores(r) for r in records]
    cell = {"n": n, "mean_searches": sum(r["num_searches"] for r in records) / n,
            "seconds": sum(r.get("seconds", 0.0) for r in records),
            "format_valid": 100 * sum(bool(r.get("format_ok")) for r in records) / n if method == "research" else None,
            "judge_failed": sum(r["judge"]["status"] == "failed" for r in records) if "lj" in per[0] else None,
            "lj": None}
    for key in [k for k in ("em", "f1", "acc", "lj") if all(k in s for s in per)]:  # LJ: every item judged
        cell[f"{key}_ci"] = bootstrap_ci([s[key] for s in per])
        cell[key] = cell[f"{key}_ci"][0]
    return cell


def ci(c: dict, key: str) -> str:
    return f"{c[key]:.1f} [{c[key + '_ci'][1]:.1f}, {c[key + '_ci'][2]:.1f}]" if c.get(key) is not None else "-"


def results_markdown(header: dict, cells: dict, sargs: utils.SearchArguments) -> str:
    lines = [f"**Model** `{header['model']}` · **retriever** {header['retriever']} · **corpus** {header['corpus']}"
             f" · **top-k** {sargs.topk} · **passage words** {sargs.passage_max_words or 'all'} · **backend** "
             f"{header['backend']} · **judge** {header['judge'] or 'none'}", "",
             "Scores in %, 95% bootstrap CIs over questions. LJ: judged correct / all (failed judgements: wrong).", "",
             "| method | dataset | n | EM | F1 | Acc | LJ | judge failed | format valid | searches/q | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, by_tag in cells.items():
        for tag, c in by_tag.items():
            fv = "-" if c["format_valid"] is None else f"{c['format_valid']:.1f}"
            lines.append(f"| {ROW_NAMES[m]} | {tag} | {c['n']} | {ci(c, 'em')} | {ci(c, 'f1')} | {ci(c, 'acc')} | "
                         f"{ci(c, 'lj')} | {'-' if c['judge_failed'] is None else c['judge_failed']} | {fv} | "
                         f"{c['mean_searches']:.2f} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def load_datasets(args: EvalArguments) -> list[dict]:
    """Every dataset, checked before any model loads."""
    datasets = []
    for spec in args.datasets:
        name, _, split = spec.partition(":")
        hub = not Path(spec).exists() and name in utils.HUB_NAMES
        src, split = (name, split or args.split) if hub else (spec, "file")
        qs = utils.load_questions(src, split=split, limit=args.limit)
        if not qs or len({q["id"] for q in qs}) != len(qs):
            raise utils.ReSearchError(f"{spec}: no questions, or ids not unique (resume matches by id)")
        tag = f"{name}_{split}" if hub else f"{Path(src).parent.name}_{Path(src).name.split('.')[0]}".lstrip("_")
        datasets.append({"spec": spec, "source": src, "split": split, "tag": tag, "questions": qs, "n": len(qs)})
    return datasets


def evaluate_cell(m: str, d: dict, e, header: dict, cell_dir: Path) -> list[dict]:
    """One method x dataset: what an earlier run finished is kept, the rest run batch by batch."""
    args, settings = e.args, {"method": m, "dataset": d["source"], "split": d["split"], **header,
                              "search": asdict(e.sargs), **{k: getattr(e.args, k) for k in METHOD_SETTINGS[m]}}
    pred_path, set_path, done = cell_dir / "predictions.jsonl", cell_dir / "settings.json", {}
    cell_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        pred_path.unlink(missing_ok=True)
    if pred_path.is_file():  # an earlier run: resumed, if it made its predictions the same way
        done = importlib.import_module("extras.resume").read_predictions(
            pred_path, set_path if set_path.is_file() else None, settings)
    set_path.write_text(json.dumps(settings, indent=2) + "\n")
    todo = [q for q in d["questions"] if q["id"] not in done]
    print(f"[{m} · {d['tag']}] {d['n']} questions, {d['n'] - len(todo)} already done", file=sys.stderr)
    with open(pred_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            batch, t0 = todo[start: start + args.batch_size], time.perf_counter()
            outs, dt = RUNNERS[m](batch, e), (time.perf_counter() - t0) / len(batch)
            recs = [{"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "judge": None,
                     "em": utils.exact_match(o["prediction"], q["golden_answers"]),
                     "f1": utils.f1_score(o["prediction"], q["golden_answers"]),
                     "acc": cover_match(o["prediction"], q["golden_answers"]), **o, "seconds": round(dt, 3)}
                    for q, o in zip(batch, outs)]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            f.flush()  # then to disk: a kill loses at most this batch
            os.fsync(f.fileno())
            done.update((r["id"], r) for r in recs)
            em = [done[q["id"]]["em"] for q in d["questions"] if q["id"] in done]
            print(f"  {len(em)}/{d['n']}  EM so far {100 * sum(em) / len(em):.1f}  ({dt:.1f} s/question)",
                  file=sys.stderr)
    records = [done[q["id"]] for q in d["questions"]]
    if args.judge_base_url:  # extras/judge.py: the paper's judge prompt to gpt-4o-mini, on the records not judged
        judge = importlib.import_module("extras.judge")
        judge.judge_cell(records, judge.make_judge(args), args, pred_path, list(done.values()))
    return records


def main():
    args, sargs = utils.parse_args(EvalArguments, utils.SearchArguments)
    if args.question is not None:
        return importlib.import_module("extras.ask").ask(args, load_engine(args, sargs))
    datasets = load_datasets(args)
    out_dir = Path(args.output_dir or Path("runs") / "eval" / Path(args.model.rstrip("/")).name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise utils.ReSearchError(f"--output_dir {out_dir}: cannot create it ({e})") from e
    if args.backend != "hf":  # a research prompt the engine cannot hold with its budget: refused before it starts
        importlib.import_module(f"extras.{args.backend}_backend").check_prompts(args, sargs, datasets)
    e = load_engine(args, sargs)
    header = {"model": args.model, "model_fingerprint": model_fingerprint(args.model), "backend": args.backend,
              "retriever": getattr(e.search, "description", sargs.retriever), "decoding": "greedy",
              "corpus": (getattr(e.search, "manifest", None) or {}).get("corpus") or sargs.retriever}
    cells = {m: {d["tag"]: summarize(evaluate_cell(m, d, e, header, out_dir / m / d["tag"]), m) for d in datasets}
             for m in METHODS if m in args.methods}
    info = [{k: d[k] for k in ("spec", "source", "split", "tag", "n")} for d in datasets]
    table = results_markdown({**header, "judge": args.judge_model if args.judge_base_url else None}, cells, sargs)
    for name, text in (("results.json", json.dumps({"header": header, "search": asdict(sargs), "eval": asdict(args),
                                                     "datasets": info, "cells": cells}, indent=2)),
                       ("results.md", table)):
        (out_dir / f"{name}.tmp").write_text(text, encoding="utf-8")
        os.replace(out_dir / f"{name}.tmp", out_dir / name)
    print(table)
    print(f"wrote {out_dir}/results.md, results.json, */*/predictions.jsonl", file=sys.stderr)


if __name__ == "__main__":
    utils.run_main(main)
