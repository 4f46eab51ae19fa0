"""Does GRPO learn on a CPU? The learning benchmark behind `make learn`.

warm-up (02_sft_warmup.py, configs/sft_cpu.yaml) -> GRPO (03_grpo_search.py, --grpo_config) -> greedy evaluation
(04_eval.py's research method, the CPU search settings) of the warm-up checkpoint ("before") and of the GRPO
checkpoint ("after") on the same questions, then the paired change with 95% bootstrap CIs (04's bootstrap_ci,
resampling questions). The reward, the mask and the search settings are the paper's code paths, unchanged.

Questions: data/mini/hotpotqa_dev.jsonl (500, file order), split once:
  held-out  the first 300 (--split heldout): reported once, for the final recipe
  tuning    questions 400-499 (--split tuning): where recipes were compared
  training  the recipe's --train_data: data/mini/train.jsonl (HotpotQA + MuSiQue train), or questions 300-399,
            written to <work_dir>/train_dev.jsonl (HotpotQA dev, hard, as the evaluated ones; never evaluated)
Writes (--split heldout) to --out_dir (benchmarks/results):
  learning_heldout.jsonl  per question: id, question, golden_answers, before / after {prediction, trajectory,
                          ended_with_eos} (trajectory = the response text evaluation read, result contents
                          blanked; prediction = what it read as the answer)
  learning_summary.json   command, wall time, commit, tuning_ids, the recipe, the table
  learning_curves.png     the GRPO run's training curves (extras/plot_curves.py)
and, for every split, <work_dir>/<tag>/summary_<split>.json. Stages whose output is complete are reused.

    make learn                                                       # the held-out result (37 min on 2 idle cores, 17 GB RAM)
    python benchmarks/bench_learning.py --split tuning --tag lr2e-5 -- --learning_rate 2e-5   # a recipe try
"""

import argparse
import importlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

tables = importlib.import_module("extras.results_table")
DEV = ROOT / "data" / "mini" / "hotpotqa_dev.jsonl"
SPLITS = {"heldout": (0, 300), "tuning": (400, 500)}
TRAIN_DEV = (300, 400)  # never evaluated: runs/learn/train_dev.jsonl, training questions of the dev distribution


def run(cmd: list[str], log: Path) -> float:
    """Run one stage as a user would (from the repo root), its output appended to log; seconds taken."""
    t0 = time.time()
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise utils.ReSearchError(f"exit {code}: {shlex.join(cmd)} (log: {log})")
    return round(time.time() - t0, 1)


def evaluate(model: Path, questions: Path, n: int, out: Path, log: Path, batch_size: int,
             search: list[str]) -> tuple[dict, float]:
    """04_eval.py's research method, greedy, CPU search settings; its predictions by id."""
    seconds = 0.0
    if not (out / "results.json").is_file():
        seconds = run([sys.executable, "04_eval.py", "--config", "configs/eval_cpu.yaml", "--model", str(model),
                       "--methods", "research", "--datasets", str(questions), "--limit", str(n),
                       "--batch_size", str(batch_size), "--output_dir", str(out), *search], log)
    (pred,) = out.glob("research/*/predictions.jsonl")
    return {r["id"]: r for r in utils.read_jsonl(pred)}, seconds


def ci(values, baseline=None) -> list[float]:
    """[mean, low, high] in the values' own units (04's bootstrap_ci reports x100)."""
    return [v / 100 for v in tables.bootstrap_ci(values, baseline)]


def summarize(before: dict, after: dict, ids: list[str]) -> dict:
    """Means before and after, and the paired change with its 95% CI, of F1, EM, format-valid, searches."""
    table = {}
    for key in ("f1", "em", "format_ok", "num_searches"):
        a, b = [float(before[i][key]) for i in ids], [float(after[i][key]) for i in ids]
        table[key] = {"before": ci(a), "after": ci(b), "change": ci(b, a)}
    return table


def markdown(table: dict, n: int) -> str:
    names = {"f1": "F1", "em": "EM", "format_ok": "format valid", "num_searches": "searches / question"}
    lines = [f"| {n} questions | before (warm-up) | after (warm-up + GRPO) | change, paired 95% CI |",
             "|---|---:|---:|---:|"]
    for key, row in table.items():
        c, lo, hi = row["change"]
        lines.append(f"| {names[key]} | {row['before'][0]:.3f} | {row['after'][0]:.3f} | "
                     f"{c:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


def read_times(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def show_committed(path: Path) -> None:
    """The committed `make learn` result, labelled as such (make demo ends with it)."""
    if not path.is_file():
        raise utils.ReSearchError(f"{path}: no committed result (run make learn)")
    summary = json.loads(path.read_text())
    seconds = summary.get("wall_seconds_total", summary["wall_seconds_this_call"])
    print(f"== `make learn`, the committed result ({path.relative_to(ROOT)}), not this run: the warm-up vs "
          f"warm-up + GRPO, {summary['n']} held-out questions, its stages {seconds / 60:.0f} min as measured ==")
    print(summary["markdown"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--tag", default="final", help="names this recipe's GRPO run and its evaluations")
    p.add_argument("--grpo_config", default="configs/grpo_learn.yaml", help="the recipe: a 03_grpo_search.py preset")
    p.add_argument("--sft_config", default="configs/sft_cpu.yaml")
    p.add_argument("--work_dir", default="runs/learn")
    p.add_argument("--out_dir", default="benchmarks/results")
    p.add_argument("--eval_batch_size", type=int, default=25)
    p.add_argument("--show_committed", action="store_true", help="print the committed held-out result and exit")
    p.add_argument("grpo_args", nargs="*", help="after --: more 03_grpo_search.py flags (the recipe's overrides)")
    args = p.parse_args()
    if args.show_committed:
        show_committed(ROOT / args.out_dir / "learning_summary.json")
        return
    t_start, work = time.time(), ROOT / args.work_dir
    run_dir, log = work / args.tag, work / args.tag / "log.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    start, end = SPLITS[args.split]
    dev = utils.read_jsonl(DEV)
    questions = work / f"{args.split}.jsonl"
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev[start:end]))
    train_dev = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev[slice(*TRAIN_DEV)])
    (work / "train_dev.jsonl").write_text(train_dev)
    ids = [r["id"] for r in dev[start:end]]

    # each stage's seconds, kept beside its output: a stage reused from an earlier call still counts
    shared_times, run_times = work / "stage_seconds.json", run_dir / "stage_seconds.json"
    seconds = {}
    if not (work / "index_mini" / "manifest.json").is_file():
        seconds["index"] = run([sys.executable, "01_build_index.py", "--corpus", "data/mini/corpus.jsonl",
                                "--index_dir", str(work / "index_mini")], log)
    search = ["--retriever", str(work / "index_mini")]
    sft = work / "sft"
    if not (sft / "config.json").is_file():
        seconds["warmup"] = run([sys.executable, "02_sft_warmup.py", "--config", args.sft_config, *search,
                                 "--output_dir", str(sft)], log)
    shared_times.write_text(json.dumps({**read_times(shared_times), **seconds}))
    grpo = run_dir / "grpo"
    if not (grpo / "config.json").is_file():
        seconds["grpo"] = run([sys.executable, "03_grpo_search.py", "--config", args.grpo_config, *search,
                               "--model", str(sft), "--output_dir", str(grpo), "--report_to", "none",
                               *args.grpo_args], log)
        run_times.write_text(json.dumps({"grpo": seconds["grpo"]}))
    before, seconds["eval_before"] = evaluate(sft, questions, end - start, work / f"eval_sft_{args.split}", log,
                                              args.eval_batch_size, search)
    after, seconds["eval_after"] = evaluate(grpo, questions, end - start, run_dir / f"eval_{args.split}", log,
                                            args.eval_batch_size, search)
    seconds = {**read_times(shared_times), **read_times(run_times), **seconds}
    trained = [(r["step"], r["question_id"]) for r in utils.read_jsonl(grpo / "trajectories.jsonl")]
    table = summarize(before, after, ids)
    md = markdown(table, len(ids))
    print(md)
    summary = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "split": args.split,
               "questions": f"{DEV.relative_to(ROOT)}[{start}:{end}]", "n": len(ids), "tag": args.tag,
               "wall_seconds_this_call": round(time.time() - t_start), "stage_seconds": seconds,
               "wall_seconds_total": round(sum(seconds.values())), "grpo_steps": max(step for step, _ in trained),
               "trained_ids": [qid for _, qid in sorted(set(trained))],
               "commit": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(),
               "tuning_ids": [r["id"] for r in dev[slice(*SPLITS["tuning"])]],
               "recipe": {"sft_config": args.sft_config, "grpo_config": args.grpo_config,
                          "grpo_config_text": (ROOT / args.grpo_config).read_text(), "grpo_overrides": args.grpo_args},
               "table": table, "markdown": md}
    (run_dir / f"summary_{args.split}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.split == "heldout":
        out = ROOT / args.out_dir
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"id": i, "question": after[i]["question"], "golden_answers": after[i]["golden_answers"],
                 **{name: {"prediction": rec[i]["prediction"], "trajectory": rec[i]["trajectory"]["response"],
                           "ended_with_eos": rec[i]["trajectory"]["ended_with_eos"]}
                    for name, rec in (("before", before), ("after", after))}} for i in ids]
        (out / "learning_heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / "learning_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        curves = importlib.import_module("extras.plot_curves").plot_run(str(grpo))
        (out / "learning_curves.png").write_bytes(curves.read_bytes())
        print(f"wrote {out / 'learning_heldout.jsonl'}, learning_summary.json, learning_curves.png")


if __name__ == "__main__":
    utils.run_main(main)
