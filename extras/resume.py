"""Resuming a killed run, when the same command is run again.

03_grpo_search.py: training resumes from the last complete checkpoint (one being written when the run was
killed is removed); the logs drop what the killed run wrote after it, since the resumed run logs those steps
again (metrics.jsonl, trajectories.jsonl, TensorBoard's events).
04_eval.py: predictions.jsonl keeps every finished question (a line torn by the kill is dropped), and the
rest is generated, provided the cell's settings.json says its predictions were made the same way.
"""

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import utils

# What a resumed run must share with the run it resumes (else it would fail deep in Trainer, or mix runs).
RUN_IDENTITY = ("model", "train_data", "retriever", "topk", "passage_max_words", "max_searches", "prompt_template",
                "dtype", "use_lora", "lora_r", "max_completion_length", "num_generations", "learning_rate", "beta",
                "loss_type")


def last_checkpoint(out_dir: Path, main_process: bool) -> tuple[str | None, int]:
    """03: the newest complete checkpoint-N and its step. Trainer writes trainer_state.json last: a folder
    without a readable one was being written when the run was killed; it is removed, an earlier one used."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    for ckpt in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            return str(ckpt), int(state["global_step"])
        except (OSError, ValueError, KeyError):
            print(f"{ckpt} is incomplete (the run was killed while writing it): skipped and removed", flush=True)
        if main_process:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None, 0


def write_atomic(path: Path, text: str) -> None:
    """A file that a kill leaves either as it was or complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_same_run(out_dir: Path, now: dict) -> None:
    """03: refuse to resume a checkpoint written with other settings (run_config.json's)."""
    path = out_dir / "run_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    before = {**saved.get("search", {}), **saved.get("grpo", {}), **saved.get("script", {})}
    diff = [f"--{k} {before[k]!r} -> {now[k]!r}" for k in RUN_IDENTITY if k in before and before[k] != now.get(k)]
    if diff:
        raise utils.ReSearchError(f"--output_dir {out_dir} holds a run with other settings ({'; '.join(diff)}); "
                                  "the same command resumes it: pick another --output_dir or delete it")


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop the lines logged after step max_step (and a line torn by the kill); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            return float("inf")

    keep = [ln for ln in lines if ln.strip() and step_of(ln) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(keep)


def truncate_logs(out_dir: Path, step: int, trainer) -> None:
    for name in ("metrics.jsonl", "trajectories.jsonl"):
        dropped = truncate_jsonl(out_dir / name, step)
        if dropped:
            print(f"{name}: dropped {dropped} lines logged after step {step}", flush=True)
    for cb in trainer.callback_handler.callbacks:  # TensorBoard forgets its events after the checkpoint too
        if type(cb).__name__ == "TensorBoardCallback":
            from torch.utils.tensorboard import SummaryWriter
            cb.tb_writer = SummaryWriter(log_dir=os.environ.get("TENSORBOARD_LOGGING_DIR", str(out_dir / "tb")),
                                         purge_step=step + 1)


def model_fingerprint(path: str) -> str:
    """04: weight files' sizes and first MiB, so a resumed evaluation never mixes two checkpoints."""
    digest = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    for file in files:
        with open(file, "rb") as f:
            digest.update(f"{file.name}:{file.stat().st_size}".encode() + f.read(1 << 20))
    return digest.hexdigest()[:16] if files else path


def read_predictions(path: Path, settings_path: Path | None = None, settings: dict | None = None) -> dict[str, dict]:
    """Finished predictions by id. A last line cut short by a kill is dropped (the file rewritten without it,
    so appending goes on cleanly); a broken line elsewhere, or a repeated id, is an error naming its line.
    With settings: the cell's settings.json must hold the same (the model's path aside)."""
    if settings_path is not None:
        old = json.loads(settings_path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k) and k != "model")
        if diff:
            raise utils.ReSearchError(f"{path.parent} holds predictions made with other settings ({', '.join(diff)}); "
                                      "pass --overwrite to replace them, or choose another --output_dir")
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines, out = text.splitlines(), {}
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise utils.ReSearchError(f"{path}:{n}: broken line ({e.msg}); fix or delete it, or --overwrite") from e
            print(f"{path}: dropping a truncated last line (interrupted run)", file=sys.stderr)
            break
        if row["id"] in out:
            raise utils.ReSearchError(f"{path}:{n}: duplicate id {row['id']!r}; use --overwrite")
        out[row["id"]] = row
    if text and (len(out) < len(lines) or not text.endswith("\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out.values()), encoding="utf-8")
        os.replace(tmp, path)
    return out
