"""The committed learning benchmark (benchmarks/bench_learning.py, `make learn`) re-scores to its reported
table: every prediction is what evaluation reads from its own trajectory, F1 / EM / format / searches are
recomputed from the text, the paired CIs from those, and no reported question was tuned or trained on."""

import importlib
import json

from conftest import ROOT, load_stage

import utils

RESULTS = ROOT / "benchmarks" / "results"
ev = load_stage("04_eval.py", "eval04")


def test_committed_learning_result_rescores_to_its_table():
    rows = utils.read_jsonl(RESULTS / "learning_heldout.jsonl")
    summary = json.loads((RESULTS / "learning_summary.json").read_text())
    bench = importlib.import_module("benchmarks.bench_learning")
    scored = {"before": {}, "after": {}}
    for r in rows:
        for side in ("before", "after"):
            s = r[side]
            text, eos = s["trajectory"], s["ended_with_eos"]
            assert s["prediction"] == (ev.eval_prediction(text, eos) or ""), (r["id"], side)
            assert s["prediction"] in text
            scored[side][r["id"]] = {"f1": utils.f1_score(s["prediction"], r["golden_answers"]),
                                     "em": utils.exact_match(s["prediction"], r["golden_answers"]),
                                     "format_ok": utils.compute_reward(text, [], eos)["format_ok"],
                                     "num_searches": text.count(f"{utils.RESULT_OPEN}\n{utils.RESULT_CLOSE}")}
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == summary["n"] >= 200
    assert bench.summarize(scored["before"], scored["after"], ids) == summary["table"]

    # held out: the first questions of the dev file, none of them a tuning or a training question
    dev = utils.read_jsonl(ROOT / "data" / "mini" / "hotpotqa_dev.jsonl")
    assert ids == [d["id"] for d in dev[:len(ids)]]
    assert not set(ids) & set(summary["tuning_ids"])
    train = utils.read_jsonl(ROOT / "data" / "mini" / "train.jsonl")
    assert not set(ids) & {t["id"] for t in train}
    assert not {r["question"] for r in rows} & {t["question"] for t in train}
    # the questions GRPO actually trained on (its trajectories.jsonl, every step), whatever file they came from
    assert summary["trained_ids"] and not set(ids) & set(summary["trained_ids"])
    assert not set(summary["tuning_ids"]) & set(summary["trained_ids"])
