"""Stage 1: the search engine. Builds a BM25 index (bm25s) over a Wikipedia passage corpus, loads it for the
other stages (utils.load_retriever comes here), answers --query, and serves it (--serve).

Reads a wiki-18 / FlashRAG corpus jsonl(.gz): {"id": "0", "contents": "\\"Title\\"\\ntext"} per line, or
{"id", "title", "text"}. Writes an index folder (built aside, renamed when complete; an up-to-date one is
kept): bm25s's files (memory-mapped), passages.jsonl + passage_offsets.npy, and manifest.json (corpus and its
sha256, passage count, tokenizer and BM25 settings), written last.

CPU (the bundled mini-Wikipedia, 17,247 passages, seconds):
    python 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir runs/index_mini
    python 01_build_index.py --index_dir runs/index_mini --query "Who directed Ed Wood?"
wiki-18 (21M passages, no GPU; time and memory in BENCHMARKS.md):
    python 01_build_index.py --corpus wiki-18.jsonl.gz --index_dir runs/index_wiki18 --low_memory true
Behind their flags (extras/): --low_memory (the same index, built out of core), --encoder (a dense index:
an encoder + faiss, as the paper's E5), --serve (both peers' HTTP APIs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import sys
import time
import zlib
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import utils
from utils import ReSearchError

INDEX_FORMAT = 1  # bumped when the folder's layout changes
MAX_TOPK = 1000  # more passages than any stage asks for: bounded answers
MAX_QUERY_CHARS = 1000  # longer queries are cut: a bounded cost


@dataclass
class IndexArguments:
    corpus: str | None = None
    """Corpus jsonl(.gz) to index; leave it out to query or serve --index_dir."""
    index_dir: str = utils.DEFAULT_INDEX
    """The index folder to build, query or serve."""
    query: list[str] = field(default_factory=list)
    """Print the top passages for these queries."""
    topk: int = 5
    """Passages per --query, and the server's default k."""
    overwrite: bool = False
    """Rebuild even an up-to-date index."""
    threads: int = 0
    """Threads a batch of queries is spread over (0 = every core)."""
    stemmer: str = "english"
    """Snowball stemmer language (PyStemmer), or "none"."""
    stopwords: str = "en"
    """bm25s stopword list (en, en_plus, de, fr, ...), or "none"."""
    token_pattern: str = r"(?u)\b\w\w+\b"
    """Regex whose matches are the words (scikit-learn's and bm25s's)."""
    k1: float = 1.5
    """BM25 term-frequency saturation (bm25s's default)."""
    b: float = 0.75
    """BM25 length normalisation (bm25s's default)."""
    low_memory: bool = False
    """Build out of core (extras/streamed_bm25.py): the same files; needed for wiki-18."""
    chunk_passages: int = 20_000
    """--low_memory and dense: passages tokenised or encoded per chunk."""
    encoder: str | None = None
    """Build a dense index (extras/dense.py) with this sentence-transformers encoder (the paper's:
    intfloat/e5-base-v2); with --query / --serve on a dense index, a local copy of its encoder."""
    encode_batch_size: int = 64
    """Dense: passages per encoder batch (e.g. 512 on a GPU)."""
    faiss_index: str = "flat"
    """Dense: flat (exact) or hnsw (approximate; fast CPU search over wiki-18)."""
    faiss_gpu: bool = False
    """Dense, --query / --serve: search on every GPU (faiss-gpu)."""
    serve: bool = False
    """Serve the index over HTTP (extras/retrieval_server.py) until interrupted."""
    host: str = "127.0.0.1"
    """Address to serve on (0.0.0.0 exposes it to the network)."""
    port: int = 8000
    """Port to serve on (0 = any free one, printed)."""

    def __post_init__(self):
        if not self.corpus and not self.query and not self.serve:
            raise ReSearchError("nothing to do: pass --corpus to build, --query to search, or --serve")
        if not 1 <= self.topk <= MAX_TOPK:
            raise ReSearchError(f"--topk must be from 1 to {MAX_TOPK}, got {self.topk}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ReSearchError(f"need --k1 >= 0 and 0 <= --b <= 1, got k1={self.k1} b={self.b}")
        if min(self.chunk_passages, self.encode_batch_size) < 1 or self.threads < 0 or not 0 <= self.port < 2**16:
            raise ReSearchError("need --chunk_passages, --encode_batch_size >= 1, --threads >= 0, --port 0-65535")
        if self.faiss_index not in ("flat", "hnsw"):
            raise ReSearchError(f"--faiss_index must be flat or hnsw, not {self.faiss_index!r}")


# ---- Tokenising: one rule for the passages and every query ----
def bm25_settings(args: IndexArguments) -> dict:
    """What decides terms and scores: in the manifest, read by every query."""
    import bm25s
    from bm25s.tokenization import _infer_stopwords
    stemmer = "" if args.stemmer.lower() in ("", "none") else args.stemmer
    stopwords = "" if args.stopwords.lower() in ("", "none") else args.stopwords
    if stemmer:
        import Stemmer
        if stemmer not in Stemmer.algorithms():
            raise ReSearchError(f"--stemmer {stemmer!r} unknown; one of: none, {', '.join(Stemmer.algorithms())}")
    try:
        stopword_list = sorted(_infer_stopwords(stopwords or None))
    except ValueError as e:
        raise ReSearchError(f"--stopwords {stopwords!r}: {e}") from e
    return {"format": INDEX_FORMAT, "retriever": "bm25", "token_pattern": args.token_pattern, "lowercase": True,
            "stemmer": stemmer, "stopwords": stopwords, "stopword_list": stopword_list,
            "bm25": {"method": "lucene", "k1": args.k1, "b": args.b}, "bm25s_version": bm25s.__version__}


def word_rule(manifest: dict):
    """bm25s's tokeniser as (split, term): split(text) -> lowercased words; term(word) -> its Snowball stem,
    None for a stopword (checked before stemming, as bm25s does)."""
    pattern = re.compile(manifest["token_pattern"])
    stopwords = frozenset(manifest.get("stopword_list") or ())
    stemmer = None
    if manifest.get("stemmer"):
        import Stemmer
        stemmer = Stemmer.Stemmer(manifest["stemmer"])

    def split(text: str) -> list[str]:
        return pattern.findall(text.lower())

    def term(word: str) -> str | None:
        if word in stopwords:
            return None
        return stemmer.stemWord(word) if stemmer else word

    return split, term


def bm25_tokenize(texts: list[str], manifest: dict) -> list[list[str]]:
    split, term = word_rule(manifest)
    return [[t for t in map(term, split(text)) if t is not None] for text in texts]


# ---- Building ----
def parse_passage(line: str | bytes, where: str, fallback_id: int) -> tuple[str, str]:
    """(id, contents) of a corpus line, or an error naming file:line."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReSearchError(f"{where}: not a JSON object ({e}): {line[:80]!r}") from e
    if not isinstance(row, dict):
        raise ReSearchError(f"{where}: expected a JSON object, got {type(row).__name__}")
    contents = row.get("contents")
    if contents is None and isinstance(row.get("text"), str):  # {"title", "text"} corpora
        contents = f'"{row.get("title") or ""}"\n{row["text"]}'
    if not isinstance(contents, str):
        raise ReSearchError(f"{where}: no \"contents\" string (nor \"title\"/\"text\")")
    pid = row.get("id", fallback_id)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise ReSearchError(f"{where}: \"id\" must be a string or an integer, got {pid!r}")
    return str(pid), contents


def store_passages(corpus: Path, out: Path):
    """Yield each passage's contents after writing it to out/passages.jsonl (offsets: passage_offsets.npy)."""
    from tqdm.auto import tqdm
    offsets = array("q", [0])
    try:
        with utils.open_text(corpus) as f, open(out / "passages.jsonl", "wb") as f_out:
            for n, line in enumerate(tqdm(f, desc=f"passages of {corpus.name}", unit="", mininterval=2), 1):
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) are not passages
                pid, contents = parse_passage(line, f"{corpus}:{n}", len(offsets) - 1)
                rec = json.dumps({"id": pid, "contents": contents}, ensure_ascii=False).encode() + b"\n"
                f_out.write(rec)
                offsets.append(offsets[-1] + len(rec))
                yield contents
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # a truncated or corrupt .gz, not UTF-8
        raise ReSearchError(f"{corpus}: cannot read it ({e})") from e
    np.save(out / "passage_offsets.npy", np.frombuffer(offsets, dtype=np.int64))


def build(args: IndexArguments, settings: dict, out: Path) -> dict:
    """bm25s's own index over every passage's terms, in memory (--low_memory streams them)."""
    import bm25s
    texts = list(store_passages(Path(args.corpus), out))
    if not texts:
        raise ReSearchError(f"{args.corpus}: empty corpus (no passages)")
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in bm25_tokenize(texts, settings)]
    if not vocab:
        raise ReSearchError(f"{args.corpus}: no indexable words in {len(texts)} passages")
    model = bm25s.BM25(method="lucene", k1=args.k1, b=args.b)
    model.index((ids, vocab), create_empty_token=False, show_progress=False)
    model.save(str(out))
    return {"num_passages": len(texts), "num_terms": len(vocab), "num_postings": int(model.scores["indptr"][-1])}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(index_dir: Path, corpus: Path, settings: dict) -> bool:
    try:
        manifest = read_manifest(index_dir)
    except ReSearchError:
        return False
    same = all(manifest.get(k) == v for k, v in settings.items() if not k.endswith("_version"))
    if not same or manifest.get("corpus_bytes") != corpus.stat().st_size:
        return False
    return manifest.get("corpus_sha256") == file_sha256(corpus)


def build_index(args: IndexArguments) -> None:
    corpus = Path(args.corpus)
    index_dir = Path(args.index_dir)
    if not corpus.is_file():
        raise ReSearchError(f"--corpus {corpus}: no such file")
    dense = importlib.import_module("extras.dense") if args.encoder else None
    settings = dense.dense_settings(args) if dense else bm25_settings(args)
    if not args.overwrite and up_to_date(index_dir, corpus, settings):
        print(f"{index_dir} is an up-to-date index of {corpus}; kept (--overwrite to rebuild)", file=sys.stderr)
        return
    if index_dir.exists() and not (index_dir / "manifest.json").is_file() and any(index_dir.iterdir()):
        raise ReSearchError(f"--index_dir {index_dir} exists and is not an index folder; refusing to replace it")
    tmp = index_dir.with_name(f"{index_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        if dense:
            built = dense.build_dense(args, settings, tmp, store_passages(corpus, tmp))
        elif args.low_memory:
            streamed = importlib.import_module("extras.streamed_bm25")
            built = streamed.build(args, settings, tmp, store_passages(corpus, tmp), word_rule(settings))
        else:
            built = build(args, settings, tmp)
        manifest = {**settings, **built, "corpus": str(args.corpus), "corpus_sha256": file_sha256(corpus),
                    "corpus_bytes": corpus.stat().st_size, "build_seconds": round(time.time() - t0, 2),
                    "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "build_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "index_bytes": sum(p.stat().st_size for p in tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        old = index_dir.with_name(f"{index_dir.name}.old-{os.getpid()}")
        if index_dir.exists():
            os.replace(index_dir, old)
        os.replace(tmp, index_dir)  # the finished folder appears under its name in one step
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
    print(f"indexed {manifest['num_passages']:,} passages from {corpus} into {index_dir} in "
          f"{manifest['build_seconds']:.1f} s, peak RSS {manifest['build_peak_rss_mb']:.0f} MB, "
          f"{manifest['index_bytes'] / 2**20:.1f} MiB on disk", file=sys.stderr)


# ---- Loading and searching: every stage's --retriever comes here ----
def read_manifest(index_dir: str | Path) -> dict:  # written last: without one, no finished index
    path = Path(index_dir) / "manifest.json"
    if not path.is_file():
        raise ReSearchError(f"{index_dir} is not a finished index (no manifest.json); build it: python "
                            f"01_build_index.py --corpus data/mini/corpus.jsonl (or yours) --index_dir {index_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReSearchError(f"{path}: corrupt manifest ({e}); rebuild the index") from e
    if manifest.get("format") != INDEX_FORMAT:
        raise ReSearchError(f"{path}: index format {manifest.get('format')!r}, not {INDEX_FORMAT}; rebuild it")
    return manifest


def check_topk(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
        raise ReSearchError(f"top-k must be an integer from 1 to {MAX_TOPK}, got {k!r}")
    return k


def passage_reader(index_dir: Path, n_docs: int):
    """passage(i): line i of passages.jsonl, read at its offset (pread: thread safe)."""
    try:
        offsets = np.load(index_dir / "passage_offsets.npy", mmap_mode="r")
        fd = os.open(index_dir / "passages.jsonl", os.O_RDONLY)
    except (OSError, ValueError) as e:
        raise ReSearchError(f"cannot load the index in {index_dir}: {e}; rebuild it") from e
    if len(offsets) != n_docs + 1:
        raise ReSearchError(f"{index_dir}: passage_offsets.npy disagrees with manifest.json; rebuild it")

    def passage(i: int) -> dict:
        return json.loads(os.pread(fd, int(offsets[i + 1] - offsets[i]), int(offsets[i])))

    return passage


def load_index(index_dir: str | Path, threads: int = 0, encoder: str | None = None, faiss_gpu: bool = False):
    """search(queries, k) -> [[{"id", "contents"}]], best first; search.scored: (passage, score) pairs. BM25:
    ties by corpus order; no passage sharing no term with the query (an empty query gets []). A batch is
    spread over `threads` threads (0 = every core; numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import bm25s

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    kind = manifest.get("retriever", "bm25")
    if kind == "dense":
        return importlib.import_module("extras.dense").load_dense_retriever(index_dir, encoder, faiss_gpu)
    if kind != "bm25":
        raise ReSearchError(f"{index_dir}: unknown retriever {kind!r} (bm25 or dense)")
    if encoder:
        raise ReSearchError(f"{index_dir} is a bm25 index; an encoder ({encoder}) only applies to dense indexes")
    n_docs = int(manifest["num_passages"])
    try:
        model = bm25s.BM25.load(str(index_dir), mmap=True, load_corpus=False, show_progress=False)
    except (OSError, ValueError, KeyError) as e:
        raise ReSearchError(f"cannot load the index in {index_dir}: {e}; rebuild it") from e
    if int(model.scores["num_docs"]) != n_docs:
        raise ReSearchError(f"{index_dir}: files disagree with manifest.json ({n_docs} passages); rebuild it")
    passage = passage_reader(index_dir, n_docs)
    vocab = model.vocab_dict
    pool = ThreadPoolExecutor(threads or os.cpu_count() or 1)

    def one(terms: list[str], k: int) -> list[tuple[dict, float]]:
        ids = [vocab[t] for t in terms if t in vocab]  # unknown words score nothing
        if not ids:
            return []
        scores = model.get_scores_from_ids(ids)
        top = np.argpartition(-scores, min(k, n_docs) - 1)[:k]  # the k best; which of those tied at the k-th...
        kth = scores[top].min()
        if kth > 0:  # ...is arbitrary: take them all, then order ties by corpus position
            top = np.union1d(top[scores[top] > kth], np.flatnonzero(scores == kth))
        top = top[scores[top] > 0]
        top = top[np.lexsort((top, -scores[top]))][:k]
        return [(passage(int(i)), float(scores[i])) for i in top]

    def scored(queries: list[str], k: int) -> list[list[tuple[dict, float]]]:
        check_topk(k)
        terms = bm25_tokenize([str(q)[:MAX_QUERY_CHARS] for q in queries], manifest)
        return list(pool.map(one, terms, [k] * len(terms)))

    def search(queries: list[str], k: int) -> list[list[dict]]:
        return [[p for p, _ in row] for row in scored(queries, k)]

    search.scored = scored  # type: ignore[attr-defined]
    search.manifest = manifest  # type: ignore[attr-defined]
    search.description = f"bm25s:{index_dir} ({n_docs} passages)"  # type: ignore[attr-defined]
    return search


def print_results(search, queries: list[str], k: int) -> None:
    for q, rows in zip(queries, search.scored(queries, k)):
        cut = f" (cut to the first {MAX_QUERY_CHARS} characters)" if len(q) > MAX_QUERY_CHARS else ""
        print(f"query: {q[:200]}{'...' if len(q) > 200 else ''}{cut}")
        if not rows:
            print("  no passages: the query has no indexed words")
        for rank, (p, score) in enumerate(rows, 1):
            title, _, text = p["contents"].partition("\n")
            print(f"  {rank}. [id {p['id']}] score {score:.2f}  {title}\n     {text}")
        print()


def main() -> None:
    (args,) = utils.parse_args(IndexArguments)
    if args.corpus:
        build_index(args)
    search = load_index(args.index_dir, args.threads, None if args.corpus else args.encoder, args.faiss_gpu)
    if args.query:
        print_results(search, args.query, args.topk)
    if args.serve:
        importlib.import_module("extras.retrieval_server").serve(args, search)


if __name__ == "__main__":
    utils.run_main(main)
