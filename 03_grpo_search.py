"""Stage 3: GRPO that teaches a model to search (ReSearch, Chen et al. 2025).

For every training question the policy samples a group of --num_generations rollouts. A rollout is
the model's own text with Wikipedia result blocks spliced in: generation pauses at </search>, the
query goes to the retriever, " <result>\\n...\\n</result>" is appended as token ids, generation resumes
(utils.search_rollout: the same loop the warm-up and the evaluation run). The reward is
utils.compute_reward on the model's own text (utils.reward_text: result contents blanked): 0 for a bad
format or no EOS, else answer F1, or 0.1 when the format is right and the answer wrong. The loss is
TRL's GRPO with the retrieved tokens masked out of the policy-gradient term, the KL and the entropy;
they stay in the context the model attends to.

SearchGRPOTrainer(GRPOTrainer) changes only the rollout. TRL's _generate calls self.rollout_func
when one is set; we set it to our search loop, whose mask becomes TRL's tool_mask, so TRL's
loss_mask = completion_mask * tool_mask. Advantages (group-normalised), clipping, the KL (TRL's is the
k3 estimator, the paper's "low_var_kl"), checkpoints and logging are TRL's own.

Generation back ends, one flag (TRL's own): --use_vllm false = Hugging Face generate on the policy
(CPU or GPU, inside TRL's unwrap_model_for_generation); --use_vllm true = vLLM (GPU), --vllm_mode
colocate (same GPU) or server (`trl vllm-serve --model M` on other GPUs), with stop "</search>" kept
in the output; a paused row continues by resubmitting prompt + completion ids. Same token layout and
mask either way. vLLM also returns sampling log-probs for TRL's importance-sampling correction. The HF
back end keeps its KV cache across the rollout's turns (only result blocks are prefilled), and
--max_new_tokens_per_call bounds how long rows paused at </search> wait for the slowest row.

Reads:  --model (hub id or local checkpoint, e.g. runs/sft from 02_sft_warmup.py), --train_data
        (FlashRAG jsonl, or "musique" etc. from the hub), --retriever (index folder or server URL).
Writes: --output_dir (default runs/grpo):
        checkpoint-N/        every --save_steps; running the same command again resumes from the last
        config.json, model.safetensors, tokenizer files   the final policy (LoRA merged), usable as
                             --model by 04_eval.py; written last, config.json last of all
        run_config.json      model, data, retriever, top-k, every setting
        metrics.jsonl        one line per logging step (reward, F1, format rate, searches, lengths,
                             retrieved-token fraction, time split generate / retrieve / train)
        trajectories.jsonl   sample rollouts every --trajectory_every steps
        tb/                  TensorBoard events (--report_to tensorboard; wandb works too)
        training_curves.png  at the end, and by --plot

Commands
  CPU, bundled SmolLM2-135M-Instruct after the warm-up, mini-Wikipedia (~5 min on 2 cores):
    python 03_grpo_search.py --config configs/grpo_cpu.yaml --model runs/sft
  One A100 80 GB, Qwen2.5-7B-Instruct + LoRA, vLLM colocate (memory arithmetic in the preset):
    python 03_grpo_search.py --config configs/grpo_a100.yaml --retriever http://127.0.0.1:8000
  8 GPUs, full fine-tuning of Qwen2.5-7B with ZeRO-3 on 6 and a vLLM server on 2 (README "Scale-out";
  start `trl vllm-serve` and the retrieval server first, commands in the preset):
    accelerate launch --config_file configs/deepspeed_zero3.yaml --num_processes 6 03_grpo_search.py \\
        --config configs/grpo_8gpu.yaml
  The paper's scale, 64 GPUs: configs/grpo_paper.yaml. With several processes every rank's rollout
  runs in lock-step (one generate call per turn on every rank: utils.search_rollout's any_rank_active).
  CPU check of that path, two gloo processes:
    accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 2 --mixed_precision no \\
        03_grpo_search.py --config configs/grpo_cpu.yaml --use_cpu true --max_steps 2
  Curves (reward, searches per rollout, response length over steps) to <run>/training_curves.png:
    python 03_grpo_search.py --plot runs/grpo
Resume: run the same command again; metrics.jsonl, trajectories.jsonl and TensorBoard drop what was
logged after the checkpoint and continue from it (other model, data or search settings: refused).
To start over, delete --output_dir or pick another.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from trl import GRPOTrainer

import utils


# ---------------------------------------------------------------------------------------------
# Arguments. Every GRPOConfig field is a flag too (--learning_rate, --num_generations, --beta, ...);
# main() sets the paper's values as their defaults.
# ---------------------------------------------------------------------------------------------
@dataclass
class GRPOSearchArguments:
    model: str = utils.DEFAULT_MODEL
    """Policy to train: a hub id or a local checkpoint (runs/sft after the warm-up; default: the
    bundled SmolLM2-135M-Instruct)."""
    train_data: str = "musique"
    """Training questions: a FlashRAG jsonl (data/mini/train.jsonl on the CPU), or a FlashRAG dataset
    name loaded from the hub (musique = the paper's training set, 19,938 questions; needs internet)."""
    train_split: str = "train"
    """Split to load when --train_data is a hub dataset name."""
    max_train_questions: int = 0
    """Use only the first N questions (0 = all)."""
    max_prompt_length: int = 512
    """Questions whose prompt is longer than this many tokens are dropped and counted (paper: 512)."""
    dtype: str = "auto"
    """Weights dtype: auto = float32 on the CPU (bf16 there is ~4x slower); on a GPU bfloat16 for a
    frozen LoRA base, float32 master weights for full fine-tuning (with --bf16 autocast: a 1e-6 step
    vanishes in bf16 weights)."""
    use_lora: bool = False
    """Train a LoRA adapter instead of all weights; the reference policy is then the base model with
    the adapter disabled (no second copy in memory)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: "all-linear" or a comma-separated list (e.g. q_proj,v_proj)."""
    merge_lora: bool = True
    """Save the final model with the adapter merged in (a plain checkpoint for 04_eval.py)."""
    max_new_tokens_per_call: int = 0
    """Rollout scheduling: one generate call makes at most this many tokens per row, so rows that
    paused at </search> wait at most this long for the slowest row (0 = until every row stopped).
    Only the timing changes, never what is sampled."""
    trajectory_every: int = 1
    """Append sample rollouts to <output_dir>/trajectories.jsonl at step 1 and every N steps (0 = never)."""
    trajectory_samples: int = 16
    """Rollouts written per sampled step, whole groups first (0 = the whole generation batch)."""
    plot: str = ""
    """Instead of training: draw the curves of this run folder (its metrics.jsonl) to
    <folder>/training_curves.png and exit."""


# ---------------------------------------------------------------------------------------------
# The trainer: TRL's GRPO with the search rollout
# ---------------------------------------------------------------------------------------------
class SearchGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose completions are ReSearch rollouts (see the module docstring)."""

    def __init__(self, *, search: utils.SearchFn, search_args: utils.SearchArguments,
                 trajectory_every: int = 1, trajectory_samples: int = 16, max_new_tokens_per_call: int = 0,
                 **kwargs):
        self.search_fn, self.search_args = search, search_args
        self.max_new_tokens_per_call = max_new_tokens_per_call
        self.trajectory_every, self.trajectory_samples = trajectory_every, trajectory_samples
        self._rollouts: list[utils.Rollout] = []  # the latest batch, for trajectories.jsonl
        self._scores: list[dict] = []             # their compute_reward() results
        self._rollout_s = self._step_s = 0.0      # for the train-time share of each step
        args = kwargs["args"]
        if args.use_vllm:  # vLLM pauses a row at </search> and keeps the stop string in the output
            args.generation_kwargs = {**(args.generation_kwargs or {}), "stop": [utils.SEARCH_CLOSE],
                                      "include_stop_str_in_output": True}
        super().__init__(reward_funcs=[self.research_reward], **kwargs)
        # TRL's _generate calls rollout_func(prompts, trainer) instead of its single-turn generate
        # and keeps doing the rest (vLLM weight sync, decoding, length metrics, "env_mask" -> tool_mask).
        self.rollout_func = self.search_rollout
        # Several processes (accelerate launch): keep every rank's rollout in lock-step, one generate call
        # per turn on every rank, because ZeRO-3 gathers parameters inside each forward and vLLM server /
        # tensor-parallel generation gathers prompts: a rank that stopped calling would hang the others.
        self.any_rank_active = self.any_rank_active_fn if self.accelerator.num_processes > 1 else None

    def any_rank_active_fn(self, local: bool) -> bool:
        """utils.search_rollout's lock-step hook: "this rank still has rows generating" -> "some rank has"."""
        flags = self.accelerator.gather(torch.tensor([float(local)], device=self.accelerator.device))
        return bool(flags.sum().item() > 0)

    # -- the rollout ------------------------------------------------------------------------------
    def search_rollout(self, prompts: list[str], trainer=None) -> dict:
        """TRL's rollout_func. prompts = the rendered prompt texts, each already repeated
        --num_generations times by TRL's sampler: one rollout per row, in order."""
        tok = self.processing_class
        prompt_ids = [utils.encode_prompt(p, tok) for p in prompts]
        s, timings = self.search_args, {}
        t0 = time.perf_counter()
        with self.generation_backend() as generate:
            rollouts = utils.search_rollout(
                prompt_ids, generate, self.search_fn, tok, set(self.eos_token_ids),
                max_completion_length=self.max_completion_length, topk=s.topk, max_searches=s.max_searches,
                passage_max_words=s.passage_max_words, timings=timings,
                max_new_tokens_per_call=self.max_new_tokens_per_call, any_rank_active=self.any_rank_active)
        self._rollout_s += time.perf_counter() - t0
        self._rollouts = rollouts
        self._log_mean("time/generate_s", [timings["generate_s"]])
        self._log_mean("time/retrieve_s", [timings["retrieve_s"]])
        if self.any_rank_active is not None:  # turns a rank spent waiting for the others (lock-step)
            self._log_mean("search/idle_generate_calls", [timings["idle_calls"]])
        self._log_mean("search/searches_per_rollout", [r.num_searches for r in rollouts])
        self._log_mean("search/response_length", [len(r.completion_ids) for r in rollouts])
        self._log_mean("search/retrieved_token_frac", [r.num_retrieved_tokens for r in rollouts],
                       count=sum(len(r.completion_ids) for r in rollouts))
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "completion_ids": [r.completion_ids for r in rollouts],
            "logprobs": [r.logprobs for r in rollouts] if self.use_vllm else None,
            "env_mask": [r.mask for r in rollouts],  # 1 = model token, 0 = retrieved (no loss, still attended)
            # any other key reaches the reward function as a keyword argument, one value per row
            "reward_text": [utils.reward_text(r, tok) for r in rollouts],
            "ended_with_eos": [r.ended_with_eos for r in rollouts],
        }

    @contextlib.contextmanager
    def generation_backend(self):
        """Yields the rollout's generate function (a utils.GenerateFn)."""
        if self.use_vllm:
            yield self.vllm_generate
            return
        from trl.models import unwrap_model_for_generation
        # As TRL's own generate path: unwrapped (DDP/ZeRO-3 gathered), gradient checkpointing off,
        # TRL's generation config (temperature, top_p, top_k, eos ids, ...) in force.
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            yield utils.hf_generate_fn(model, self.processing_class, generation_config=self.generation_config)

    def vllm_generate(self, contexts: list[list[int]], max_new_tokens: int):
        """utils.GenerateFn over TRL's vLLM engine (colocate: in this process; server: its client).
        Each context (prompt + completion so far) is one prompt with one sample; returns the new ids and
        their sampling log-probs."""
        from trl.extras.profiling import profiling_context
        vg, n = self.vllm_generation, len(contexts)
        if self.accelerator.num_processes > 1:
            # TRL's server mode (and colocate with tensor parallelism) gathers every rank's prompts, runs
            # them with ONE max_tokens and hands rank r back rows [r*n, (r+1)*n): every rank must send the
            # same number of contexts and budget. Pad with copies of the first context; drop their output.
            sizes = self.accelerator.gather(torch.tensor([n, max_new_tokens], device=self.accelerator.device))
            width, max_new_tokens = sizes.view(-1, 2).max(0).values.tolist()
            contexts = contexts + [contexts[0]] * (width - n)
        vg.max_completion_length = max_new_tokens  # this turn's budget; the loop trims each row to its own
        _, ids, logprobs, _ = vg.generate(prompts=contexts, images=None, num_generations=1,
                                          profiler=profiling_context(self, "vLLM.generate"))
        return [list(x) for x in ids][:n], [[lp[0] for lp in seq] for seq in logprobs][:n]

    # -- the reward --------------------------------------------------------------------------------
    def research_reward(self, prompts, completions, reward_text, ended_with_eos, golden_answers, **kwargs):
        """ReSearch's reward on the model's own text (completions include the result blocks, so they are
        not read). Keeps the details for the metrics and trajectories.jsonl."""
        self._scores = [utils.compute_reward(t, g, e) for t, g, e in zip(reward_text, golden_answers, ended_with_eos)]
        self._log_mean("search/f1", [s["f1"] for s in self._scores])
        self._log_mean("search/em", [s["em"] for s in self._scores])
        self._log_mean("search/format_ok", [s["format_ok"] for s in self._scores])
        return [s["reward"] for s in self._scores]

    # -- logging -----------------------------------------------------------------------------------
    def _log_mean(self, name: str, values: list, count: int | None = None):
        """Append sum(values) / count over all processes (count defaults to len(values)) to TRL's metrics,
        which averages them again over each logging window."""
        local = torch.tensor([float(sum(values)), float(len(values) if count is None else count)],
                             device=self.accelerator.device)
        total, n = self.accelerator.gather(local).view(-1, 2).sum(0).tolist()
        self._metrics["train" if self.model.training else "eval"][name].append(total / max(n, 1.0))

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        step = self.state.global_step + 1  # the optimizer step these rollouts are for
        every = self.trajectory_every
        if self.model.training and every and (step == 1 or step % every == 0) and self.accelerator.is_main_process:
            self._write_trajectories(step, inputs, out["advantages"].tolist())
        return out

    def _write_trajectories(self, step: int, inputs: list[dict], advantages: list[float]):
        tok, n = self.processing_class, self.trajectory_samples or len(self._rollouts)
        lines = []
        for r, s, x, adv in list(zip(self._rollouts, self._scores, inputs, advantages))[:n]:
            lines.append(json.dumps({
                "step": step, "question_id": x.get("question_id"), "question": x.get("question"),
                "golden_answers": x["golden_answers"], "prompt": x["prompt"],
                "completion": tok.decode(r.completion_ids, skip_special_tokens=True),
                "reward": s["reward"], "f1": s["f1"], "em": s["em"], "format_ok": s["format_ok"],
                "prediction": s["prediction"], "ended_with_eos": r.ended_with_eos, "advantage": adv,
                "num_searches": r.num_searches, "queries": r.queries, "num_model_tokens": r.num_model_tokens,
                "num_retrieved_tokens": r.num_retrieved_tokens}, ensure_ascii=False))
        with open(Path(self.args.output_dir) / "trajectories.jsonl", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def training_step(self, model, inputs, num_items_in_batch):
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_s += time.perf_counter() - t0
        if self._step % self.current_gradient_accumulation_steps == 0:  # TRL's own step-boundary test
            # train = everything in the step but the rollout: reference/old log-probs, reward, fwd + bwd
            self._metrics["train"]["time/train_s"].append(self._step_s - self._rollout_s)
            self._step_s = self._rollout_s = 0.0
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)  # TRL adds its averaged metrics to logs, then HF logs them
        if not self.accelerator.is_main_process:
            return
        row = {"step": self.state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        with open(Path(self.args.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if "reward" in logs:
            tqdm.write(summary_line(row, self.state.max_steps), file=sys.stderr)  # above the progress bar


def summary_line(m: dict, max_steps: int) -> str:
    g = lambda k, fmt="{:.2f}": fmt.format(m[k]) if isinstance(m.get(k), (int, float)) else "-"  # noqa: E731
    return (f"step {m['step']}/{max_steps} | reward {g('reward')} ± {g('reward_std')} | F1 {g('search/f1')} | "
            f"format ok {g('search/format_ok')} | searches {g('search/searches_per_rollout')} | "
            f"length {g('completions/mean_length', '{:.0f}')} model + retrieved -> "
            f"{g('search/response_length', '{:.0f}')} | "
            f"time generate {g('time/generate_s', '{:.0f}')}s retrieve {g('time/retrieve_s', '{:.1f}')}s "
            f"train {g('time/train_s', '{:.0f}')}s")


# ---------------------------------------------------------------------------------------------
# Data, model, outputs
# ---------------------------------------------------------------------------------------------
def load_prompts(args: GRPOSearchArguments, sargs: utils.SearchArguments, tok):
    """The training set: one row per question with the rendered prompt (chat template or base prompt,
    as in every stage) and its gold answers."""
    from datasets import Dataset
    questions = utils.load_questions(args.train_data, split=args.train_split, limit=args.max_train_questions or None)
    rows, too_long = [], 0
    for q in questions:
        prompt = utils.build_prompt(q["question"], tok, sargs.prompt_template)
        if len(utils.encode_prompt(prompt, tok)) > args.max_prompt_length:
            too_long += 1
            continue
        rows.append({"prompt": prompt, "golden_answers": q["golden_answers"], "question_id": q["id"],
                     "question": q["question"]})
    if not rows:
        raise utils.ReSearchError(f"--train_data {args.train_data}: no question fits --max_prompt_length "
                                  f"{args.max_prompt_length}")
    return Dataset.from_list(rows), too_long


def load_policy(args: GRPOSearchArguments):
    import transformers
    if args.dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and args.use_lora else "float32"
    else:
        dtype = args.dtype
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(utils.resolve_model(args.model),
                                                                 dtype=getattr(torch, dtype))
    except (OSError, AttributeError) as e:
        raise utils.ReSearchError(f"cannot load --model {args.model!r} as {dtype}: {e}") from e


def lora_config(args: GRPOSearchArguments):
    if not args.use_lora:
        return None
    from peft import LoraConfig
    targets = args.lora_target_modules
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])


def last_checkpoint(out_dir: Path) -> tuple[str | None, int]:
    """The newest checkpoint-N in out_dir and the step it was saved at (None, 0 when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint
    ckpt = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if ckpt is None:
        return None, 0
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    return ckpt, int(state["global_step"])


RUN_IDENTITY = ("model", "train_data", "retriever", "topk", "passage_max_words", "max_searches", "prompt_template",
                "max_completion_length", "num_generations")


def run_identity(args, sargs, targs) -> dict:
    """The settings a resumed run must share with the run it resumes."""
    merged = {**asdict(args), **asdict(sargs), "max_completion_length": targs.max_completion_length,
              "num_generations": targs.num_generations}
    return {k: merged[k] for k in RUN_IDENTITY}


def check_same_run(out_dir: Path, args, sargs, targs) -> None:
    """Refuse to resume a checkpoint written with another model, data or search settings."""
    path = out_dir / "run_config.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text()).get("identity", {})
    now = run_identity(args, sargs, targs)
    diff = [f"--{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
    if diff:
        raise utils.ReSearchError(f"--output_dir {out_dir} holds a run with other settings ({'; '.join(diff)}); "
                                  "running the same command again resumes it: pick another --output_dir or delete it")


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop the lines logged after step max_step (a resumed run logs them again); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line torn by the kill
            return float("inf")

    keep = [ln for ln in lines if ln.strip() and step_of(ln) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(keep)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_final_model(trainer, tok, out_dir: Path, merge_lora: bool) -> None:
    """The trained policy as a plain checkpoint in out_dir. Written to a temp folder first, then moved
    in with config.json last, so a folder with a config.json always holds a complete model. Called on
    every process; only rank 0 writes."""
    tmp, main_process = out_dir / "final_model.tmp", trainer.accelerator.is_main_process
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        # ZeRO-3 shards every weight across the ranks: Trainer.save_model gathers them on all ranks
        # (configs/deepspeed_zero3.yaml sets zero3_save_16bit_model) and rank 0 writes. A LoRA adapter is
        # written as an adapter (merge it with peft before 04_eval.py).
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if not main_process:
            return
    else:
        if not main_process:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------
def plot_run(run_dir: str) -> Path:
    """Reward (with F1 and the format-valid rate), searches per rollout, response length and the time
    split over training steps, from <run_dir>/metrics.jsonl, to <run_dir>/training_curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise utils.ReSearchError(f"--plot {run_dir}: no metrics.jsonl there (is it a 03_grpo_search.py output_dir?)")
    rows = [r for r in utils.read_jsonl(path) if "reward" in r]
    if not rows:
        raise utils.ReSearchError(f"{path}: no training steps logged yet")
    cfg_path = Path(run_dir) / "run_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    x = [r["step"] for r in rows]
    col = lambda k: [r.get(k, float("nan")) for r in rows]  # noqa: E731

    fig, ax = plt.subplots(2, 2, figsize=(12, 7.5))
    mean, std = col("reward"), col("reward_std")
    ax[0, 0].plot(x, mean, "o-", label="reward (mean)")
    ax[0, 0].fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                          label="± std")
    ax[0, 0].plot(x, col("search/f1"), "s--", label="answer F1")
    ax[0, 0].plot(x, col("search/format_ok"), "^:", label="format valid + EOS")
    ax[0, 0].set_title("Reward")
    ax[0, 1].plot(x, col("search/searches_per_rollout"), "o-")
    ax[0, 1].set_title("Search calls per rollout")
    ax[1, 0].plot(x, col("completions/mean_length"), "o-", label="model tokens")
    ax[1, 0].plot(x, col("search/response_length"), "s--", label="model + retrieved tokens")
    ax[1, 0].set_title("Response length (tokens)")
    ax[1, 1].stackplot(x, col("time/generate_s"), col("time/retrieve_s"), col("time/train_s"),
                       labels=["generate", "retrieve", "train"])
    ax[1, 1].set_title("Time per step (s)")
    for a in ax.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    s = cfg.get("search", {})
    fig.suptitle(f"{Path(run_dir).name}: model {cfg.get('model', '?')} | data {cfg.get('train_data', '?')} | "
                 f"retriever {cfg.get('retriever', '?')} | top-k {s.get('topk', '?')}", fontsize=9)
    fig.tight_layout()
    out = Path(run_dir) / "training_curves.png"
    tmp = out.with_name("training_curves.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main():
    from trl import GRPOConfig, TrlParser

    parser = TrlParser((GRPOSearchArguments, utils.SearchArguments, GRPOConfig))
    gpu = torch.cuda.is_available()
    # The paper's values (research-reference.md, "Training") as defaults; presets in configs/ override.
    # TRL's beta KL term is exp(r) - r - 1 with r = ref - policy log-prob: the k3 ("low_var_kl") estimator.
    parser.set_defaults(
        output_dir="runs/grpo", num_generations=5, per_device_train_batch_size=5, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.001, epsilon=0.2, temperature=1.0, top_p=1.0,
        top_k=0, max_completion_length=8192, num_train_epochs=2,
        loss_type="dapo",  # token mean over the whole batch, as the reference's veRL "token-mean"
        scale_rewards="group", disable_dropout=True, logging_steps=1, save_strategy="steps", save_steps=10,
        report_to="tensorboard", log_completions=False,
        bf16=gpu, gradient_checkpointing=gpu)  # fp32 and no checkpointing on the CPU: faster there
    try:
        args, sargs, targs = parser.parse_args_and_config()
    except ValueError as e:  # e.g. a GPU preset (bf16) on a machine without a GPU
        raise utils.ReSearchError(f"bad arguments: {e}") from e
    if args.plot:
        print(f"wrote {plot_run(args.plot)}")
        return

    out_dir = Path(targs.output_dir)
    main_process = targs.process_index == 0  # several processes under accelerate launch: rank 0 writes files
    with targs.main_process_first(desc="output folder"):  # the others read it after rank 0 tidied it
        if main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        ckpt, resumed_step = last_checkpoint(out_dir)
        if ckpt:
            check_same_run(out_dir, args, sargs, targs)
        # A resumed run logs the steps after the checkpoint again: drop what the killed run logged for them.
        for name in ("metrics.jsonl", "trajectories.jsonl"):
            dropped = truncate_jsonl(out_dir / name, resumed_step) if main_process else 0
            if dropped:
                print(f"{name}: dropped {dropped} lines logged after step {resumed_step}", flush=True)
        if main_process and (out_dir / "config.json").exists():  # an older final model: about to be superseded
            (out_dir / "config.json").unlink()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tb"))  # one folder across resumes

    model_name = utils.resolve_model(args.model)
    tok = utils.load_tokenizer(model_name)
    search = utils.load_retriever(sargs.retriever)
    dataset, too_long = load_prompts(args, sargs, tok)
    retriever_desc = getattr(search, "description", sargs.retriever)
    if main_process:
        print(f"model {model_name} | data {args.train_data} ({len(dataset)} questions, {too_long} prompts too long) | "
          f"retriever {retriever_desc} | topk {sargs.topk} | passage_max_words {sargs.passage_max_words} | "
          f"max_searches {sargs.max_searches} | max_completion_length {targs.max_completion_length} | "
          f"group {targs.num_generations} | backend {'vllm-' + targs.vllm_mode if targs.use_vllm else 'hf'} | "
          f"processes {targs.world_size}" + (f" | resuming from {ckpt}" if ckpt else ""), flush=True)
        manifest = getattr(search, "manifest", {})
        write_json(out_dir / "run_config.json", {
            "stage": "03_grpo_search", "model": model_name, "train_data": args.train_data, "split": args.train_split,
            "num_questions": len(dataset), "dropped_long_prompts": too_long, "retriever": retriever_desc,
            "corpus": {k: manifest.get(k) for k in ("corpus", "corpus_sha256", "num_passages") if k in manifest},
            "search": asdict(sargs), "script": asdict(args), "grpo": targs.to_dict(), "resumed_from": ckpt,
            "processes": targs.world_size, "identity": run_identity(args, sargs, targs)})

    trainer = SearchGRPOTrainer(
        model=load_policy(args), args=targs, train_dataset=dataset, processing_class=tok,
        peft_config=lora_config(args), search=search, search_args=sargs,
        trajectory_every=args.trajectory_every, trajectory_samples=args.trajectory_samples,
        max_new_tokens_per_call=args.max_new_tokens_per_call)
    for cb in trainer.callback_handler.callbacks:
        name = type(cb).__name__
        if name == "ProgressCallback":  # keep its bar; summary_line() replaces its dump of every metric
            cb.on_log = lambda *a, **k: None
        if name == "TensorBoardCallback" and resumed_step:  # TensorBoard forgets events after the checkpoint
            from torch.utils.tensorboard import SummaryWriter
            cb.tb_writer = SummaryWriter(log_dir=os.environ["TENSORBOARD_LOGGING_DIR"], purge_step=resumed_step + 1)

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ckpt)
    save_final_model(trainer, tok, out_dir, args.merge_lora)  # every rank calls it (ZeRO-3 gathers weights)
    if main_process:
        plot = plot_run(str(out_dir)) if (out_dir / "metrics.jsonl").is_file() else None
        print(f"done in {time.perf_counter() - t0:.0f}s: model -> {out_dir} (use as --model), trajectories -> "
              f"{out_dir / 'trajectories.jsonl'}, curves -> {plot}", flush=True)


if __name__ == "__main__":
    utils.run_main(main)
