"""Evaluation cost on the CPU: the README demo's two 04_eval.py runs (all five methods with the bundled
model, then the ReSearch row of the trained model), each its own subprocess, timed side by side.

For every run: wall time, CPU time (user + sys, from wait4: on a machine shared with other jobs
this is the better guide to what an idle machine would take), peak RSS, and each method's
generation seconds from its results.json. Outputs go to a temp dir, deleted at the end.

    .venv/bin/python benchmarks/bench_eval.py                              # the demo: first 4 questions
    .venv/bin/python benchmarks/bench_eval.py --limit 24 --after ""        # a longer prefix, before only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py            # one thread (busy machines)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="models/SmolLM2-135M-Instruct", help="model for all five methods")
    ap.add_argument("--after", default="runs/grpo", help="trained model for the ReSearch row ('' to skip)")
    ap.add_argument("--limit", type=int, default=None, help="questions (default: the config's)")
    ap.add_argument("--config", default="configs/eval_cpu.yaml")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    runs = [("before", a.before, [])] + ([("after", a.after, ["--methods", "research"])] if a.after else [])
    rows = []
    try:
        for name, model, extra in runs:
            out = tmp / name
            cmd = [sys.executable, "04_eval.py", "--config", a.config, "--model", model, "--output_dir", str(out),
                   *extra, *(["--limit", str(a.limit)] if a.limit else [])]
            r = timed(cmd)
            res = json.loads((out / "results.json").read_text())
            per = {m: sum(c["seconds"] for c in cells.values()) for m, cells in res["cells"].items()}
            n = next(iter(next(iter(res["cells"].values())).values()))["n"]
            rows.append((name, model, n, r, per))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} · OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} · {os.cpu_count()} CPUs\n")
    print("| run | model | questions | wall s | CPU s | peak RSS MB | generation s per method |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, model, n, r, per in rows:
        meth = ", ".join(f"{m} {s:.0f}" for m, s in per.items())
        print(f"| {name} | {model} | {n} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['rss_mb']:.0f} | {meth} |")
    print(f"| total | | | {sum(r['wall_s'] for *_, r, _ in rows):.0f} | {sum(r['cpu_s'] for *_, r, _ in rows):.0f} | | |")


if __name__ == "__main__":
    main()
