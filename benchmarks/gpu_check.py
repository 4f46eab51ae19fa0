"""GPU check (issue 13): the HF back end of 03_grpo_search.py on one H100/H200 in at most 8 minutes,
offline, on randomly initialised models with Qwen2.5's layer shapes and the bundled tokenizer's vocabulary.
Entry point: scripts/gpu_check.sh (it installs the carried wheels, then runs this file).

Measures, in this order (the results files are rewritten after each part, so a run stopped by its time
limit still reports what it finished):
  (c) zero gradient at retrieved positions, bf16, on the GPU: SearchGRPOTrainer from 03 (loaded as a module),
      one real search rollout through TRL's _prepare_inputs, TRL's loss, backward; the gradient reaching the
      backbone's last hidden state is exactly 0 at every retrieved token and > 0 at every model token
      (the idea of tests/test_grpo.py::test_retrieved_tokens_get_exactly_zero_gradient_through_trls_loss).
  (b) rollout tokens/s of the search loop (utils.search_rollout with utils.hf_generate_fn, plain and
      fast=True) against ONE plain batched model.generate of the same rows: every row forced to the longest
      row's model-token count and credited with the loop's N model tokens (the same accounting as
      benchmarks/bench_grpo.py), and "packed" (every row ceil(N / rows) tokens: plain generate's best case).
  (a) GRPO steps through 03_grpo_search.py as a subprocess (HF back end, --bf16 true --gradient_checkpointing
      true): 1.5B LoRA, 1.5B full fine-tuning, 7B LoRA (memory). Peak GPU memory from inside the process
      (this file's --run03 mode runs 03's main via runpy and records torch.cuda.max_memory_allocated at exit)
      and from nvidia-smi polling; step time from <output_dir>/metrics.jsonl; both set beside the README's
      memory arithmetic, for our vocabulary and for Qwen's.

A random model never writes "</search>" by itself, so every rollout here (the trainer's too, through
GRPOConfig.generation_kwargs) samples with transformers' sequence_bias: "<search>", "</search>" and EOS get
a logit bias that makes each about --p_search / --p_search / --p_eos likely per token (the rest of each tag
is forced once its first token is drawn). Everything else is the real code: the model, the search loop,
the bm25s index, TRL's trainer and loss.

    bash scripts/gpu_check.sh              # on the GPU machine (see the script for the wheels it carries)
    bash scripts/gpu_check.sh --dry-run    # the same on the CPU, tiny models, ~1-2 min (tests/test_gpu_check.py)
Writes gpu_check.json and gpu_check.md into --out ($OUT if set, else runs/gpu_check).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5's layer shapes (their config.json files). N_qwen counts Qwen's own 151,936 / 152,064-row vocabulary.
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True, qwen_vocab=151936),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, tie_word_embeddings=False, qwen_vocab=152064),
    # --dry-run stand-ins (same code paths, CPU-sized)
    "tiny-1.5b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, tie_word_embeddings=True, qwen_vocab=151936),
    "tiny-7b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=192, tie_word_embeddings=False, qwen_vocab=152064),
}
GB = 1e9


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- set-up ------------------------------------------------------------------------------------------------
def build_model(shape: str, tok, out_dir: Path, device: str) -> dict:
    """A randomly initialised Qwen2 with `shape`'s layers and the tokenizer's vocabulary, saved with the
    tokenizer as a checkpoint folder (03 takes it as --model). Built on the device in bf16 (GPU) / fp32 (CPU)."""
    import torch
    import transformers
    s = {k: v for k, v in SHAPES[shape].items() if k != "qwen_vocab"}
    cfg = transformers.Qwen2Config(vocab_size=len(tok), max_position_embeddings=32768, rope_theta=1e6,
                                   rms_norm_eps=1e-6, initializer_range=0.02, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **s)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    d, V = SHAPES[shape]["hidden_size"], len(tok)
    extra = (SHAPES[shape]["qwen_vocab"] - V) * d * (1 if SHAPES[shape]["tie_word_embeddings"] else 2)
    return {"shape": shape, "dir": str(out_dir), "params": n, "params_qwen_vocab": n + extra,
            "vocab": V, "qwen_vocab": SHAPES[shape]["qwen_vocab"], "vocab_param_shift": extra,
            "build_s": round(time.perf_counter() - t0, 1), **s}


def search_bias(tok, hidden_size: int, p_search: float, p_eos: float) -> list:
    """transformers' sequence_bias (list form, JSON-able): the first token of " <search>" and of " </search>"
    about p_search likely per sampled token, EOS about p_eos, the rest of each tag forced. A random model's
    logits (N(0, 0.02^2) head over a unit-RMS hidden state) have variance 0.02^2 * hidden: bias
    b = ln(p * V) + variance / 2 lifts one token to probability ~p."""
    var, V = 0.02 ** 2 * hidden_size, len(tok)

    def b(p):
        return round(math.log(p * V) + var / 2, 3)

    bias = []
    for tag in (" <search>", " </search>"):
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        bias.append([ids[:1], b(p_search)])
        bias += [[ids[:i], 30.0] for i in range(2, len(ids) + 1)]
    return bias + [[[tok.eos_token_id], b(p_eos)]]


def train_questions(tok, n: int) -> list[dict]:
    import utils
    qs = utils.load_questions(str(ROOT / "data" / "mini" / "train.jsonl"), limit=n)
    return [{"prompt": utils.build_prompt(q["question"], tok), "golden_answers": q["golden_answers"],
             "question_id": q["id"], "question": q["question"]} for q in qs]


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- (c) zero gradient at retrieved positions ------------------------------------------------------------------
def part_zero_grad(a, model_info: dict, tok, index_dir: str, bias: list) -> dict:
    import importlib.util

    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig

    import utils
    spec = importlib.util.spec_from_file_location("grpo_search", ROOT / "03_grpo_search.py")
    grpo = importlib.util.module_from_spec(spec)
    sys.modules["grpo_search"] = grpo  # dataclasses look their module up there
    spec.loader.exec_module(grpo)

    on_gpu = a.device == "cuda"
    sargs = utils.SearchArguments(retriever=index_dir, topk=3, passage_max_words=30, max_searches=4)
    search = utils.load_retriever(index_dir)
    res: dict = {"device": a.device, "dtype": "bfloat16", "attempts": []}
    for attempt in range(3):  # a batch with no search at all (unlikely) proves nothing: sample again
        cfg = GRPOConfig(output_dir=str(a.work / "zero_grad"), num_generations=2, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, max_completion_length=a.zero_grad_tokens, beta=0.001,
                         learning_rate=1e-5, bf16=True, use_cpu=not on_gpu, gradient_checkpointing=True,
                         report_to="none", logging_steps=1, max_steps=1, save_strategy="no", disable_dropout=True,
                         seed=attempt, generation_kwargs={"sequence_bias": bias})
        model = transformers.AutoModelForCausalLM.from_pretrained(model_info["dir"], dtype=torch.bfloat16)
        trainer = grpo.SearchGRPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(train_questions(tok, 2)),
                                         processing_class=tok, search=search, search_args=sargs, trajectory_every=0)
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)  # TRL: our rollout, reward, advantages, reference log-probs
        real = inputs["completion_mask"].bool()
        retrieved, own = real & (inputs["tool_mask"] == 0), real & (inputs["tool_mask"] == 1)
        res["attempts"].append({"retrieved_tokens": int(retrieved.sum()), "model_tokens": int(own.sum()),
                                "searches": [r.num_searches for r in trainer._rollouts]})
        if retrieved.sum() == 0:
            del trainer, model
            continue
        # random rewards are all 0 (advantages 0): give the rows non-zero advantages to see the gradient
        inputs["advantages"] = torch.tensor([1.0, -0.5, 0.75, -1.25], device=inputs["completion_ids"].device)
        grads = {}
        backbone = trainer.model.model  # TRL's head reads the backbone's last hidden state (after the norm)

        def keep_grad(module, args, out):
            out.register_hook(lambda g: grads.update(h=g))  # returns None: the output stays as it is

        handle = backbone.norm.register_forward_hook(keep_grad)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop at each step; we call the loss
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        handle.remove()
        P, C = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
        per_token = grads["h"][:, P - 1: P - 1 + C].float().abs().sum(-1)  # hidden at P-1+j -> token j's logits
        res.update(
            passed=bool(torch.all(per_token[retrieved] == 0) and torch.all(per_token[own] > 0)
                        and torch.all(per_token[~real] == 0)),
            retrieved_tokens=int(retrieved.sum()), model_tokens=int(own.sum()),
            max_abs_grad_retrieved=float(per_token[retrieved].max()), min_abs_grad_model=float(per_token[own].min()),
            hidden_grad_dtype=str(grads["h"].dtype).replace("torch.", ""),
            param_dtype=str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
            param_device=str(next(trainer.model.parameters()).device), loss=float(loss.detach()),
            searches=[r.num_searches for r in trainer._rollouts])
        break
    else:
        res["passed"] = None
        res["note"] = "no rollout searched in 3 batches: inconclusive"
    return res


# ---- (b) rollout throughput --------------------------------------------------------------------------------
def part_rollout(a, model_info: dict, tok, index_dir: str, bias: list) -> dict:
    import torch
    from transformers import GenerationConfig

    import utils
    model = utils.load_model(model_info["dir"], device=a.device)  # bf16 on a GPU, fp32 on a CPU
    search = utils.load_retriever(index_dir)
    eos = utils.eos_token_ids(tok, model.generation_config)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=sorted(eos),
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, sequence_bias=bias,
                              disable_compile=True)  # TRL's sampling settings for the HF back end, plus the bias
    prompts = [utils.encode(q["prompt"], tok) for q in train_questions(tok, a.rollout_questions)
               for _ in range(a.rollout_group)]
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)

    def plain(new_tokens: int, seed: int) -> float:
        """One batched generate, every row forced to new_tokens (no stop string, EOS held off); seconds."""
        forced = copy.deepcopy(config)
        forced.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        torch.manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=forced)
        sync()
        return time.perf_counter() - t0

    plain(8, 0)  # warm-up: kernels, cuBLAS handles, allocator
    runs = []
    for name, fast in (("search loop", False), ("search loop, fast=True", True)):
        timer = {"generate_s": 0.0, "retrieve_s": 0.0, "generate_calls": 0}

        def timed(fn, key):
            def call(*args):
                t0 = time.perf_counter()
                out = fn(*args)
                timer[key] += time.perf_counter() - t0
                if key == "generate_s":
                    timer["generate_calls"] += 1
                return out
            return call

        torch.manual_seed(1)
        generate = utils.hf_generate_fn(model, tok, config, fast=fast)
        sync()
        t0 = time.perf_counter()
        rows = utils.search_rollout(prompts, timed(generate, "generate_s"), timed(search, "retrieve_s"), tok, eos,
                                    max_completion_length=a.rollout_tokens, topk=3, max_searches=4,
                                    passage_max_words=30, max_new_tokens_per_call=a.per_call)
        sync()
        wall = time.perf_counter() - t0
        own = [sum(r.mask) for r in rows]
        n, longest = sum(own), max(own)
        same = plain(longest, 1)
        packed = plain(math.ceil(n / len(rows)), 1)
        run = {"variant": name, "fast": fast, "rows": len(rows), "model_tokens": n, "longest_row_model_tokens": longest,
               "retrieved_tokens": sum(len(r.mask) - m for r, m in zip(rows, own)),
               "searches_per_rollout": sum(r.num_searches for r in rows) / len(rows),
               "eos_rate": sum(r.ended_with_eos for r in rows) / len(rows), "generate_calls": timer["generate_calls"],
               "wall_s": round(wall, 3), "tokens_per_s": round(n / wall, 1),
               "retrieve_share": round(timer["retrieve_s"] / wall, 4),
               "plain_same_rows_s": round(same, 3), "plain_same_rows_tokens_per_s": round(n / same, 1),
               "ratio_same_rows": round(same / wall, 3),
               "plain_packed_s": round(packed, 3), "plain_packed_tokens_per_s": round(n / packed, 1),
               "ratio_packed": round(packed / wall, 3)}
        log(f"(b) {name}: {n} model tokens (longest row {longest}, {run['searches_per_rollout']:.2f} searches/row, "
            f"{run['generate_calls']} calls) in {wall:.2f}s = {run['tokens_per_s']}/s | plain generate, same rows "
            f"{same:.2f}s -> ratio {run['ratio_same_rows']} | packed {packed:.2f}s -> ratio {run['ratio_packed']}")
        runs.append(run)
    return {"model": model_info["shape"], "dtype": "bfloat16" if a.device == "cuda" else "float32",
            "max_completion_length": a.rollout_tokens, "max_new_tokens_per_call": a.per_call,
            "topk": 3, "passage_max_words": 30, "runs": runs}


# ---- (a) GRPO steps through 03 -------------------------------------------------------------------------------
class SmiPoller:
    """Highest nvidia-smi memory.used (MiB) while it runs; None without nvidia-smi."""

    def __init__(self):
        self.peak, self.proc = None, None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "250"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                v = float(line.strip())
            except ValueError:
                continue
            self.peak = v if self.peak is None else max(self.peak, v)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        return self.peak


def smi_used_mib():
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout
    return float(out.split()[0]) if out.strip() else None


def lora_params(shape: str, r: int) -> int:
    """LoRA r on every linear layer of the decoder (PEFT's all-linear leaves the LM head out): r*(in+out) each."""
    s = SHAPES[shape]
    d, i, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + i) * 3)  # q, o; k, v; gate, up, down
    return per_layer * s["num_hidden_layers"]


def predicted_bytes(n: int, mode: str, adapter: int) -> float:
    """README's arithmetic without vLLM (this check runs the HF back end): full FT fp32 master weights 4N +
    grads 4N + AdamW 8N + reference model 4N = 20N; LoRA bf16 base 2N + adapter (fp32 weight, grad, AdamW:
    16 bytes each); the reference is the base with the adapter off. Before activations and workspace."""
    return 20 * n if mode == "full" else 2 * n + 16 * adapter


def run03(a, name: str, model_info: dict, mode: str, index_dir: str, bias: list, timeout: float) -> dict:
    out = a.work / f"grpo_{name}"
    shutil.rmtree(out, ignore_errors=True)
    mem_file = a.work / f"mem_{name}.json"
    mem_file.unlink(missing_ok=True)
    flags = ["--model", model_info["dir"], "--train_data", "data/mini/train.jsonl", "--retriever", index_dir,
             "--output_dir", str(out), "--max_steps", str(a.steps), "--num_generations", "4",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--max_completion_length", str(a.grpo_tokens), "--max_new_tokens_per_call", str(a.per_call),
             "--topk", "3", "--passage_max_words", "30", "--max_searches", "4",
             "--bf16", "true", "--gradient_checkpointing", "true", "--learning_rate", "1e-5",
             "--use_lora", "true" if mode == "lora" else "false", "--lora_r", "64", "--lora_alpha", "128",
             "--trajectory_every", "0", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
             "--seed", "0", "--generation_kwargs", json.dumps({"sequence_bias": bias})]
    if a.device == "cpu":
        flags += ["--use_cpu", "true"]
    if mode == "lora" and "merge_lora" in (ROOT / "03_grpo_search.py").read_text():
        flags += ["--merge_lora", "false"]  # write the adapter, not a merged 7B copy (15 GB of disk and time)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run03", str(mem_file), "--", *flags]
    baseline = smi_used_mib()
    poller = SmiPoller()
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, tail = p.returncode, (p.stdout[-1500:] + "\n" + p.stderr[-2500:])
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"killed after {timeout:.0f}s\n" + str(e.stderr or "")[-2500:]
    wall = time.perf_counter() - t0
    smi_peak = poller.stop()
    mem = json.loads(mem_file.read_text()) if mem_file.is_file() else {}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "step_time" in m or "time/train_s" in m]
    n = model_info["params"]
    adapter = lora_params(model_info["shape"], 64) if mode == "lora" else 0
    res = {"name": name, "model": model_info["shape"], "mode": mode, "rc": rc, "wall_s": round(wall, 1),
           "command": "python 03_grpo_search.py " + " ".join(flags),
           "params": n, "params_qwen_vocab": model_info["params_qwen_vocab"], "lora_params": adapter,
           "predicted_gb": round(predicted_bytes(n, mode, adapter) / GB, 2),
           "predicted_gb_qwen_vocab": round(predicted_bytes(model_info["params_qwen_vocab"], mode, adapter) / GB, 2),
           "peak_allocated_gb": round(mem["max_allocated"] / GB, 2) if mem.get("max_allocated") else None,
           "peak_reserved_gb": round(mem["max_reserved"] / GB, 2) if mem.get("max_reserved") else None,
           "nvidia_smi_peak_gb": round((smi_peak - (baseline or 0)) * 2**20 / GB, 2) if smi_peak else None,
           "max_rss_gb": round(mem["max_rss_mb"] * 2**20 / GB, 2) if mem.get("max_rss_mb") else None,
           "steps": [{k: m.get(k) for k in ("step", "step_time", "time/generate_s", "time/retrieve_s", "time/train_s",
                                            "search/searches_per_rollout", "search/response_length",
                                            "completions/mean_length", "kl") if k in m} for m in steps]}
    if rc != 0:
        res["log_tail"] = tail
    log(f"(a) {name}: rc {rc}, {wall:.0f}s, peak allocated {res['peak_allocated_gb']} GB (predicted before "
        f"activations {res['predicted_gb']} GB), nvidia-smi {res['nvidia_smi_peak_gb']} GB, steps "
        f"{[round(s.get('step_time', 0), 2) for s in res['steps']]}")
    shutil.rmtree(out, ignore_errors=True)  # the final model (up to 6 GB) is not needed
    return res


def run03_in_process(mem_file: str, argv: list[str]) -> None:
    """--run03: 03's main in this process (runpy), then its peak GPU memory to mem_file."""
    import runpy

    import torch
    os.chdir(ROOT)
    sys.argv = [str(ROOT / "03_grpo_search.py"), *argv]
    rc = 1
    try:
        runpy.run_path(str(ROOT / "03_grpo_search.py"), run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        stats = {"rc": rc, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            stats.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved())
        Path(mem_file).write_text(json.dumps(stats))
    sys.exit(rc)


# ---- report ------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch
    env = {"python": platform.python_version(), "device": device, "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
           "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / GB, 1) if device == "cuda" else None,
           "cpu_count": os.cpu_count()}
    for pkg in ("transformers", "trl", "peft", "accelerate", "datasets", "bm25s"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x) if isinstance(x, (int, float)) else str(x)


def markdown(res: dict) -> str:
    e = res["environment"]
    out = [f"# GPU check ({'DRY RUN on the CPU, tiny models' if res['dry_run'] else 'GPU'})", "",
           f"{e.get('gpu') or 'CPU'}; torch {e['torch']} (CUDA {e['cuda']}), transformers {e['transformers']}, "
           f"trl {e['trl']}, peft {e['peft']}; Python {e['python']}; started {res['started']}, "
           f"{res.get('elapsed_s', '-')} s in all. Command: `{res['command']}`", ""]
    if "models" in res:
        out += ["Models (random weights, Qwen2.5 layer shapes, the bundled tokenizer's vocabulary):", ""]
        for m in res["models"].values():
            out.append(f"- {m['shape']}: {m['params'] / 1e9:.3f}B parameters with the {m['vocab']:,}-token vocabulary; "
                       f"{m['params_qwen_vocab'] / 1e9:.3f}B with Qwen's {m['qwen_vocab']:,} "
                       f"(embedding{' (tied)' if m['tie_word_embeddings'] else ' + LM head'}: "
                       f"{m['vocab_param_shift'] / 1e6:.0f}M more = ({m['qwen_vocab']:,} - {m['vocab']:,}) x "
                       f"{m['hidden_size']}{'' if m['tie_word_embeddings'] else ' x 2'})")
        out.append("")
    for key, title in (("zero_grad", "(c) Zero gradient at retrieved positions"), ("rollout", "(b) Rollout throughput")):
        if "error" in res.get(key, {}):
            out += [f"## {title}: FAILED", "", "```", res[key]["error"], "```", ""]
    z = res.get("zero_grad")
    if z and "error" not in z:
        out += ["## (c) Zero gradient at retrieved positions", "",
                f"{'PASSED' if z.get('passed') else 'FAILED' if z.get('passed') is False else 'INCONCLUSIVE'}: "
                f"{z.get('retrieved_tokens', 0)} retrieved tokens, max |grad| {f(z.get('max_abs_grad_retrieved'), '{:g}')}; "
                f"{z.get('model_tokens', 0)} model tokens, min |grad| {f(z.get('min_abs_grad_model'), '{:.3g}')} "
                f"(sum over the hidden dimension of the gradient at the backbone's last hidden state). Weights "
                f"{z.get('param_dtype')} on {z.get('param_device')}, hidden-state gradient {z.get('hidden_grad_dtype')}, "
                f"bf16=True, gradient checkpointing; searches per row {z.get('searches')}.", ""]
    r = res.get("rollout")
    if r and "error" not in r:
        out += ["## (b) Rollout throughput: search loop vs one plain batched generate", "",
                f"{r['model']} ({r['dtype']}), {r['runs'][0]['rows']} rows, max_completion_length "
                f"{r['max_completion_length']}, max_new_tokens_per_call {r['max_new_tokens_per_call']}, top-{r['topk']} "
                f"passages of {r['passage_max_words']} words. \"Same rows\": one generate with every row forced to the "
                "loop's longest row, credited with the loop's N model tokens; \"packed\": every row N/rows tokens.", "",
                "| variant | model tokens N | longest row | retrieved tokens | searches/row | generate calls | wall s | "
                "tokens/s | plain same rows tokens/s | loop / plain | loop / packed | retrieval share |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["runs"]:
            out.append(f"| {x['variant']} | {x['model_tokens']} | {x['longest_row_model_tokens']} | {x['retrieved_tokens']} | "
                       f"{x['searches_per_rollout']:.2f} | {x['generate_calls']} | {x['wall_s']:.2f} | {x['tokens_per_s']} | "
                       f"{x['plain_same_rows_tokens_per_s']} | {x['ratio_same_rows']:.2f} | {x['ratio_packed']:.2f} | "
                       f"{100 * x['retrieve_share']:.1f}% |")
        out.append("")
    if res.get("grpo"):
        out += ["## (a) GRPO steps through 03_grpo_search.py (HF back end, bf16, gradient checkpointing)", "",
                f"{res['steps']} steps, 1 question x group 4 per step, micro-batch 2, max_completion_length "
                f"{res['grpo_tokens']} (model + retrieved), LoRA r 64 / alpha 128 on all linear layers. Predicted = the "
                "README's arithmetic without vLLM (this is the HF back end), before activations and workspace: full FT "
                "20N (fp32 weights 4N + grads 4N + AdamW 8N + fp32 reference 4N), LoRA 2N (bf16 base; the reference "
                "is the base with the adapter off) + 16 bytes per adapter parameter. The Qwen-vocabulary column is the "
                "same arithmetic with Qwen's embedding rows: LoRA +2 bytes, full FT +20 bytes per extra parameter. (The "
                "README's 22N and 4.3N add vLLM's colocated bf16 copy, 2N, which this back end does not have; its "
                "~0.3N for the adapter is 16 bytes x r-64 adapter parameters, 2.1% of Qwen2.5-7B.)", "",
                "| run | N | predicted GB | with Qwen's vocab GB | peak allocated GB | peak reserved GB | nvidia-smi peak GB "
                "| step 1 s | later steps s (generate / train) | searches/row | rc |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for x in res["grpo"]:
            st = x["steps"]
            later = ", ".join(f"{f(s.get('step_time'))} ({f(s.get('time/generate_s'))} / {f(s.get('time/train_s'))})"
                              for s in st[1:]) or "-"
            srch = ", ".join(f(s.get("search/searches_per_rollout")) for s in st) or "-"
            out.append(f"| {x['name']} | {x['params'] / 1e9:.3f}B | {x['predicted_gb']} | {x['predicted_gb_qwen_vocab']} | "
                       f"{f(x['peak_allocated_gb'])} | {f(x['peak_reserved_gb'])} | {f(x['nvidia_smi_peak_gb'])} | "
                       f"{f(st[0].get('step_time') if st else None)} | {later} | {srch} | {x['rc']} |")
        out += ["", "Peak allocated minus predicted = activations (gradient checkpointing: one hidden state per "
                "layer per token), the logits/log-prob work of TRL's loss, the rollout's KV cache and temporaries. "
                "With Qwen's vocabulary the logits per token are ~3x wider too (fp32 151,936 x 4 bytes = 0.6 MB "
                "per token where they are materialised)."]
        for x in res["grpo"]:
            if x["rc"] != 0:
                out += ["", f"### {x['name']} failed (rc {x['rc']})", "", "```", x.get("log_tail", "")[-3000:], "```"]
    if res.get("skipped"):
        out += ["", "Skipped (time budget): " + ", ".join(res["skipped"])]
    return "\n".join(out) + "\n"


def write(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(res))


# ---- main --------------------------------------------------------------------------------------------------
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 1 step, short completions")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--work", default=None, help="models and run folders (default: <repo>/runs/gpu_check_work)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled model's, or the "
                   "carried runs/gpu_carry/tokenizer)")
    p.add_argument("--index_dir", default=str(ROOT / "runs" / "index_mini"))
    p.add_argument("--deadline_s", type=float, default=None,
                   help="everything ends by then (a 03 run is killed at it); no part starts in its last minute "
                        "(GPU 440, --dry-run 280)")
    p.add_argument("--parts", default="zero_grad,rollout,grpo", help="comma list of zero_grad, rollout, grpo")
    p.add_argument("--p_search", type=float, default=1 / 50)
    p.add_argument("--p_eos", type=float, default=1 / 300)
    p.add_argument("--run03", default=None, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    return a, [x for x in rest if x != "--"]


def main():
    a, rest = parse_args()
    if a.run03:
        run03_in_process(a.run03, rest)
        return
    import torch
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    a.device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch (use --dry-run for the CPU rehearsal)")
    dry = a.dry_run
    a.deadline_s = a.deadline_s or (280 if dry else 440)
    a.steps = 1 if dry else 3
    a.grpo_tokens = 24 if dry else 256
    a.rollout_tokens, a.rollout_questions, a.rollout_group = (32, 2, 2) if dry else (512, 4, 4)
    a.per_call = 8 if dry else 64
    a.zero_grad_tokens = 64 if dry else 128
    a.work = Path(a.work or ROOT / "runs" / "gpu_check_work").resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out)
    tok_dir = a.tokenizer or next((str(p) for p in (ROOT / "models" / "SmolLM2-135M-Instruct",
                                                    ROOT / "runs" / "gpu_carry" / "tokenizer")
                                   if (p / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        sys.exit("gpu_check: no tokenizer: run `make setup`, or carry runs/gpu_carry (scripts/gpu_check.sh --prepare)")
    import utils
    tok = utils.load_tokenizer(tok_dir)
    res = {"dry_run": dry, "started": started, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "environment": environment(a.device), "steps": a.steps, "grpo_tokens": a.grpo_tokens,
           "p_search": a.p_search, "p_eos": a.p_eos, "skipped": []}
    log(f"{res['environment']}")

    def over_budget(part: str) -> bool:
        if time.perf_counter() - t_start > a.deadline_s - 60:
            res["skipped"].append(part)
            log(f"skipping {part}: less than a minute left before the {a.deadline_s:.0f}s deadline")
            return True
        return False

    # the mini index, as the README builds it (kept when already up to date)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "01_build_index.py", "--corpus", "data/mini/corpus.jsonl", "--index_dir",
                    a.index_dir], cwd=ROOT, check=True)
    res["index"] = {"dir": a.index_dir, "seconds": round(time.perf_counter() - t0, 1)}
    small, big = ("tiny-1.5b", "tiny-7b") if dry else ("qwen2.5-1.5b", "qwen2.5-7b")
    parts = a.parts.split(",")
    res["models"] = {small: build_model(small, tok, a.work / small, a.device)}
    log(f"built {small}: {res['models'][small]}")
    bias = search_bias(tok, SHAPES[small]["hidden_size"], a.p_search, a.p_eos)
    res["sequence_bias"] = bias
    write(res, out_dir)

    def guarded(key: str, fn, *args):
        """One in-process part; an exception is recorded and the next part still runs."""
        try:
            res[key] = fn(*args)
        except Exception:  # noqa: BLE001 - the report says what broke; the other parts go on
            res[key] = {"error": traceback.format_exc()[-3000:]}
            log(f"{key} FAILED:\n{res[key]['error']}")
        gc.collect()  # the part's models and trainer: off the GPU before the next part
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write(res, out_dir)

    if "zero_grad" in parts and not over_budget("zero_grad"):
        guarded("zero_grad", part_zero_grad, a, res["models"][small], tok, a.index_dir, bias)
        log(f"(c) zero gradient at retrieved positions: {res['zero_grad']}")
    if "rollout" in parts and not over_budget("rollout"):
        guarded("rollout", part_rollout, a, res["models"][small], tok, a.index_dir, bias)
    if "grpo" in parts:
        res["grpo"] = []
        plan = [(f"{small} LoRA", small, "lora"), (f"{small} full FT", small, "full"), (f"{big} LoRA", big, "lora")]
        for name, shape, mode in plan:
            if over_budget(name):
                continue
            if shape not in res["models"]:
                shutil.rmtree(a.work / small, ignore_errors=True)  # disk: the small model is done with
                res["models"][shape] = build_model(shape, tok, a.work / shape, a.device)
                log(f"built {shape}: {res['models'][shape]}")
            left = a.deadline_s - (time.perf_counter() - t_start)
            sbias = search_bias(tok, SHAPES[shape]["hidden_size"], a.p_search, a.p_eos)
            res["grpo"].append(run03(a, name.replace(" ", "_"), res["models"][shape], mode, a.index_dir, sbias,
                                     timeout=left))
            write(res, out_dir)
    res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write(res, out_dir)
    shutil.rmtree(a.work, ignore_errors=True)
    print(markdown(res), flush=True)
    log(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'} in {res['elapsed_s']}s")
    ok = (all("error" not in res.get(k, {}) for k in ("zero_grad", "rollout"))
          and res.get("zero_grad", {}).get("passed") is not False and all(x["rc"] == 0 for x in res.get("grpo", [])))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
