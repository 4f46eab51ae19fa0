"""04_eval.py's results: each method x dataset cell's EM, F1, acc and LJ (%) with 95% bootstrap CIs over
questions, as results.json's cells and a Markdown table (results.md). extras/compare.py pairs two runs."""


def bootstrap_ci(values, baseline=None, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """[mean, low, high] x 100: the mean of values (or of values - baseline, paired by question) and its 95%
    percentile bootstrap interval over questions; seeded, so every table is reproducible."""
    import numpy as np
    x = np.asarray(values, dtype=float)
    if baseline is not None:
        x = x - np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n_boot)]
    low, high = np.percentile(means, [2.5, 97.5])
    return [100 * float(x.mean()), 100 * float(low), 100 * float(high)]


def summarize(records: list[dict], method: str) -> dict:
    """A cell of the table: n, EM, F1, acc and, once every item is judged, LJ (a failed judgement is wrong)."""
    n = len(records)
    cell = {"n": n, "mean_searches": sum(r["num_searches"] for r in records) / n,
            "seconds": sum(r.get("seconds", 0.0) for r in records), "format_valid": None, "judge_failed": None,
            "lj": None}
    if method == "research":
        cell["format_valid"] = 100 * sum(bool(r.get("format_ok")) for r in records) / n
    scores = {key: [r[key] for r in records] for key in ("em", "f1", "acc")}
    if all(r.get("judge") for r in records):
        scores["lj"] = [float(r["judge"]["judgement"] == "correct") for r in records]
        cell["judge_failed"] = sum(r["judge"]["status"] == "failed" for r in records)
    for key, values in scores.items():
        cell[f"{key}_ci"] = bootstrap_ci(values)
        cell[key] = cell[f"{key}_ci"][0]
    return cell


def ci(cell: dict, key: str) -> str:
    if cell.get(key) is None:
        return "-"
    return f"{cell[key]:.1f} [{cell[key + '_ci'][1]:.1f}, {cell[key + '_ci'][2]:.1f}]"


def markdown(header: dict, cells: dict, sargs, row_names: dict) -> str:
    lines = [f"**Model** `{header['model']}` · **retriever** {header['retriever']} · **corpus** {header['corpus']}"
             f" · **top-k** {sargs.topk} · **passage words** {sargs.passage_max_words or 'all'} · **backend** "
             f"{header['backend']} ({header['dtype']}) · **judge** {header['judge'] or 'none'}", "",
             "Scores in %, 95% bootstrap CIs over questions. LJ: judged correct / all (failed judgements: wrong).", "",
             "| method | dataset | n | EM | F1 | Acc | LJ | judge failed | format valid | searches/q | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, by_tag in cells.items():
        for tag, cell in by_tag.items():
            format_valid = "-" if cell["format_valid"] is None else f"{cell['format_valid']:.1f}"
            judge_failed = "-" if cell["judge_failed"] is None else cell["judge_failed"]
            lines.append(f"| {row_names[method]} | {tag} | {cell['n']} | {ci(cell, 'em')} | {ci(cell, 'f1')} | "
                         f"{ci(cell, 'acc')} | {ci(cell, 'lj')} | {judge_failed} | {format_valid} | "
                         f"{cell['mean_searches']:.2f} | {cell['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
