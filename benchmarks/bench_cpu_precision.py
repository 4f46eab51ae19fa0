"""float32 vs --dtype auto (bf16 where the CPU has AMX / AVX-512 BF16) on this machine, side by side in one
run, the same seed and rows for both.

1. kernels: the pieces of a GRPO step on 4 fixed warm-up trajectories (runs/sft/trajectories.jsonl, ~650
   tokens each): the reference model's forward (float32 weights vs bf16 weights), the policy's forward +
   backward (float32 vs bf16 autocast over float32 weights), and sampling 8 rows x 128 new tokens with
   generate (float32 weights vs a bf16 copy). Median of --repeats, fp32 and bf16 interleaved.
2. grpo: the shipped CPU preset, `03_grpo_search.py --config configs/grpo_cpu.yaml --model runs/sft
   --max_steps 2`, against the same command with `--dtype float32 --bf16 false`: seconds per completion
   token of a step (the rollouts are sampled, so their lengths differ: the time per token compares them),
   split into generate and train, and the mean reward. Goal: auto <= 0.55x (done when <= 0.6x).
   --grpo_seeds 0 1 2: one back-to-back pair per seed, pooled (the sampled rollouts make one pair noisy).
3. sft: the warm-up (`02_sft_warmup.py --config configs/sft_cpu.yaml --max_steps 4`): seconds per step.
4. eval: `04_eval.py --config configs/eval_cpu.yaml --model runs/sft --methods research --limit N`: seconds
   per question and how many greedy predictions agree.

    .venv/bin/python benchmarks/bench_cpu_precision.py                 # ~25 min on 2 idle cores
    .venv/bin/python benchmarks/bench_cpu_precision.py --parts kernels   # ~3 min: the check for another CPU
Writes benchmarks/results/cpu_precision.json and .md (the machine's bf16 capabilities in its header).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from extras.precision import native_bf16  # noqa: E402

FP32 = ["--dtype", "float32", "--bf16", "false"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "sft"), help="a warmed-up checkpoint (02's output)")
    p.add_argument("--parts", default="kernels,grpo,sft,eval")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval_questions", type=int, default=16)
    p.add_argument("--grpo_seeds", type=int, nargs="+", default=[0],
                   help="one fp32 / auto pair of GRPO runs per seed, pooled (0: the issue's single pair)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_precision"))
    args = p.parse_args()
    if not (Path(args.model) / "trajectories.jsonl").is_file():
        raise utils.ReSearchError(f"--model {args.model}: no trajectories.jsonl (run 02_sft_warmup.py first)")
    return args


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(args) -> dict:
    import torch
    rows = utils.read_jsonl(Path(args.model) / "trajectories.jsonl")[:4]
    width = max(len(r["input_ids"]) for r in rows)
    tok = utils.load_tokenizer(args.model)
    ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows])
    attention = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    fp32 = utils.load_model(args.model, "float32", device="cpu")
    bf16 = utils.load_model(args.model, "bfloat16", device="cpu")

    def forward(model):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention)

    def forward_backward(autocast: bool):
        fp32.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fp32(input_ids=ids, attention_mask=attention, labels=ids).loss
        loss.backward()
        fp32.zero_grad()
        fp32.eval()

    def lm_head(autocast: bool):
        # TRL's fused LM head as GRPOTrainer runs it on a CPU: every position scored (no Triton), with
        # entropy, its backward's GEMMs accumulated in float32 (trl/kernels/chunked_logprob.py)
        from trl.kernels import ChunkedLogProbFunction
        hidden = torch.randn(ids.numel(), fp32.config.hidden_size, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps, *_ = ChunkedLogProbFunction.apply(hidden, fp32.lm_head.weight, None, ids.reshape(-1), 1.0,
                                                     32768, None, 1.0, ("log_probs", "entropy"))
        logps.sum().backward()
        fp32.zero_grad()

    def sample(model):
        torch.manual_seed(0)
        prompt = ids[:, :200].repeat(2, 1)
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128,
                           min_new_tokens=128, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           pad_token_id=tok.pad_token_id)

    out = {"rows": len(rows), "tokens_per_row": width}
    for name, run_fp32, run_bf16 in (("reference forward", lambda: forward(fp32), lambda: forward(bf16)),
                                     ("policy forward+backward", lambda: forward_backward(False),
                                      lambda: forward_backward(True)),
                                     ("TRL's LM head forward+backward", lambda: lm_head(False), lambda: lm_head(True)),
                                     ("sampling 8 x 128 tokens", lambda: sample(fp32), lambda: sample(bf16))):
        run_fp32()  # warm-up of both
        run_bf16()
        seconds_fp32 = median_seconds(run_fp32, args.repeats)
        seconds_bf16 = median_seconds(run_bf16, args.repeats)
        out[name] = {"float32_s": round(seconds_fp32, 2), "auto_s": round(seconds_bf16, 2),
                     "ratio": round(seconds_bf16 / seconds_fp32, 2)}
        print(name, out[name], flush=True)
    return out


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if p.returncode:
        raise utils.ReSearchError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def grpo_pair(args, tmp: Path, seed: int) -> dict:
    """The preset's two steps in fp32, then in auto, with this seed."""
    out = {}
    for name, extra in (("float32", FP32), ("auto", [])):
        folder = tmp / f"grpo_{name}_{seed}"
        wall = run(["03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--model", args.model,
                    "--max_steps", "2", "--output_dir", str(folder), "--save_steps", "100", "--report_to", "none",
                    "--seed", str(seed), *extra])
        steps = [m for m in utils.read_jsonl(folder / "metrics.jsonl") if "reward" in m]
        config = json.loads((folder / "run_config.json").read_text())
        rollouts = config["grpo"]["per_device_train_batch_size"]
        tokens = sum(m["search/response_length"] * rollouts for m in steps)
        out[name] = {"wall_s": round(wall, 1), "precision": config["precision"], "completion_tokens": tokens,
                     "generate_s": round(sum(m["time/generate_s"] for m in steps), 1),
                     "train_s": round(sum(m["time/train_s"] for m in steps), 1),
                     "reward": [round(m["reward"], 3) for m in steps]}
        print(f"seed {seed}", name, out[name], flush=True)
    return out


def per_token(cell: dict) -> dict:
    """Seconds per completion token of a step: all, generate, train."""
    tokens = cell["completion_tokens"]
    return {"s_per_completion_token": round((cell["generate_s"] + cell["train_s"]) / tokens, 4),
            "generate_s_per_token": round(cell["generate_s"] / tokens, 4),
            "train_s_per_token": round(cell["train_s"] / tokens, 4)}


def grpo(args, tmp: Path) -> dict:
    """One back-to-back pair per seed (rollouts are sampled, so their lengths differ: seconds per token
    compare them); the pooled figures sum seconds and tokens over the seeds."""
    pairs = {seed: grpo_pair(args, tmp, seed) for seed in args.grpo_seeds}
    out = {"seeds": {}}
    for seed, pair in pairs.items():
        ratio = per_token(pair["auto"])["s_per_completion_token"] / per_token(pair["float32"])["s_per_completion_token"]
        out["seeds"][seed] = {**pair, "ratio": round(ratio, 2)}
    for name in ("float32", "auto"):
        cells = [pair[name] for pair in pairs.values()]
        pooled = {key: round(sum(c[key] for c in cells), 1) for key in ("completion_tokens", "generate_s", "train_s")}
        pooled["reward"] = [r for c in cells for r in c["reward"]]
        out[name] = {**pooled, **per_token(pooled)}
    out["ratio"] = round(out["auto"]["s_per_completion_token"] / out["float32"]["s_per_completion_token"], 2)
    return out


def sft(args, tmp: Path) -> dict:
    out = {}
    for name, extra in (("float32", ["--bf16", "false"]), ("auto", [])):
        folder = tmp / f"sft_{name}"
        run(["02_sft_warmup.py", "--config", "configs/sft_cpu.yaml", "--max_steps", "4", "--output_dir",
             str(folder), *extra])
        result = json.loads((folder / "warmup.json").read_text())["result"]
        out[name] = {"train_s": result["train_seconds"], "steps": result["steps"],
                     "s_per_step": round(result["train_seconds"] / result["steps"], 1)}
    out["ratio"] = round(out["auto"]["s_per_step"] / out["float32"]["s_per_step"], 2)
    print("sft", out, flush=True)
    return out


def evaluate(args, tmp: Path) -> dict:
    out = {}
    predictions = {}
    for name, dtype in (("float32", "float32"), ("auto", "auto")):
        folder = tmp / f"eval_{name}"
        wall = run(["04_eval.py", "--config", "configs/eval_cpu.yaml", "--model", args.model, "--methods", "research",
                    "--limit", str(args.eval_questions), "--dtype", dtype, "--output_dir", str(folder)])
        records = utils.read_jsonl(next(folder.glob("research/*/predictions.jsonl")))
        predictions[name] = {r["id"]: r["prediction"] for r in records}
        out[name] = {"wall_s": round(wall, 1), "s_per_question": round(sum(r["seconds"] for r in records) / len(records), 2),
                     "f1": round(sum(r["f1"] for r in records) / len(records), 3)}
    same = sum(predictions["auto"][i] == p for i, p in predictions["float32"].items())
    out["identical_predictions"] = f"{same} of {len(predictions['float32'])}"
    out["ratio"] = round(out["auto"]["s_per_question"] / out["float32"]["s_per_question"], 2)
    print("eval", out, flush=True)
    return out


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; torch threads {results['torch_threads']} on CPUs {results['cpus']}; "
             f"load before the run {results['load']}.", "",
             "| what | float32 | auto | auto / float32 |", "|---|---:|---:|---:|"]
    for name, cell in results.get("kernels", {}).items():
        if isinstance(cell, dict):
            lines.append(f"| {name} (s) | {cell['float32_s']} | {cell['auto_s']} | {cell['ratio']} |")
    if "grpo" in results:
        g = results["grpo"]
        for key in ("s_per_completion_token", "generate_s_per_token", "train_s_per_token"):
            ratio = round(g["auto"][key] / g["float32"][key], 2)
            lines.append(f"| GRPO step, {key.replace('_', ' ')} | {g['float32'][key]} | {g['auto'][key]} | {ratio} |")
        lines.append(f"| GRPO mean reward per step | {g['float32']['reward']} | {g['auto']['reward']} | |")
        ratios = ", ".join(f"seed {seed}: {pair['ratio']}" for seed, pair in g.get("seeds", {}).items())
        lines.append(f"| GRPO step, s per completion token, each pair | | | {ratios} |")
    if "sft" in results:
        s = results["sft"]
        lines.append(f"| warm-up, s per step | {s['float32']['s_per_step']} | {s['auto']['s_per_step']} | {s['ratio']} |")
    if "eval" in results:
        e = results["eval"]
        lines.append(f"| evaluation (research), s per question | {e['float32']['s_per_question']} | "
                     f"{e['auto']['s_per_question']} | {e['ratio']} |")
        lines.append(f"| evaluation F1, identical predictions {e['identical_predictions']} | {e['float32']['f1']} | "
                     f"{e['auto']['f1']} | |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    import torch
    results = {"machine": native_bf16()[1], "load": os.getloadavg()[0], "model": args.model,
               "torch_threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0))}
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "kernels" in parts:
            results["kernels"] = kernels(args)
        if "grpo" in parts:
            results["grpo"] = grpo(args, Path(tmp))
        if "sft" in parts:
            results["sft"] = sft(args, Path(tmp))
        if "eval" in parts:
            results["eval"] = evaluate(args, Path(tmp))
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    utils.run_main(main)
