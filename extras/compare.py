"""Before / after, question by question: for every method x dataset cell that two 04_eval.py output folders
share, the mean difference in EM, F1 and accuracy on the questions both answered, with its paired 95%
bootstrap CI (resampling questions, so the noise of which questions were drawn cancels out).

    python extras/compare.py runs/eval/before runs/eval/after        # prints a Markdown table
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

tables = importlib.import_module("extras.results_table")
resume = importlib.import_module("extras.resume")


def compare(before: Path, after: Path) -> dict:
    """{"<method> · <dataset>": {"n", "em", "f1", "acc": [mean, low, high] of after - before, x 100}}."""
    if not (before / "results.json").is_file() or not (after / "results.json").is_file():
        raise utils.ReSearchError(f"{before} and {after} must both be 04_eval.py output folders (results.json)")
    diffs = {}
    for pred in sorted(after.glob("*/*/predictions.jsonl")):
        cell = pred.relative_to(after).parent
        a, b = resume.read_predictions(pred), resume.read_predictions(before / cell / "predictions.jsonl")
        ids = [i for i in a if i in b]
        if ids:
            diffs[f"{cell.parts[0]} · {cell.parts[1]}"] = {"n": len(ids), **{k: tables.bootstrap_ci(
                [a[i][k] for i in ids], [b[i][k] for i in ids]) for k in ("em", "f1", "acc")}}
    return diffs


def markdown(diffs: dict, before: Path, after: Path) -> str:
    lines = [f"{after} minus {before}, on the same questions: mean difference and paired 95% bootstrap CI "
             "(points of %).", "", "| cell | n | ΔEM | ΔF1 | ΔAcc |", "|---|---:|---:|---:|---:|"]
    for name, d in diffs.items():
        lines.append(f"| {name} | {d['n']} | " + " | ".join(f"{d[k][0]:+.1f} [{d[k][1]:+.1f}, {d[k][2]:+.1f}]"
                                                           for k in ("em", "f1", "acc")) + " |")
    return "\n".join(lines + ([] if diffs else ["", "(no cell in common)"])) + "\n"


def main():
    if len(sys.argv) != 3:
        raise utils.ReSearchError("usage: python extras/compare.py BEFORE_DIR AFTER_DIR (04_eval.py output folders)")
    before, after = Path(sys.argv[1]), Path(sys.argv[2])
    print(markdown(compare(before, after), before, after))


if __name__ == "__main__":
    utils.run_main(main)
