"""Stage 3: GRPO that teaches a model to search (ReSearch, Chen et al. 2025): TRL's GRPOTrainer with one
change, the rollout. One step, in the order this file runs it:
  1. TRL draws questions, each repeated --num_generations times (a group), from load_prompts' rows.
  2. Rollout (search_rollout -> utils.search_rollout): the policy writes until </search>, the query goes to
     the retriever, " <result>\n...\n</result>" is spliced in as token ids with mask 0, generation resumes,
     until EOS or --max_completion_length (result blocks count).
  3. Reward (research_reward -> utils.compute_reward, on the model's own text): 0 for a bad format or no
     EOS, else the answer's F1, or 0.1 if only the answer is wrong.
  4. Loss: TRL's ("What TRL computes for us" below), our mask as its tool_mask: retrieved tokens stay in
     the context and get no gradient.

Reads --model (e.g. runs/sft from 02), --train_data, --retriever. Writes --output_dir (runs/grpo), touched
only once everything has loaded: checkpoint-N/ (the same command again resumes), the final policy (LoRA
merged; 04's --model), run_config.json, metrics.jsonl (a line per step), trajectories.jsonl (sampled
rollouts with ids and mask runs; the main process's rows) and at the end trajectories.html, the same
rollouts token by token (extras/view_trajectories.py).

CPU, the bundled SmolLM2-135M-Instruct after the warm-up, mini-Wikipedia (~5 min on 2 cores):
    python 03_grpo_search.py --config configs/grpo_cpu.yaml --model runs/sft
One A100 80 GB, Qwen2.5-7B-Instruct + LoRA, vLLM colocated (memory arithmetic in the preset):
    python 03_grpo_search.py --config configs/grpo_a100.yaml --retriever http://127.0.0.1:8000
Several GPUs: README "Scale-out".
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

import utils


# ---- Arguments (and every GRPOConfig field: --learning_rate, --num_generations, --beta, ...) ----
@dataclass
class GRPOSearchArguments:
    model: str = utils.DEFAULT_MODEL
    """The policy: a hub id or a checkpoint (runs/sft after the warm-up)."""
    train_data: str = "musique"
    """A FlashRAG jsonl (data/mini/train.jsonl on a CPU), or a hub name (musique: the paper's; internet)."""
    train_split: str = "train"
    """Split of a hub --train_data."""
    max_train_questions: int = 0
    """The first N questions only (0 = all)."""
    max_prompt_length: int = 512
    """Drop (and count) questions whose prompt is longer (paper: 512)."""
    dtype: str = "auto"
    """auto: float32 on a CPU; on a GPU bf16 for a LoRA base, fp32 for full fine-tuning (bf16 autocast)."""
    use_lora: bool = False
    """Train a LoRA adapter (dropout 0); the reference is then the base, adapter off."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_target_modules: str = "all-linear"
    """"all-linear" or a comma-separated list (e.g. q_proj,v_proj)."""
    merge_lora: bool = True
    """Save the final model with the adapter merged in."""
    trajectory_every: int = 1
    """Log sample rollouts to trajectories.jsonl at step 1 and every N steps (0 = never)."""
    trajectory_samples: int = 16
    """Rollouts logged per such step (0 = all)."""


# The paper's GRPO (research-reference.md "Training"; the reference's train.sh), set where TRL 1.16's
# default differs or is worth stating. Presets (--config) and flags override them.
PAPER_GRPO = dict(
    num_generations=5, per_device_train_batch_size=5,  # group size 5 (TRL: 8); one question per device-step
    learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,  # constant 1e-6 (TRL: linear decay)
    beta=0.001,  # KL loss coefficient (TRL: 0, no KL and no reference model)
    use_bias_correction_kl=False,  # veRL's low_var_kl is plain k3; TRL multiplies it by the (differentiable) ratio
    vllm_importance_sampling_correction=False,  # the paper has none; TRL's sequence_mask would zero long rollouts
    loss_type="dapo",  # token mean over the batch = veRL's token-mean (TRL's default too)
    scale_rewards="group",  # (r - group mean) / group std, as veRL's GRPO advantage (TRL's default too)
    disable_dropout=True,  # no dropout noise in the policy ratio (TRL: False)
    epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0,  # PPO clip 0.2; plain sampling
    max_completion_length=8192, num_train_epochs=2,  # the response budget counts retrieved tokens
    gradient_checkpointing=True, bf16=torch.cuda.is_available(),  # fp32 on a CPU: bf16 is ~4x slower there
    output_dir="runs/grpo", logging_steps=1, save_steps=10, report_to="tensorboard",
)

# What TRL computes for us (trl 1.16, trainer/grpo_trainer.py), once search_rollout has returned:
#  _generate_and_score_completions():
#    r_i = research_reward(...); per group of G rollouts of a question, A_i = (r_i - mean r) / (std r + 1e-4)
#    loss_mask = completion_mask * tool_mask (our "env_mask": 0 on retrieved tokens)
#    ref_logp_t: the reference model's log-probs (with LoRA: the base, adapter off)
#  _compute_loss(), per completion token t:
#    ratio_t = exp(logp_t - old_logp_t)       old = logp.detach(): one update per rollout batch
#    pg_t    = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon) * A)
#    kl_t    = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1        k3 = veRL's "low_var_kl"
#    loss    = sum_t loss_mask_t * (pg_t + beta * kl_t) / sum_t loss_mask_t   "dapo": token mean
#    logged: kl, entropy, clip ratios over loss_mask tokens; frac_reward_zero_std (groups of equal rewards)
# To change the loss, override _compute_loss: its inputs hold "advantages", "tool_mask", "ref_per_token_logps".


# ---- 1. Data: one row per question, its prompt rendered as every stage renders it ----
def load_prompts(args: GRPOSearchArguments, sargs: utils.SearchArguments, tok):
    from datasets import Dataset
    questions = utils.load_questions(args.train_data, split=args.train_split, limit=args.max_train_questions or None)
    rows = []
    for q in questions:
        prompt = utils.build_prompt(q["question"], tok, sargs.prompt_template)
        if len(utils.encode(prompt, tok)) <= args.max_prompt_length:
            rows.append({"prompt": prompt, "golden_answers": q["golden_answers"], "question_id": q["id"],
                         "question": q["question"]})
    if not rows:
        raise utils.ReSearchError(f"--train_data {args.train_data}: no question fits --max_prompt_length "
                                  f"{args.max_prompt_length}")
    return Dataset.from_list(rows), len(questions) - len(rows)


class SearchGRPOTrainer(GRPOTrainer):
    def __init__(self, *, search: utils.SearchFn, search_args: utils.SearchArguments, trajectory_every: int = 1,
                 trajectory_samples: int = 16, **kwargs):
        self.search_fn, self.search_args = search, search_args
        self.trajectory_every, self.trajectory_samples = trajectory_every, trajectory_samples
        self._rollouts: list[utils.Rollout] = []  # the latest batch, and its compute_reward() results
        self._scores: list[dict] = []
        self._rollout_s = self._step_s = 0.0  # to log the train part of each step
        if kwargs["args"].use_vllm:  # vLLM pauses a row at </search> and keeps it in the output
            kwargs["args"].generation_kwargs = {**(kwargs["args"].generation_kwargs or {}),
                                                "stop": [utils.SEARCH_CLOSE], "include_stop_str_in_output": True}
        super().__init__(reward_funcs=[self.research_reward], **kwargs)
        # TRL's _generate calls rollout_func(prompts, trainer) instead of its single-turn generate, and does
        # the rest itself (vLLM weight sync, decoding, length metrics; "env_mask" becomes tool_mask).
        self.rollout_func = self.search_rollout

    # ---- 2. The rollout ----
    def search_rollout(self, prompts: list[str], trainer=None) -> dict:
        """TRL's rollout_func: the prompts, each already repeated --num_generations times."""
        tok, s, timer = self.processing_class, self.search_args, {"generate_s": 0.0, "retrieve_s": 0.0, "idle": 0}

        def timed(fn, key):
            def call(*a):
                t0 = time.perf_counter()
                out = fn(*a)
                timer[key] += time.perf_counter() - t0
                return out
            return call

        def any_rank_active(local: bool) -> bool:  # several processes: every rank's generate calls in step
            flags = self.accelerator.gather(torch.tensor([float(local)], device=self.accelerator.device))
            timer["idle"] += int(not local and flags.sum().item() > 0)
            return flags.sum().item() > 0

        t0 = time.perf_counter()
        with self.generation_backend() as generate:
            rollouts = utils.search_rollout(
                [utils.encode(p, tok) for p in prompts], timed(generate, "generate_s"),
                timed(self.search_fn, "retrieve_s"), tok, set(self.eos_token_ids),
                max_completion_length=self.max_completion_length, topk=s.topk, max_searches=s.max_searches,
                passage_max_words=s.passage_max_words, max_new_tokens_per_call=s.max_new_tokens_per_call,
                any_rank_active=any_rank_active if self.accelerator.num_processes > 1 else None)
        self._rollout_s += time.perf_counter() - t0
        self._rollouts = rollouts
        for key in ("generate_s", "retrieve_s"):
            self._log_mean(f"time/{key}", [timer[key]])
        if self.accelerator.num_processes > 1:
            self._log_mean("search/idle_generate_calls", [timer["idle"]])
        self._log_mean("search/searches_per_rollout", [r.num_searches for r in rollouts])
        self._log_mean("search/response_length", [len(r.completion_ids) for r in rollouts])
        self._log_mean("search/retrieved_token_frac", [r.mask.count(0) for r in rollouts],
                       count=sum(len(r.mask) for r in rollouts))
        return {"prompt_ids": [r.prompt_ids for r in rollouts],
                "completion_ids": [r.completion_ids for r in rollouts],
                "logprobs": [r.logprobs for r in rollouts] if self.use_vllm else None,
                "env_mask": [r.mask for r in rollouts],  # -> TRL's tool_mask: 0 = retrieved, no loss
                # every other key reaches the reward function as a keyword argument, one value per row
                "reward_text": [utils.reward_text(r, tok) for r in rollouts],
                "ended_with_eos": [r.ended_with_eos for r in rollouts]}

    @contextlib.contextmanager
    def generation_backend(self):
        """vLLM (extras/vllm_rollout.py), or Hugging Face generate on the policy as TRL's own path runs it:
        unwrapped, ZeRO-3 weights gathered, checkpointing off, TRL's sampling config."""
        if self.use_vllm:
            yield importlib.import_module("extras.vllm_rollout").generate_fn(self)
            return
        from trl.models import unwrap_model_for_generation
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            yield utils.hf_generate_fn(model, self.processing_class, self.generation_config,
                                       fast=self.search_args.fast_rollout)

    # ---- 3. The reward ----
    def research_reward(self, prompts, completions, reward_text, ended_with_eos, golden_answers, **kwargs):
        """On the model's own text (TRL's `completions` include the result blocks: not read)."""
        self._scores = [utils.compute_reward(t, g, e) for t, g, e in zip(reward_text, golden_answers, ended_with_eos)]
        for key in ("f1", "em", "format_ok"):
            self._log_mean(f"search/{key}", [s[key] for s in self._scores])
        return [s["reward"] for s in self._scores]

    # ---- Logging ----
    def _log_mean(self, name: str, values: list, count: int | None = None):
        """sum(values) / count over all processes, to TRL's metrics."""
        local = torch.tensor([float(sum(values)), float(len(values) if count is None else count)],
                             device=self.accelerator.device)
        total, n = self.accelerator.gather(local).view(-1, 2).sum(0).tolist()
        self._metrics["train" if self.model.training else "eval"][name].append(total / max(n, 1.0))

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        step, every = self.state.global_step + 1, self.trajectory_every  # the step these rollouts are for
        if self.model.training and every and (step == 1 or step % every == 0) and self.accelerator.is_main_process:
            self.write_trajectories(step, inputs, out["advantages"].tolist())
        return out

    def write_trajectories(self, step: int, inputs: list[dict], advantages: list[float]):
        """This process's rows (the main process's share under several)."""
        tok, n, lines = self.processing_class, self.trajectory_samples or len(self._rollouts), []
        for r, s, x, adv in list(zip(self._rollouts, self._scores, inputs, advantages))[:n]:
            lines.append(json.dumps({
                "step": step, "question_id": x["question_id"], "question": x["question"],
                "golden_answers": x["golden_answers"], "reward": s["reward"], "f1": s["f1"], "em": s["em"],
                "format_ok": s["format_ok"], "prediction": s["prediction"], "advantage": adv,
                "ended_with_eos": r.ended_with_eos, "queries": r.queries, "num_searches": r.num_searches,
                "completion": tok.decode(r.completion_ids, skip_special_tokens=True),
                "completion_ids": r.completion_ids, "mask_runs": [[m, len(ids)] for ids, m in r.segments()]},
                ensure_ascii=False))
        with open(Path(self.args.output_dir) / "trajectories.jsonl", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def training_step(self, model, inputs, num_items_in_batch):
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_s += time.perf_counter() - t0
        if self._step % self.current_gradient_accumulation_steps == 0:  # TRL's own step-boundary test
            # the train part: reference log-probs, reward, forward + backward, optimizer (all but the rollout)
            self._metrics["train"]["time/train_s"].append(self._step_s - self._rollout_s)
            self._step_s = self._rollout_s = 0.0
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)  # TRL adds its averaged metrics to logs first
        if self.accelerator.is_main_process:
            row = {"step": self.state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with open(Path(self.args.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if "reward" in logs:
                print(summary_line(row, self.state.max_steps), file=sys.stderr, flush=True)


def summary_line(m: dict, max_steps: int) -> str:
    g = lambda k, fmt="{:.2f}": fmt.format(m[k]) if isinstance(m.get(k), (int, float)) else "-"  # noqa: E731
    return (f"step {m['step']}/{max_steps} | reward {g('reward')} ± {g('reward_std')} | F1 {g('search/f1')} | "
            f"format {g('search/format_ok')} | searches {g('search/searches_per_rollout')} | equal-reward groups "
            f"{g('frac_reward_zero_std')} | KL {g('kl', '{:.4f}')} | tokens {g('search/response_length', '{:.0f}')}"
            f" | s: generate {g('time/generate_s', '{:.0f}')} train {g('time/train_s', '{:.0f}')}")


# ---- Model, resume, outputs ----
def lora_config(args: GRPOSearchArguments):
    if not args.use_lora:
        return None
    from peft import LoraConfig
    targets = args.lora_target_modules
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])


def check_output_dir(out_dir: Path, args) -> tuple[str | None, int]:
    """Refuse an output folder that is the input model; the checkpoint to resume from and its step."""
    from transformers.trainer_utils import get_last_checkpoint
    if Path(args.model).exists() and out_dir.resolve() == Path(args.model).resolve():
        raise utils.ReSearchError(f"--output_dir {out_dir} is the --model being trained: training would "
                                  "overwrite it; pick another --output_dir")
    ckpt = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    return ckpt, int(json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]) if ckpt else 0


def save_final_model(trainer, tok, out_dir: Path, merge_lora: bool) -> None:
    """The policy as a plain checkpoint, moved in with config.json last (a folder with a config.json holds a
    complete model). Every process calls it; rank 0 writes."""
    tmp, main_process = out_dir / "final_model.tmp", trainer.accelerator.is_main_process
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        trainer.save_model(str(tmp))  # gathers ZeRO-3's shards on all ranks; a LoRA adapter stays an adapter
    elif main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model = model.merge_and_unload() if merge_lora and hasattr(model, "merge_and_unload") else model
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    if main_process:
        tok.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(f, out_dir / f.name)
        tmp.rmdir()


def main():
    args, sargs, targs = utils.parse_args(GRPOSearchArguments, utils.SearchArguments, GRPOConfig, defaults=PAPER_GRPO)
    if targs.use_vllm:  # the engine's length set and checked (and vLLM's CPU build prepared) before anything loads
        importlib.import_module("extras.vllm_rollout").prepare(args, sargs, targs)
    out_dir, main_process = Path(targs.output_dir), targs.process_index == 0
    ckpt, resumed_step = check_output_dir(out_dir, args)
    if ckpt:  # a run with other settings is refused, not mixed in (extras/resume.py)
        importlib.import_module("extras.resume").check_same_run(out_dir, {**asdict(sargs), **targs.to_dict(),
                                                                          **asdict(args)})
    tok = utils.load_tokenizer(args.model)
    search = utils.load_retriever(sargs.retriever)
    dataset, too_long = load_prompts(args, sargs, tok)
    retriever = getattr(search, "description", sargs.retriever)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tb"))  # one folder across resumes
    dtype = "bfloat16" if args.dtype == "auto" and torch.cuda.is_available() and args.use_lora else args.dtype
    policy = utils.load_model(args.model, dtype, device="cpu")  # auto = float32; the Trainer places it
    trainer = SearchGRPOTrainer(model=policy, args=targs, train_dataset=dataset, processing_class=tok,
                                peft_config=lora_config(args), search=search, search_args=sargs,
                                trajectory_every=args.trajectory_every, trajectory_samples=args.trajectory_samples)
    for name in ("ProgressCallback", "PrinterCallback"):  # summary_line() reports each step instead
        trainer.remove_callback(getattr(importlib.import_module("transformers"), name))

    # Everything loaded: only now is the output folder touched (rank 0 writes, the others wait for it).
    with targs.main_process_first(desc="output folder"):
        if main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").unlink(missing_ok=True)  # an older final model, about to be superseded
            if ckpt:  # the resumed run logs the steps after its checkpoint again: drop what was logged for them
                importlib.import_module("extras.resume").truncate_logs(out_dir, resumed_step, trainer)
            run = {"model": args.model, "train_data": args.train_data, "questions": len(dataset),
                   "dropped_long_prompts": too_long, "retriever": retriever, "top-k": sargs.topk,
                   "max_completion_length": targs.max_completion_length, "group": targs.num_generations,
                   "vllm": targs.use_vllm, "processes": targs.world_size, **({"resuming from": ckpt} if ckpt else {})}
            print(" | ".join(f"{k} {v}" for k, v in run.items()), flush=True)
            (out_dir / "run_config.json").write_text(json.dumps({
                **run, "corpus": getattr(search, "manifest", {}).get("corpus"), "search": asdict(sargs),
                "script": asdict(args), "grpo": targs.to_dict()},
                indent=2, default=str))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ckpt)
    save_final_model(trainer, tok, out_dir, args.merge_lora)  # every rank calls it (ZeRO-3 gathers weights)
    if main_process:
        traj = out_dir / "trajectories.jsonl"  # and a page showing which tokens were trained
        page = importlib.import_module("extras.view_trajectories").write_page(traj) if traj.is_file() else None
        print(f"done in {time.perf_counter() - t0:.0f}s: model -> {out_dir} (use as --model), rollouts -> {page}; "
              f"curves: python extras/plot_curves.py {out_dir}")


if __name__ == "__main__":
    utils.run_main(main)
