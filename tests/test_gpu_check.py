"""scripts/gpu_check.sh --dry-run: the GPU check's own code on the CPU with tiny Qwen2-shaped models, end to
end (real 03_grpo_search.py runs, real search loop, real TRL loss): every part runs and reports, and the
retrieved tokens get exactly zero gradient in bf16. The GPU numbers come from the same script on a GPU."""

import json
import os
import subprocess

from conftest import ROOT


def test_gpu_check_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] and not res["skipped"]

    z = res["zero_grad"]  # (c)
    assert z["passed"] and z["retrieved_tokens"] > 0 and z["max_abs_grad_retrieved"] == 0
    assert z["hidden_grad_dtype"] == "bfloat16" and z["param_dtype"] == "bfloat16"

    runs = res["rollout"]["runs"]  # (b): both loops, each against plain generate of the same rows
    assert [r["fast"] for r in runs] == [False, True]
    for r in runs:
        assert r["model_tokens"] > 0 and r["tokens_per_s"] > 0 and r["plain_same_rows_tokens_per_s"] > 0
    assert sum(r["searches_per_rollout"] for r in runs) > 0  # the biased sampling does search

    grpo = res["grpo"]  # (a): LoRA and full FT of the "1.5B", LoRA of the "7B", through 03's command line
    assert [(g["model"], g["mode"]) for g in grpo] == [("tiny-1.5b", "lora"), ("tiny-1.5b", "full"), ("tiny-7b", "lora")]
    for g in grpo:
        assert g["rc"] == 0, g.get("log_tail")
        assert len(g["steps"]) == res["steps"] and all(s["step_time"] > 0 for s in g["steps"])
        assert g["params_qwen_vocab"] > g["params"] and g["predicted_gb"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "(a) GRPO steps" in md and "(b) Rollout" in md and "PASSED" in md
