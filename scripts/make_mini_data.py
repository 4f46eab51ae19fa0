#!/usr/bin/env python3
"""Build the bundled offline data (data/mini/, data/dev/) from the public files in shared/data.

Standard library only. Deterministic: every output follows the fixed source order below, with no
randomness. Re-running it gives byte-identical files.

    python scripts/make_mini_data.py [--shared DIR] [--out DIR] [--dev-out DIR]

Outputs (see data/README.md for the provenance and licenses):
  <out>/corpus.jsonl          wiki-18 style passages {"id", "contents": '"Title"\\ntext'}
  <out>/train.jsonl           HotpotQA train 100 + MuSiQue train 100 (FlashRAG format)
  <out>/hotpotqa_dev.jsonl    the first 500 HotpotQA dev (distractor) questions, golds in corpus
  <out>/bamboogle_test.jsonl  Bamboogle 125
  <dev-out>/{hotpotqa_dev,2wikimultihopqa_dev,musique_dev,bamboogle_test}.jsonl
                              full question/answer lists, meant for a full wiki-18 index
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = (REPO_ROOT / ".." / "shared" / "data").resolve()

# Input files, relative to --shared.
F_POOLED = "hotpotqa/xinowo_cs6120/pooled_corpus_validation_500_title_text.jsonl"
F_DEV500 = "hotpotqa/xinowo_cs6120/dev500_gold_titles.csv"
F_HP_TRAIN = "hotpotqa/hipporag/hotpotqa_train.json"
F_HP_TRAIN_CORPUS = "hotpotqa/hipporag/hotpotqa_train_corpus.json"
F_MQ_TRAIN = "musique/hipporag/musique_train.json"
F_MQ_TRAIN_CORPUS = "musique/hipporag/musique_train_corpus.json"
F_2W_CORPUS = "2wikimultihopqa/hipporag/2wikimultihopqa_corpus.json"
F_FR_SAMPLE = "flashrag/sample_data.jsonl"
F_SR1_CORPUS = "flashrag/search_r1/corpus.jsonl"
F_KILT = "wiki_passages/r1_searcher_kilt/filtered_kilt_sample_100.jsonl"
F_BAMBOOGLE = "bamboogle/flashrag_format_test.jsonl"
F_QA_HOTPOT = "qa_only/agentic_rag/hotpotqa_test_questions_and_answers.json"
F_QA_2WIKI = "qa_only/agentic_rag/2wikimultihop_test_questions_and_answers.json"
F_QA_MUSIQUE = "qa_only/agentic_rag/musique_test_questions_and_answers.json"
F_QA_BAMBOOGLE = "bamboogle/agentic_rag_bamboogle_test_questions_and_answers.json"

ALL_INPUTS = [
    F_POOLED, F_DEV500, F_HP_TRAIN, F_HP_TRAIN_CORPUS, F_MQ_TRAIN, F_MQ_TRAIN_CORPUS,
    F_2W_CORPUS, F_FR_SAMPLE, F_SR1_CORPUS, F_KILT, F_BAMBOOGLE,
    F_QA_HOTPOT, F_QA_2WIKI, F_QA_MUSIQUE, F_QA_BAMBOOGLE,
]

AGENTIC_RAG = "chenyiqun/Agentic-RAG@a6694e2e"  # full commit in data/README.md
DEV_LISTS = [
    # (output name, input file, dataset, id prefix, source string)
    ("hotpotqa_dev.jsonl", F_QA_HOTPOT, "hotpotqa", "dev",
     AGENTIC_RAG + ":data/hotpot_qa/hotpotqa_test_questions_and_answers.json"),
    ("2wikimultihopqa_dev.jsonl", F_QA_2WIKI, "2wikimultihopqa", "dev",
     AGENTIC_RAG + ":data/2wikimultihop_qa/2wikimultihop_test_questions_and_answers.json"),
    ("musique_dev.jsonl", F_QA_MUSIQUE, "musique", "dev",
     AGENTIC_RAG + ":data/musique/musique_test_questions_and_answers.json"),
    ("bamboogle_test.jsonl", F_QA_BAMBOOGLE, "bamboogle", "test",
     AGENTIC_RAG + ":data/bamboogle/bamboogle_test_questions_and_answers.json"),
]

KILT_WORDS_PER_PASSAGE = 100


class DataError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- helpers

def norm_ws(s: str) -> str:
    """Collapse every whitespace run to one space and strip."""
    return " ".join(s.split())


def contents_of(title: str, text: str) -> str:
    return '"' + title + '"\n' + text


def maybe_literal(v):
    """Some HippoRAG dumps store lists/dicts as Python-repr strings; parse those."""
    if isinstance(v, str) and v[:1] in "[{(":
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def load_json(path: Path):
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def load_jsonl(path: Path):
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: bad JSON line: {e}") from e
    return out


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def dedup_keep_order(xs):
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


# ----------------------------------------------------------------------------- corpus

class Corpus:
    """Passages deduplicated by (title, whitespace-normalised text), ids in insertion order."""

    def __init__(self):
        self.rows: list[dict] = []
        self.index: dict[tuple[str, str], str] = {}  # (title, text) -> contents
        self.stats: dict[str, dict[str, int]] = {}

    def add(self, source: str, title: str, text: str) -> str:
        title = title.strip()
        text = norm_ws(text)
        st = self.stats.setdefault(source, {"read": 0, "added": 0, "duplicates": 0, "empty": 0})
        st["read"] += 1
        if not text:
            st["empty"] += 1
            return ""
        if "\n" in title:
            raise DataError(f"{source}: title contains a newline: {title!r}")
        key = (title, text)
        if key in self.index:
            st["duplicates"] += 1
            return self.index[key]
        c = contents_of(title, text)
        self.index[key] = c
        self.rows.append({"id": str(len(self.rows)), "contents": c})
        st["added"] += 1
        return c

    def lookup(self, title: str, text: str) -> str:
        key = (title.strip(), norm_ws(text))
        if key not in self.index:
            raise DataError(f"passage not in corpus: {key[0]!r}: {key[1][:80]!r}")
        return self.index[key]


def parse_wiki18_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> (Title, text). Some wiki-18 lines lack the quotes around the title."""
    title, sep, text = contents.partition("\n")
    if not sep:
        raise DataError(f"wiki-18 contents without a newline: {contents[:80]!r}")
    title = title.strip()
    if len(title) >= 2 and title.startswith('"') and title.endswith('"'):
        title = title[1:-1]
    return title, text


SECTION_RE = re.compile(r"^Section::::")
MARKER_RE = re.compile(r"^[A-Za-z]+::::-?\s*")  # e.g. "BULLET::::- "


def kilt_passages(page: dict, words_per_passage: int = KILT_WORDS_PER_PASSAGE):
    """Split one KILT page into consecutive ~100-word windows (DPR psgs_w100 style).

    The first paragraph is dropped when it is only the title; "Section::::..." header
    paragraphs are dropped; other "XXX::::" markers (BULLET::::-) are stripped, keeping the text.
    """
    title = page["wikipedia_title"]
    paras = list(page["text"])
    if paras and norm_ws(paras[0]) == norm_ws(title):
        paras = paras[1:]
    words: list[str] = []
    for p in paras:
        p = p.strip()
        if SECTION_RE.match(p):
            continue
        p = MARKER_RE.sub("", p)
        words.extend(p.split())
    for i in range(0, len(words), words_per_passage):
        yield title, " ".join(words[i:i + words_per_passage])


def build_corpus(shared: Path) -> Corpus:
    corpus = Corpus()

    # 1. HotpotQA dev pooled corpus (Xinowo): gold + distractor paragraphs of dev 500.
    for r in load_jsonl(shared / F_POOLED):
        corpus.add(F_POOLED, r["title"], r["text"])

    # 2. HotpotQA train corpus (HippoRAG): {title: [sentences]}; sentences carry their
    #    leading space (HotpotQA convention), so they are joined with "".
    hp_corpus = maybe_literal(load_json(shared / F_HP_TRAIN_CORPUS))
    if not isinstance(hp_corpus, dict):
        raise DataError(f"{F_HP_TRAIN_CORPUS}: expected a dict title -> sentences")
    for title, sents in hp_corpus.items():
        sents = maybe_literal(sents)
        text = "".join(sents) if isinstance(sents, list) else str(sents)
        corpus.add(F_HP_TRAIN_CORPUS, title, text)

    # 3. MuSiQue train corpus (HippoRAG), 4. 2Wiki dev-sample corpus (HippoRAG).
    for fname in (F_MQ_TRAIN_CORPUS, F_2W_CORPUS):
        for r in maybe_literal(load_json(shared / fname)):
            corpus.add(fname, r["title"], r["text"])

    # 5. FlashRAG wiki-18 sample, 6. Search-R1 example corpus (a subset of 5).
    for fname in (F_FR_SAMPLE, F_SR1_CORPUS):
        for r in load_jsonl(shared / fname):
            title, text = parse_wiki18_contents(r["contents"])
            corpus.add(fname, title, text)

    # 7. KILT full pages (R1-Searcher sample) -> 100-word passages.
    for page in load_jsonl(shared / F_KILT):
        page["text"] = maybe_literal(page["text"])
        for title, text in kilt_passages(page):
            corpus.add(F_KILT, title, text)

    return corpus


# ----------------------------------------------------------------------------- questions

def hotpot_train(shared: Path, corpus: Corpus, hp_corpus: dict) -> list[dict]:
    out = []
    for r in load_json(shared / F_HP_TRAIN):
        r = {k: maybe_literal(v) for k, v in r.items()}
        sup_titles = dedup_keep_order(t for t, _ in r["supporting_facts"])
        passages = []
        for t in sup_titles:
            if t not in hp_corpus:
                raise DataError(f"{F_HP_TRAIN} {r['_id']}: supporting title {t!r} not in {F_HP_TRAIN_CORPUS}")
            sents = maybe_literal(hp_corpus[t])
            passages.append(corpus.lookup(t, "".join(sents) if isinstance(sents, list) else str(sents)))
        ans = r["answer"]
        out.append({
            "id": r["_id"],
            "question": r["question"],
            "golden_answers": dedup_keep_order(ans if isinstance(ans, list) else [ans]),
            "metadata": {
                "dataset": "hotpotqa",
                "type": r["type"],
                "level": r["level"],
                "supporting_titles": sup_titles,
                "supporting_passages": passages,
            },
        })
    return out


def musique_train(shared: Path, corpus: Corpus) -> list[dict]:
    out = []
    for r in load_json(shared / F_MQ_TRAIN):
        r = {k: maybe_literal(v) for k, v in r.items()}
        paras = {p["idx"]: p for p in r["paragraphs"]}
        decomp, titles, passages = [], [], []
        for step in r["question_decomposition"]:
            p = paras[step["paragraph_support_idx"]]
            titles.append(p["title"])
            passages.append(corpus.lookup(p["title"], p["paragraph_text"]))
            decomp.append({"question": step["question"], "answer": step["answer"], "title": p["title"]})
        aliases = list(r.get("answer_aliases") or [])
        out.append({
            "id": r["id"],
            "question": r["question"],
            "golden_answers": dedup_keep_order([r["answer"]] + aliases),
            "metadata": {
                "dataset": "musique",
                "type": r["id"].split("__", 1)[0],  # 2hop, 3hop1, 3hop2, 4hop1, 4hop3 ...
                "supporting_titles": titles,
                "supporting_passages": passages,
                "decomposition": decomp,
                "answer_aliases": aliases,
            },
        })
    return out


def hotpot_dev500(shared: Path, corpus: Corpus, pooled: dict[str, str]) -> list[dict]:
    with (shared / F_DEV500).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    qa = load_json(shared / F_QA_HOTPOT)
    if len(qa) < len(rows):
        raise DataError(f"{F_QA_HOTPOT} has {len(qa)} entries, fewer than {len(rows)} in {F_DEV500}")
    out = []
    for i, (row, a) in enumerate(zip(rows, qa)):
        if row["question"] != a["question"]:
            raise DataError(
                f"row {i}: question mismatch between {F_DEV500} and {F_QA_HOTPOT}:\n"
                f"  {row['question']!r}\n  {a['question']!r}")
        titles = [t.strip() for t in row["gold_titles"].split(" | ")]
        passages = []
        for t in titles:
            if t not in pooled:
                raise DataError(f"dev500 {row['example_id']}: gold title {t!r} not in {F_POOLED}")
            passages.append(corpus.lookup(t, pooled[t]))
        ans = a["answer"]
        out.append({
            "id": row["example_id"],
            "question": row["question"],
            "golden_answers": list(ans) if isinstance(ans, list) else [ans],
            "metadata": {
                "dataset": "hotpotqa",
                "type": row["question_type"],
                "level": row["level"],
                "supporting_titles": titles,
                "supporting_passages": passages,
            },
        })
    return out


def bamboogle(shared: Path) -> list[dict]:
    out = []
    for r in load_jsonl(shared / F_BAMBOOGLE):
        ga = r["golden_answers"]
        out.append({
            "id": r["id"],
            "question": r["question"],
            "golden_answers": list(ga) if isinstance(ga, list) else [ga],
            "metadata": {"dataset": "bamboogle"},
        })
    return out


def dev_list(shared: Path, fname: str, dataset: str, prefix: str, source: str) -> list[dict]:
    out = []
    for i, r in enumerate(load_json(shared / fname)):
        ans = r["answer"]
        out.append({
            "id": f"{prefix}_{i}",
            "question": r["question"],
            "golden_answers": list(ans) if isinstance(ans, list) else [ans],
            "metadata": {"dataset": dataset, "source": source},
        })
    return out


# ----------------------------------------------------------------------------- main

def check_inputs(shared: Path) -> None:
    if not shared.is_dir():
        raise DataError(f"shared data directory not found: {shared} (pass --shared DIR)")
    missing = [f for f in ALL_INPUTS if not (shared / f).is_file()]
    if missing:
        raise DataError("missing input file(s) under " + str(shared) + ":\n  " + "\n  ".join(missing))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"public data directory (default: {DEFAULT_SHARED})")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "mini",
                    help="output directory for the mini corpus and questions (default: <repo>/data/mini)")
    ap.add_argument("--dev-out", type=Path, default=None,
                    help="output directory for full dev question lists (default: <out>/../dev)")
    args = ap.parse_args(argv)

    shared = args.shared.resolve()
    out = args.out
    dev_out = args.dev_out if args.dev_out is not None else out.parent / "dev"
    check_inputs(shared)

    corpus = build_corpus(shared)
    print(f"corpus: {len(corpus.rows)} passages")
    total_dup = 0
    for src, st in corpus.stats.items():
        total_dup += st["duplicates"]
        print(f"  {src}: read {st['read']}, added {st['added']}, duplicates {st['duplicates']}"
              + (f", empty {st['empty']}" if st["empty"] else ""))
    print(f"  duplicates dropped in total: {total_dup}")

    hp_corpus = maybe_literal(load_json(shared / F_HP_TRAIN_CORPUS))
    pooled = {r["title"]: r["text"] for r in load_jsonl(shared / F_POOLED)}

    train = hotpot_train(shared, corpus, hp_corpus) + musique_train(shared, corpus)
    dev500 = hotpot_dev500(shared, corpus, pooled)
    bam = bamboogle(shared)

    # Every supporting passage must be, verbatim, a corpus entry.
    contents_set = {r["contents"] for r in corpus.rows}
    for name, rows in (("train", train), ("hotpotqa_dev", dev500)):
        n_sup = sum(len(r["metadata"]["supporting_passages"]) for r in rows)
        bad = [(r["id"], p[:60]) for r in rows for p in r["metadata"]["supporting_passages"]
               if p not in contents_set]
        if bad:
            raise DataError(f"{name}: {len(bad)} supporting passages not in corpus, e.g. {bad[:3]}")
        uniq = len({p for r in rows for p in r["metadata"]["supporting_passages"]})
        print(f"{name}: {len(rows)} questions, {n_sup} supporting passages ({uniq} unique), all in corpus")

    counts = {
        out / "corpus.jsonl": write_jsonl(out / "corpus.jsonl", corpus.rows),
        out / "train.jsonl": write_jsonl(out / "train.jsonl", train),
        out / "hotpotqa_dev.jsonl": write_jsonl(out / "hotpotqa_dev.jsonl", dev500),
        out / "bamboogle_test.jsonl": write_jsonl(out / "bamboogle_test.jsonl", bam),
    }
    for name, fname, dataset, prefix, source in DEV_LISTS:
        rows = dev_list(shared, fname, dataset, prefix, source)
        counts[dev_out / name] = write_jsonl(dev_out / name, rows)
    for path, n in counts.items():
        print(f"wrote {path}: {n} records, {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as e:
        print(f"make_mini_data: error: {e}", file=sys.stderr)
        sys.exit(1)
