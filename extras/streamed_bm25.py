"""01_build_index.py --low_memory true: the BM25 index built out of core, for corpora whose terms do not
fit in memory (wiki-18: 21M passages, ~1.2 billion (passage, term) pairs).

The same files as the in-memory build (bm25s's BM25(method="lucene").index, tested equal): passages are
tokenised a chunk at a time into term ids, their (term, count) pairs spilled to disk, then scored into
the .npy files through memory maps by a counting sort. Memory holds the vocabulary, ~40 bytes per passage
and one chunk of text, never the corpus (BENCHMARKS.md: 1M passages in 1.1 GB peak RSS).
"""

from __future__ import annotations

import json
import sys
from array import array
from pathlib import Path

import numpy as np

import utils

PAIRS_PER_SLICE = 1 << 22  # (passage, term) pairs scored per step of the second pass (~0.3 GB of temporaries)


def build(args, settings: dict, out: Path, passages, word_rule) -> dict:
    """Index the contents yielded by `passages` (01's store_passages, which also writes passages.jsonl)
    into out/; word_rule = 01's (split, term) tokeniser. Returns the manifest's counts."""
    from tqdm.auto import tqdm
    vocab: dict[str, int] = {}  # stemmed term -> column of the score matrix
    doc_len = array("i")  # terms per passage (after stopwords), for length normalisation
    doc_pairs = array("i")  # distinct terms per passage = its entries in the score matrix
    n_pairs = 0
    f_terms, f_tf = open(out / "spill.terms.i32", "wb"), open(out / "spill.tf.u16", "wb")
    texts: list[str] = []
    split, term_of = word_rule  # the query side tokenises by the same rule
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

    with f_terms, f_tf:
        for contents in passages:
            texts.append(contents)
            if len(texts) >= args.chunk_passages:
                flush()
        if texts:
            flush()
    n_docs, n_terms = len(doc_len), len(vocab)
    if n_docs == 0:
        raise utils.ReSearchError(f"{args.corpus}: empty corpus (no passages)")
    if n_terms == 0:
        raise utils.ReSearchError(f"{args.corpus}: no indexable words in {n_docs} passages")

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
    (out / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    params = {"k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
              "dtype": "float32", "int_dtype": "int32", "num_docs": n_docs,
              "version": settings["bm25s_version"], "backend": "numpy"}
    (out / "params.index.json").write_text(json.dumps(params, indent=1))

    return {"num_passages": n_docs, "num_terms": n_terms, "num_postings": n_pairs}
