"""Retrieval server throughput: queries/s of `01_build_index.py --serve true` (extras/retrieval_server.py)
with 1, 4 and 16 concurrent loopback clients, each sending one question per request (POST /batch_search,
top-5, a new connection per request, as extras.retrieval_server.http_retriever does), bounded by
--max_requests per level and --max_seconds per level. Also one client sending --batch questions per
request. Every answer is checked against the local search (a concurrent server must give the sequential
results). The server searches each request's batch on --threads threads (default 1, the sequential
search measured before; 0 = every core, the server's own default).

    .venv/bin/python benchmarks/bench_server.py                                # the mini bm25 index
    .venv/bin/python benchmarks/bench_server.py --index_dir runs/index_dense   # any index folder
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

DEV = ROOT / "data" / "mini" / "hotpotqa_dev.jsonl"


def post(url: str, payload: dict):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def level(url: str, questions: list[str], want: dict, clients: int, per_request: int, max_requests: int,
          max_seconds: float) -> dict:
    lock = threading.Lock()
    state = {"next": 0, "wrong": 0, "lat": []}
    deadline = time.time() + max_seconds

    def client():
        while time.time() < deadline:
            with lock:
                i = state["next"]
                if i >= max_requests:
                    return
                state["next"] += 1
            qs = [questions[(i * per_request + j) % len(questions)] for j in range(per_request)]
            t = time.time()
            res = post(url + "/batch_search", {"query": qs, "top_n": 5})
            dt = time.time() - t
            with lock:
                state["lat"].append(dt)
                state["wrong"] += sum(r != want[q] for q, r in zip(qs, res))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    lat = sorted(state["lat"])
    n = len(lat)
    return {"clients": clients, "queries_per_request": per_request, "requests": n, "wall_s": round(wall, 2),
            "queries_per_s": round(n * per_request / wall, 1), "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[min(n - 1, int(0.95 * n))], 1), "wrong_results": state["wrong"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index_dir", default=utils.DEFAULT_INDEX)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max_requests", type=int, default=500, help="requests per level at most")
    ap.add_argument("--max_seconds", type=float, default=20.0, help="seconds per level at most")
    ap.add_argument("--batch", type=int, default=32, help="questions per request in the batched run")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's --threads: one request's queries spread over this many (0 = every core)")
    a = ap.parse_args()
    questions = [json.loads(l)["question"] for l in DEV.read_text().splitlines()]
    want_rows = importlib.import_module("01_build_index").load_index(a.index_dir, threads=1)(questions, 5)  # sequential
    want = dict(zip(questions, want_rows))
    cmd = [sys.executable, "01_build_index.py", "--index_dir", a.index_dir, "--serve", "true", "--port", "0",
           "--threads", str(a.threads)]
    if shutil.which("timeout"):
        cmd = ["timeout", "900"] + cmd  # the server cannot outlive a crashed benchmark by long
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"server did not start: {line}")
        url = line.split(" on ")[1].split()[0]
        print(f"{line.strip()}\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        rows = [level(url, questions, want, c, 1, a.max_requests, a.max_seconds) for c in map(int, a.clients.split(","))]
        rows.append(level(url, questions, want, 1, a.batch, max(1, a.max_requests // a.batch), a.max_seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| clients | queries/request | requests | wall s | queries/s | p50 ms | p95 ms | wrong results |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['queries_per_request']} | {r['requests']} | {r['wall_s']} | {r['queries_per_s']} | "
              f"{r['p50_ms']} | {r['p95_ms']} | {r['wrong_results']} |")
    if any(r["wrong_results"] for r in rows):
        raise SystemExit("the server gave results that differ from the local search")


if __name__ == "__main__":
    main()
