"""BM25 vs dense retrieval, side by side: build time, peak memory, index size, recall@5 and
queries/s of 01_build_index.py's BM25 index and its dense one (--encoder) on the same corpus, for the
500 mini HotpotQA dev questions (gold = metadata.supporting_passages, 2 per question).

The corpus is the mini corpus (--distractors all), or, because encoding 17k passages with a CPU
encoder takes about an hour on a shared 2-core machine, every gold passage of the 500 questions plus
--distractors random other mini passages (seed 0), written to a temp dir. Both retrievers index the
same file, so their recalls compare; on a smaller corpus both are higher than on the full one.
Each build is its own subprocess (peak RSS from wait4); searches run in this process, one batch of the
500 questions through 01_build_index.load_index(dir, threads=1). The bm25 index is built with
--low_memory true (the streamed build, extras/streamed_bm25.py: the build measured before the default
became bm25s's in-memory index(); the files, hence recall and q/s, are the same).

    .venv/bin/python benchmarks/bench_dense.py                        # golds + 2000 distractors (~10 min, 2 cores)
    .venv/bin/python benchmarks/bench_dense.py --distractors all      # the whole mini corpus (~1 h on 2 cores, ~1 min on a GPU)
    .venv/bin/python benchmarks/bench_dense.py --encoder intfloat/e5-base-v2 --distractors all   # the paper's encoder (hub)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
engine = importlib.import_module("01_build_index")  # read_manifest, load_index

CORPUS = ROOT / "data" / "mini" / "corpus.jsonl"
DEV = ROOT / "data" / "mini" / "hotpotqa_dev.jsonl"


def timed_build(cmd: list[str]) -> dict:
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: progress bars cannot fill it and block
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errf, text=True,
                                env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1")))
        _, status, usage = os.wait4(proc.pid, 0)
        errf.seek(0)
        err = errf.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def recall(search, rows: list[dict], k: int = 5) -> dict:
    t0 = time.time()
    results = search([r["question"] for r in rows], k)
    dt = time.time() - t0
    any_gold = both = 0
    for r, res in zip(rows, results):
        gold = set(r["metadata"]["supporting_passages"])
        hits = len(gold & {p["contents"] for p in res})
        any_gold += hits >= 1
        both += hits == len(gold)
    return {"any_gold": round(any_gold / len(rows), 3), "all_gold": round(both / len(rows), 3),
            "qps": round(len(rows) / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2")
    ap.add_argument("--distractors", default="2000", help="random non-gold passages added to the golds, or 'all'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work_dir", default=None, help="keep the corpus and indexes here (default: a temp dir)")
    a = ap.parse_args()
    rows = [json.loads(l) for l in DEV.read_text().splitlines()]
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench_dense_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.distractors == "all":
        corpus = CORPUS
    else:
        gold = {p for r in rows for p in r["metadata"]["supporting_passages"]}
        lines = CORPUS.read_text(encoding="utf-8").splitlines()
        is_gold = [json.loads(l)["contents"] in gold for l in lines]
        others = [i for i, g in enumerate(is_gold) if not g]
        keep = set(random.Random(a.seed).sample(others, int(a.distractors))) | {i for i, g in enumerate(is_gold) if g}
        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(lines[i] + "\n" for i in sorted(keep)), encoding="utf-8")
    n = sum(1 for _ in open(corpus, encoding="utf-8"))
    print(f"corpus: {corpus} ({n} passages); encoder {a.encoder}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    out = {}
    for kind, extra in (("bm25", ["--low_memory", "true"]),  # the streamed build, as measured before
                        ("dense", ["--retriever", "dense", "--encoder", a.encoder])):
        ix = work / f"index_{kind}"
        b = timed_build([sys.executable, "01_build_index.py", "--corpus", str(corpus), "--index_dir", str(ix),
                         "--overwrite", *extra])
        m = engine.read_manifest(ix)
        search = engine.load_index(ix, threads=1)  # bm25: one thread, as before (dense: one encode + faiss search)
        r = recall(search, rows)
        out[kind] = {**b, "index_mb": round(m["index_bytes"] / 2**20, 1), **r}
        print(json.dumps({kind: out[kind]}), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| retriever | passages | build s | build peak RSS MB | index MB | recall@5 any gold | recall@5 both golds | q/s (batch of 500) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in out.items():
        name = "bm25 (bm25s)" if kind == "bm25" else f"dense ({a.encoder}, faiss flat)"
        print(f"| {name} | {n:,} | {r['wall_s']} | {r['peak_rss_mb']} | {r['index_mb']} | {r['any_gold']:.3f} | "
              f"{r['all_gold']:.3f} | {r['qps']} |")


if __name__ == "__main__":
    main()
