"""Retrieval throughput against threads: queries/s of one batch through 01_build_index.load_index(dir, threads=T)
for each T in --threads, in ONE process over the SAME index (default 1M passages), interleaved
(T=1, T=2, T=1, T=2, ...; median per T), then the projection to a 16-core box.

The corpus is benchmarks/bench_retrieval.py's synthetic one (make_corpus: real titles and words of the mini
corpus remixed, fixed seed), built by 01_build_index.py in its own process (wall time and peak RSS from
wait4). Queries: the 500 mini HotpotQA dev questions, top-5, one batch per measurement (the rollout sends a
turn's queries as one batch); a first pass over them warms the page cache and is not counted.

    .venv/bin/python benchmarks/bench_retrieval_threads.py                      # 1M: ~4 min build + ~1 min queries
    .venv/bin/python benchmarks/bench_retrieval_threads.py --passages 100000 --threads 1,2,4
    .venv/bin/python benchmarks/bench_retrieval_threads.py --index_dir runs/index_1m --keep   # reuse / keep it
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTIONS = ROOT / "data" / "mini" / "hotpotqa_dev.jsonl"


def bench_retrieval():
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "benchmarks" / "bench_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(a, index_dir: Path, tmp: Path) -> dict:
    t0 = time.time()
    corpus = bench_retrieval().make_corpus(a.passages, a.seed, tmp / f"corpus_{a.passages}.jsonl")
    made_s = time.time() - t0
    cmd = [sys.executable, "01_build_index.py", "--corpus", str(corpus), "--index_dir", str(index_dir)]
    if a.low_memory:
        cmd += ["--low_memory", "true"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, DISABLE_TQDM="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    corpus.unlink()
    return {"command": " ".join(cmd[1:]), "corpus_made_s": round(made_s, 1), "build_wall_s": round(time.time() - t0, 1),
            "build_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="1,2", help="comma list of thread counts, measured in one process")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per thread count (interleaved)")
    p.add_argument("--n_queries", type=int, default=500)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--low_memory", action="store_true", help="build with --low_memory true")
    p.add_argument("--index_dir", default=None, help="use this index if it exists (else build it there)")
    p.add_argument("--keep", action="store_true", help="keep a built --index_dir")
    p.add_argument("--project_cores", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_retrieval_threads.json"))
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    index_dir = Path(a.index_dir) if a.index_dir else tmp / "index"
    res = {"passages": a.passages, "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        if not (index_dir / "manifest.json").is_file():
            res["build"] = build(a, index_dir, tmp)
            print(f"built {index_dir}: {res['build']}", file=sys.stderr, flush=True)
        build_index = importlib.import_module("01_build_index")
        manifest = build_index.read_manifest(index_dir)
        res["index"] = {k: manifest.get(k) for k in ("num_passages", "num_terms", "num_postings", "index_bytes",
                                                     "build_seconds", "build_peak_rss_mb")}
        qs = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()[: a.n_queries]]
        threads = [int(t) for t in a.threads.split(",")]
        t0 = time.time()
        searches = {t: build_index.load_index(index_dir, threads=t) for t in threads}  # one mmap, shared pages
        res["load_s"] = round(time.time() - t0, 2)
        warm = searches[threads[0]](qs, a.topk)  # page cache, imports
        assert sum(map(len, warm)) > 0
        for t in threads[1:]:
            assert searches[t](qs, a.topk) == warm, "thread counts disagree"
        times: dict[int, list[float]] = {t: [] for t in threads}
        res["loadavg_before"] = os.getloadavg()
        for _ in range(a.repeats):
            for t in threads:
                t0 = time.perf_counter()
                searches[t](qs, a.topk)
                times[t].append(time.perf_counter() - t0)
        res["loadavg_after"] = os.getloadavg()
        base = len(qs) / statistics.median(times[threads[0]])
        res["queries"] = len(qs)
        res["threads"] = {t: {"qps_median": round(len(qs) / statistics.median(ts), 1),
                              "qps_runs": [round(len(qs) / x, 1) for x in ts]} for t, ts in times.items()}
        for t in threads:
            res["threads"][t]["speedup_vs_first"] = round(res["threads"][t]["qps_median"] / base, 2)
        # projection: per-thread q/s x cores x the parallel efficiency measured at the largest T here
        top = max(threads)
        eff = res["threads"][top]["speedup_vs_first"] / (top / threads[0]) if top > threads[0] else 1.0
        per_thread = base / threads[0]
        res["projection"] = {"cores": a.project_cores, "per_thread_qps": round(per_thread, 1),
                             "efficiency_at_max_measured_threads": round(eff, 2),
                             "qps_linear": round(per_thread * a.project_cores, 0),
                             "qps_at_measured_efficiency": round(per_thread * a.project_cores * min(eff, 1.0), 0)}
    finally:
        if not (a.index_dir and a.keep):
            shutil.rmtree(tmp, ignore_errors=True)
            if a.index_dir and "build" in res:
                shutil.rmtree(index_dir, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print("\n| threads | q/s (median of {}) | runs | speed-up |".format(a.repeats))
    print("|---:|---:|---|---:|")
    for t, r in res["threads"].items():
        print(f"| {t} | {r['qps_median']} | {', '.join(map(str, r['qps_runs']))} | {r['speedup_vs_first']}x |")
    pr = res["projection"]
    print(f"\n{pr['cores']}-core projection: {pr['per_thread_qps']} q/s per thread x {pr['cores']} = {pr['qps_linear']:.0f} "
          f"q/s if linear; x {pr['efficiency_at_max_measured_threads']} efficiency measured here = "
          f"{pr['qps_at_measured_efficiency']:.0f} q/s")


if __name__ == "__main__":
    main()
