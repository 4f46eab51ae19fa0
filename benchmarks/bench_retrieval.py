"""Retrieval benchmark: build time, peak memory and queries/s of our bm25s index (01_build_index.py
--low_memory true: the streamed out-of-core build, extras/streamed_bm25.py) against rank-bm25's BM25Okapi,
with the same tokenisation (01_build_index.bm25_tokenize with the index's settings), on the bundled mini
corpus and on bigger corpora made from its real passage text. bm25s q/s: one batch through
01_build_index.load_index(dir, threads=1), one thread as before (benchmarks/bench_retrieval_threads.py
measures more threads).

Every build and every query run is its own subprocess, so each peak RSS (from wait4) is that run's
alone. Queries are the 500 mini HotpotQA dev questions, top-5. Synthetic corpora (fixed seed, written
to a temp dir and deleted at the end): passage j takes the title of a random real passage and
len(that passage) words sampled from the words of it and two other random real passages, so lengths,
word frequencies and titles are real but every passage is a new mix. Their vocabulary is the mini
corpus's (~75k words), far smaller than wiki-18's: see BENCHMARKS.md for what that changes.

    .venv/bin/python benchmarks/bench_retrieval.py                       # mini, 100k, 1M (~6 min, 2 cores)
    .venv/bin/python benchmarks/bench_retrieval.py --sizes mini,100000   # quicker
rank-bm25 runs only up to --rank_bm25_max_passages (default 100k): at 1M its pure-Python index
(a dict per passage) would take tens of GB and each query ~1 s per query word.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
engine = importlib.import_module("01_build_index")  # read_manifest, bm25_tokenize, load_index

CORPUS = ROOT / "data" / "mini" / "corpus.jsonl"
QUESTIONS = ROOT / "data" / "mini" / "hotpotqa_dev.jsonl"


def questions(n: int) -> list[str]:
    return [json.loads(l)["question"] for l in QUESTIONS.read_text().splitlines()[:n]]


def make_corpus(n: int, seed: int, path: Path) -> Path:
    """n passages of real words, remixed (see the docstring)."""
    rows = [json.loads(l)["contents"] for l in CORPUS.read_text(encoding="utf-8").splitlines()]
    split = [r.partition("\n") for r in rows]
    titles, bodies = [t for t, _, _ in split], [b.split() for _, _, b in split]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for j in range(n):
            a, b, c = (rng.randrange(len(rows)) for _ in range(3))
            pool = bodies[a] + bodies[b] + bodies[c]
            words = rng.sample(pool, min(len(bodies[a]), len(pool)))
            f.write(json.dumps({"id": str(j), "contents": f"{titles[a]}\n{' '.join(words)}"}, ensure_ascii=False) + "\n")
    return path


def run_child(cmd: list[str]) -> dict:
    """Run one measurement in its own process; its last stdout line is a JSON object (if any).
    Adds wall seconds and that process's own peak RSS (MB, from wait4)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env=dict(os.environ, DISABLE_TQDM="1", PYTHONUNBUFFERED="1"))
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: don't leave the measurement running
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        lines = [l for l in out.read().splitlines() if l.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    res["wall_s"] = round(time.time() - t0, 2)
    res["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return res


# ---------------------------------------------------------------------------------------------
# Workers (run as subprocesses by main)
# ---------------------------------------------------------------------------------------------
def worker_query_bm25s(a) -> dict:
    t0 = time.time()
    search = engine.load_index(a.index_dir, threads=1)  # one thread: the sequential search measured before
    load_s = time.time() - t0
    qs = questions(a.n_queries)
    search(qs[:5], 5)  # warm the page cache and imports
    t0 = time.time()
    res = search(qs, 5)
    dt = time.time() - t0
    assert sum(len(r) for r in res) > 0
    return {"load_s": round(load_s, 2), "queries": len(qs), "qps": round(len(qs) / dt, 1)}


def read_terms(corpus: str, manifest: dict) -> list[list[str]]:
    out, texts = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["contents"])
            if len(texts) == 20000:
                out += engine.bm25_tokenize(texts, manifest)
                texts = []
    return out + engine.bm25_tokenize(texts, manifest)


def worker_rank_bm25(a) -> dict:
    import numpy as np
    from rank_bm25 import BM25Okapi
    manifest = engine.read_manifest(a.index_dir)  # same tokenisation as the bm25s index
    t0 = time.time()
    model = BM25Okapi(read_terms(a.corpus, manifest), k1=1.5, b=0.75)
    build_s = time.time() - t0
    qs = engine.bm25_tokenize(questions(a.n_queries), manifest)
    done, t0 = 0, time.time()
    for q in qs:  # bounded: stop at the time budget
        scores = model.get_scores(q)
        top = np.argpartition(-scores, 5)[:5]
        top[np.argsort(-scores[top])]
        done += 1
        if time.time() - t0 > a.time_budget_s:
            break
    return {"build_s": round(build_s, 2), "queries": done, "qps": round(done / (time.time() - t0), 2)}


def worker_bm25s_stock(a) -> dict:
    """bm25s's documented in-memory path: bm25s.tokenize(all texts) + BM25.index + save."""
    import bm25s
    import Stemmer
    t0 = time.time()
    texts = [json.loads(l)["contents"] for l in open(a.corpus, encoding="utf-8")]
    tokens = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)
    model = bm25s.BM25(method="lucene")
    model.index(tokens, show_progress=False)
    model.save(a.index_dir, show_progress=False)
    return {"build_s": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="mini,100000,1000000", help="comma list: mini and/or passage counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_queries", type=int, default=500, help="bm25s queries per size (HotpotQA dev questions)")
    p.add_argument("--rank_bm25_queries", type=int, default=100, help="rank-bm25 queries at most per size")
    p.add_argument("--time_budget_s", type=float, default=60, help="rank-bm25 query time budget per size")
    p.add_argument("--rank_bm25_max_passages", type=int, default=100_000)
    p.add_argument("--stock_bm25s_max_passages", type=int, default=100_000,
                   help="also time bm25s's in-memory tokenize+index up to this size")
    p.add_argument("--tmp_dir", default=None, help="where the synthetic corpora and indexes go (deleted after)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index_dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = {"query_bm25s": worker_query_bm25s, "rank_bm25": worker_rank_bm25, "bm25s_stock": worker_bm25s_stock}
        print(json.dumps(fn[a.worker](a)))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the temp dir when killed
    py, me = sys.executable, str(Path(__file__).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench_retrieval_", dir=a.tmp_dir))
    results = []
    try:
        for size in a.sizes.split(","):
            if size == "mini":
                corpus, n = CORPUS, sum(1 for _ in open(CORPUS, encoding="utf-8"))
            else:
                n = int(size)
                t0 = time.time()
                corpus = make_corpus(n, a.seed, tmp / f"corpus_{n}.jsonl")
                print(f"[{n}] made corpus in {time.time() - t0:.0f} s", file=sys.stderr)
            ix = tmp / f"index_{size}"
            row = {"size": size, "passages": n, "corpus_mb": round(corpus.stat().st_size / 2**20, 1)}
            b = run_child([py, "01_build_index.py", "--corpus", str(corpus), "--index_dir", str(ix),
                           "--low_memory", "true"])  # the streamed build (extras/streamed_bm25.py)
            m = engine.read_manifest(ix)
            # tokenize_s: the streamed build no longer records its tokenising time (None)
            row["bm25s"] = {"build_s": m["build_seconds"], "tokenize_s": m.get("tokenize_seconds"), "build_wall_s": b["wall_s"],
                            "build_peak_rss_mb": b["peak_rss_mb"], "index_mb": round(m["index_bytes"] / 2**20, 1),
                            "postings": m["num_postings"], "terms": m["num_terms"]}
            q = run_child([py, me, "--worker", "query_bm25s", "--index_dir", str(ix), "--n_queries", str(a.n_queries)])
            row["bm25s"].update(qps=q["qps"], queries=q["queries"], load_s=q["load_s"], query_peak_rss_mb=q["peak_rss_mb"])
            print(f"[{size}] bm25s {row['bm25s']}", file=sys.stderr)
            if n <= a.stock_bm25s_max_passages:
                s = run_child([py, me, "--worker", "bm25s_stock", "--corpus", str(corpus), "--index_dir", str(tmp / "stock")])
                row["bm25s_stock"] = {"build_s": s["build_s"], "build_peak_rss_mb": s["peak_rss_mb"]}
                shutil.rmtree(tmp / "stock", ignore_errors=True)
                print(f"[{size}] bm25s stock {row['bm25s_stock']}", file=sys.stderr)
            if n <= a.rank_bm25_max_passages:
                r = run_child([py, me, "--worker", "rank_bm25", "--corpus", str(corpus), "--index_dir", str(ix),
                               "--n_queries", str(a.rank_bm25_queries), "--time_budget_s", str(a.time_budget_s)])
                row["rank_bm25"] = {"build_s": r["build_s"], "peak_rss_mb": r["peak_rss_mb"],
                                    "qps": r["qps"], "queries": r["queries"]}
                row["speedup_qps"] = round(row["bm25s"]["qps"] / r["qps"], 1)
                print(f"[{size}] rank-bm25 {row['rank_bm25']}  speed-up {row['speedup_qps']}x", file=sys.stderr)
            else:
                row["rank_bm25"] = f"skipped: > --rank_bm25_max_passages {a.rank_bm25_max_passages}"
            results.append(row)
            shutil.rmtree(ix, ignore_errors=True)
            if corpus != CORPUS:
                corpus.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| corpus | passages | bm25s build s | bm25s build peak RSS MB | index MB | bm25s q/s | "
          "bm25s-stock build s / RSS MB | rank-bm25 build s / RSS MB | rank-bm25 q/s | q/s ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s, rb, st = r["bm25s"], r["rank_bm25"], r.get("bm25s_stock")
        rb_cells = (f"{rb['build_s']} / {rb['peak_rss_mb']:.0f} | {rb['qps']} ({rb['queries']} q) | {r['speedup_qps']}x"
                    if isinstance(rb, dict) else "skipped | skipped | -")
        st_cell = f"{st['build_s']} / {st['build_peak_rss_mb']:.0f}" if st else "not run"
        print(f"| {r['size']} | {r['passages']:,} | {s['build_s']} | {s['build_peak_rss_mb']:.0f} | {s['index_mb']} | "
              f"{s['qps']} | {st_cell} | {rb_cells} |")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
