"""Stage 3: GRPO that teaches a model to search (ReSearch, Chen et al. 2025): TRL's GRPOTrainer with two
changes, the rollout and the loss. One step, in the order this file runs it:
  1. TRL draws questions, each repeated --num_generations times (a group), from load_prompts' rows.
  2. Rollout (search_rollout -> utils.search_rollout): the policy writes until </search>, the query goes to
     the retriever, " <result>\\n...\\n</result>" is spliced in as token ids with mask 0, generation resumes,
     until EOS or --max_completion_length (result blocks count).
  3. Reward (research_reward -> utils.compute_reward, on the model's own text): 0 for a bad format or no
     EOS, else the answer's F1, or 0.1 if only the answer is wrong. TRL turns the rewards of a group into
     advantages A = (r - group mean) / (group std + 1e-4).
  4. Loss (_compute_loss): PPO's clipped ratio times A, plus 0.001 x the k3 KL to the reference, averaged
     over the model's own tokens: the retrieved tokens stay in the context and get no gradient.
As the paper: one update per rollout batch. Not in the paper: a search cap (--max_searches).

Reads --model (e.g. runs/sft from 02), --train_data, --retriever. Writes --output_dir (runs/grpo), touched
only once everything has loaded: checkpoint-N/ (the same command again resumes), the final policy (04's
--model), run_config.json, metrics.jsonl (a line per step), trajectories.jsonl (sampled rollouts, ids and
mask runs) and trajectories.html, the same rollouts token by token (extras/view_trajectories.py).

CPU, the bundled SmolLM2-135M-Instruct after the warm-up, mini-Wikipedia (~3 min on 2 cores):
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
from extras.precision import native_bf16, precision_plan


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
    """auto: float32 master weights (LoRA: a bf16 base where bf16 is native); where bf16 is native on a CPU,
    rollouts and the reference in bf16. float32 or bfloat16: every weight in it. Training autocast: --bf16."""
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


# The paper's GRPO (its train.sh), set where TRL 1.16's default differs or is worth stating. Presets
# (--config) and flags override them.
PAPER_GRPO = dict(
    num_generations=5,  # group size 5 (TRL: 8)
    per_device_train_batch_size=5,  # one question's group per device-step
    learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,  # TRL: a linear decay
    beta=0.001,  # KL loss coefficient (TRL: 0, no KL and no reference model)
    use_bias_correction_kl=False,  # veRL's low_var_kl is plain k3; TRL would multiply it by the ratio
    vllm_importance_sampling_correction=False,  # the paper has none
    loss_type="dapo",  # token mean over the batch = veRL's token-mean (TRL's default too)
    scale_rewards="group",  # (r - group mean) / group std, as veRL's GRPO advantage (TRL's default too)
    disable_dropout=True,  # no dropout noise in the policy ratio (TRL: False)
    epsilon=0.2,  # PPO clip
    temperature=1.0, top_p=1.0, top_k=0,  # plain sampling
    max_completion_length=8192,  # the response budget; retrieved tokens count
    num_train_epochs=2,
    gradient_checkpointing=True,
    bf16=native_bf16()[0],  # autocast where bf16 is native (GPU, or a CPU with AMX / AVX-512 BF16)
    use_cpu=not torch.cuda.is_available(),  # Trainer refuses bf16 on a CPU unless told it is one
    output_dir="runs/grpo", logging_steps=1, save_steps=10, report_to="tensorboard",
)


# ---- 1. Data: one row per question, its prompt rendered as every stage renders it ----
def load_prompts(args: GRPOSearchArguments, sargs: utils.SearchArguments, tok):
    from datasets import Dataset
    limit = args.max_train_questions or None
    questions = utils.load_questions(args.train_data, split=args.train_split, limit=limit)
    rows = []
    for question in questions:
        prompt = utils.build_prompt(question["question"], tok, sargs.prompt_template)
        if len(utils.encode(prompt, tok)) > args.max_prompt_length:
            continue
        rows.append({"prompt": prompt, "golden_answers": question["golden_answers"],
                     "question_id": question["id"], "question": question["question"]})
    if not rows:
        raise utils.ReSearchError(f"--train_data {args.train_data}: no question fits --max_prompt_length "
                                  f"{args.max_prompt_length}")
    return Dataset.from_list(rows), len(questions) - len(rows)


class SearchGRPOTrainer(GRPOTrainer):
    def __init__(self, *, search: utils.SearchFn, search_args: utils.SearchArguments, trajectory_every: int = 1,
                 trajectory_samples: int = 16, bf16_sampler=None, bf16_reference: bool = False, **kwargs):
        self.search_fn = search
        self.search_args = search_args
        self.trajectory_every = trajectory_every
        self.trajectory_samples = trajectory_samples
        self.bf16_sampler = bf16_sampler  # a bfloat16 copy of the policy that rollouts sample from (or None)
        self._rollouts: list[utils.Rollout] = []  # the latest batch, and its compute_reward() results
        self._scores: list[dict] = []
        self._rewards: list[float] = []
        self._rollout_s = 0.0  # to log the train part of each step
        self._step_s = 0.0
        if kwargs["args"].use_vllm:  # vLLM pauses a row at </search> and keeps it in the output
            extra = {"stop": [utils.SEARCH_CLOSE], "include_stop_str_in_output": True}
            kwargs["args"].generation_kwargs = {**(kwargs["args"].generation_kwargs or {}), **extra}
        super().__init__(reward_funcs=[self.research_reward], **kwargs)
        # TRL's _generate calls rollout_func(prompts, trainer) instead of its single-turn generate, and does
        # the rest itself (vLLM weight sync, decoding, length metrics; "env_mask" becomes tool_mask).
        self.rollout_func = self.search_rollout
        if bf16_reference and self.ref_model is not None:
            self.ref_model.to(torch.bfloat16)  # frozen: its log-probs only enter the KL

    # ---- 2. The rollout ----
    def search_rollout(self, prompts: list[str], trainer=None) -> dict:
        """TRL's rollout_func: the prompts, each already repeated --num_generations times."""
        tok = self.processing_class
        sargs = self.search_args
        timer = {"generate_s": 0.0, "retrieve_s": 0.0}
        several_processes = self.accelerator.num_processes > 1
        t0 = time.perf_counter()
        with self.generation_backend() as generate:
            generate = timed(generate, timer, "generate_s")
            if several_processes:  # every rank makes the same generate calls (extras/lock_step.py)
                lock_step = importlib.import_module("extras.lock_step")
                generate, wait_for_other_ranks = lock_step.wrap(generate, self.accelerator.gather,
                                                                self.accelerator.device)
            rollouts = utils.search_rollout(
                [utils.encode(p, tok) for p in prompts], generate, timed(self.search_fn, timer, "retrieve_s"),
                tok, set(self.eos_token_ids), max_completion_length=self.max_completion_length,
                topk=sargs.topk, max_searches=sargs.max_searches, passage_max_words=sargs.passage_max_words,
                max_new_tokens_per_call=sargs.max_new_tokens_per_call)
            if several_processes:
                self._log_mean("search/idle_generate_calls", wait_for_other_ranks(rollouts[0].prompt_ids), 1)
        self._rollout_s += time.perf_counter() - t0
        self._rollouts = rollouts
        for key, seconds in timer.items():
            self._log_mean(f"time/{key}", seconds, 1)
        self._log_mean("search/searches_per_rollout", sum(r.num_searches for r in rollouts), len(rollouts))
        self._log_mean("search/response_length", sum(len(r.completion_ids) for r in rollouts), len(rollouts))
        self._log_mean("search/retrieved_token_frac", sum(r.mask.count(0) for r in rollouts),
                       sum(len(r.mask) for r in rollouts))
        logprobs = None
        if self.use_vllm:
            logprobs = [r.logprobs for r in rollouts]
        return {"prompt_ids": [r.prompt_ids for r in rollouts],
                "completion_ids": [r.completion_ids for r in rollouts],
                "logprobs": logprobs,
                "env_mask": [r.mask for r in rollouts],  # -> TRL's tool_mask: 0 = retrieved, no loss
                # every other key reaches the reward function as a keyword argument, one value per row
                "reward_text": [utils.reward_text(r, tok) for r in rollouts],
                "ended_with_eos": [r.ended_with_eos for r in rollouts],
                "num_searches": [r.num_searches for r in rollouts]}

    @contextlib.contextmanager
    def generation_backend(self):
        """vLLM (extras/vllm_rollout.py), or Hugging Face generate on the policy as TRL's own path runs it:
        unwrapped, ZeRO-3 weights gathered, checkpointing off, TRL's sampling config. The CPU presets run
        extras/fast_rollout.py's generate (--fast_rollout): the same tokens, the KV cache kept across turns."""
        if self.use_vllm:
            yield importlib.import_module("extras.vllm_rollout").generate_fn(self)
            return
        from trl.models import unwrap_model_for_generation
        unwrapped = unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                                generation_kwargs=self.generation_kwargs,
                                                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
        full_params = self._dist.summon_full_params(self.model_wrapped, recurse=False)
        with unwrapped as policy, torch.no_grad(), full_params:
            sampler = policy
            if self.bf16_sampler is not None:
                # The current weights rounded to bf16 (a CPU with native bf16, --dtype auto): decoding is faster.
                # The loss then recomputes the sampled tokens' log-probs from the float32 weights under bf16
                # autocast, with no importance correction, as the paper's bf16 vLLM sampling.
                self.bf16_sampler.load_state_dict(policy.state_dict())
                sampler = self.bf16_sampler
            yield utils.hf_generate_fn(sampler, self.processing_class, self.generation_config,
                                       fast=self.search_args.fast_rollout)

    # ---- 3. The reward ----
    def research_reward(self, prompts, completions, reward_text, ended_with_eos, num_searches, golden_answers,
                        **kwargs):
        """The paper's reward on the model's own text (TRL's `completions` include the result blocks: not
        read). The rollout's fields arrive one value per row: reward_text, ended_with_eos, num_searches."""
        self._scores = [utils.compute_reward(text, golds, eos)
                        for text, golds, eos in zip(reward_text, golden_answers, ended_with_eos)]
        rewards = [score["reward"] for score in self._scores]
        # A hack to try, e.g. a cost per search: rewards = [r - 0.05 * n for r, n in zip(rewards, num_searches)]
        self._rewards = rewards
        for key in ("f1", "em", "format_ok"):
            self._log_mean(f"search/{key}", sum(score[key] for score in self._scores), len(self._scores))
        return rewards

    # ---- 4. The loss: GRPO's clipped objective and k3 KL, on the model's own tokens ----
    def _compute_loss(self, model, inputs):
        """One micro-batch's loss with the paper's settings. TRL has already computed the advantages and the
        reference's log-probs (_generate_and_score_completions); other settings go to TRL's own loss."""
        if not self.paper_loss_applies():
            return super()._compute_loss(model, inputs)
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        # log pi(token | context) of each completion token, and the entropy of the distribution it came from
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)
        # THE RETRIEVED-TOKEN MASK, applied: 1 on the model's own tokens, 0 on padding and on result blocks
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        advantages = inputs["advantages"].unsqueeze(1)  # one per rollout, for each of its tokens
        old_logps = inputs.get("old_per_token_logps")  # the sampling policy's, when it differs from this one
        if old_logps is None:
            old_logps = logps.detach()  # one update per rollout batch: the ratio is 1, its gradient is not 0
        ratio = torch.exp(logps - old_logps)
        clipped_ratio = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
        if self.beta != 0.0:
            ref_logps = inputs["ref_per_token_logps"]
            kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # k3, veRL's low_var_kl
            per_token_loss = per_token_loss + self.beta * kl
        # Token mean ("dapo" = veRL's token-mean): divide by the model tokens of the whole generation batch
        # (num_items_in_batch, all processes). Each process's micro-batches add up and DDP averages the
        # processes, so the step's gradient is the mean over every model token of the batch.
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        accumulation_steps = self.current_gradient_accumulation_steps
        tokens = tokens * accumulation_steps / self.args.steps_per_generation
        loss = (per_token_loss * mask).sum() / tokens
        # A mean per rollout, then over rollouts (TRL's "grpo"), instead: replace the line above with
        # loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation_steps
        with torch.no_grad():  # what TRL logs, over the model's own tokens
            if self.beta != 0.0:
                self._log_mean("kl", (kl * mask).sum(), mask.sum())
            self._log_mean("entropy", (entropies * mask).sum(), mask.sum())
            low_clipped = (ratio < 1 - self.epsilon_low) & (advantages < 0)
            high_clipped = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            self._log_mean("clip_ratio/low_mean", (low_clipped * mask).sum(), mask.sum())
            self._log_mean("clip_ratio/high_mean", (high_clipped * mask).sum(), mask.sum())
            self._log_mean("clip_ratio/region_mean", ((low_clipped | high_clipped) * mask).sum(), mask.sum())
        return loss

    def paper_loss_applies(self) -> bool:
        """_compute_loss implements PAPER_GRPO's loss; with any of these TRL settings, TRL's own runs."""
        other_settings = [self.loss_type != "dapo", self.importance_sampling_level != "token",
                          self.top_entropy_quantile < 1.0, self.off_policy_mask_threshold is not None,
                          self.args.delta is not None, self.args.use_bias_correction_kl,
                          self.use_vllm and self.vllm_importance_sampling_correction,
                          self._entropy_bonus_enabled, self.aux_loss_enabled, not self.model.training]
        return not any(other_settings)

    # ---- Logging ----
    def _log_mean(self, name: str, total, count) -> None:
        """total / count, each summed over all processes, to TRL's metrics of this step."""
        local = torch.tensor([float(total), float(count)], device=self.accelerator.device)
        all_total, all_count = self.accelerator.gather(local).view(-1, 2).sum(0).tolist()
        self._metrics["train"][name].append(all_total / max(all_count, 1.0))

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        step = self.state.global_step + 1  # the step these rollouts are for
        every = self.trajectory_every
        due = every > 0 and (step == 1 or step % every == 0)
        if self.model.training and due and self.accelerator.is_main_process:  # the main process's own rows
            rows = zip(self._rollouts, self._scores, self._rewards, inputs, out["advantages"].tolist())
            importlib.import_module("extras.view_trajectories").append_grpo_rows(
                Path(self.args.output_dir) / "trajectories.jsonl", step, rows, self.trajectory_samples,
                self.processing_class)
        return out

    def training_step(self, model, inputs, num_items_in_batch):
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_s += time.perf_counter() - t0
        if self._step % self.current_gradient_accumulation_steps == 0:  # TRL's own step-boundary test
            # the train part: reference log-probs, reward, forward + backward, optimizer (all but the rollout)
            self._metrics["train"]["time/train_s"].append(self._step_s - self._rollout_s)
            self._step_s = 0.0
            self._rollout_s = 0.0
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)  # TRL adds its averaged metrics to logs first
        if not self.accelerator.is_main_process:
            return
        row = {"step": self.state.global_step}
        row.update({key: value for key, value in logs.items() if isinstance(value, (int, float))})
        with open(Path(self.args.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if "reward" in logs:  # one line per step: reward, F1, format, searches, KL, seconds
            print(importlib.import_module("extras.plot_curves").step_line(row, self.state.max_steps),
                  file=sys.stderr, flush=True)


def timed(fn, timer: dict, key: str):
    """fn, adding the seconds of each call to timer[key]."""
    def call(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        timer[key] += time.perf_counter() - t0
        return out
    return call


# ---- Model, resume, outputs ----
def lora_config(args: GRPOSearchArguments):
    if not args.use_lora:
        return None
    from peft import LoraConfig
    targets = args.lora_target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",")]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets)


def save_final_model(trainer, tok, out_dir: Path, merge_lora: bool) -> None:
    """The policy as a plain checkpoint, moved in with config.json last (a folder with a config.json holds a
    complete model). Every process calls it; rank 0 writes."""
    tmp = out_dir / "final_model.tmp"
    main_process = trainer.accelerator.is_main_process
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        trainer.save_model(str(tmp))  # gathers ZeRO-3's shards on all ranks; a LoRA adapter stays an adapter
    elif main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    if main_process:
        tok.save_pretrained(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last
        for path in files:
            os.replace(path, out_dir / path.name)
        tmp.rmdir()


def main():
    args, sargs, targs = utils.parse_args(GRPOSearchArguments, utils.SearchArguments, GRPOConfig, defaults=PAPER_GRPO)
    if targs.use_vllm:  # the engine's length set and checked (and vLLM's CPU build prepared) before anything loads
        importlib.import_module("extras.vllm_rollout").prepare(args, sargs, targs)
    out_dir = Path(targs.output_dir)
    main_process = targs.process_index == 0
    if Path(args.model).exists() and out_dir.resolve() == Path(args.model).resolve():
        raise utils.ReSearchError(f"--output_dir {out_dir} is the --model being trained: pick another")
    resume = importlib.import_module("extras.resume")  # the same command again resumes from the last checkpoint
    ckpt, resumed_step = resume.last_checkpoint(out_dir, main_process)
    if ckpt:  # a run with other settings is refused, not mixed in
        resume.check_same_run(out_dir, {**asdict(sargs), **targs.to_dict(), **asdict(args)})
    tok = utils.load_tokenizer(args.model)
    search = utils.load_retriever(sargs.retriever)
    dataset, too_long = load_prompts(args, sargs, tok)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tb"))  # one folder across resumes
    precision = precision_plan(args.dtype, args.use_lora, targs)
    policy = utils.load_model(args.model, precision["policy"], device="cpu")  # the Trainer places it
    sampler = None
    if precision["rollouts"] == "bfloat16 copy":
        sampler = utils.load_model(args.model, "bfloat16", device="cpu")
    trainer = SearchGRPOTrainer(model=policy, args=targs, train_dataset=dataset, processing_class=tok,
                                peft_config=lora_config(args), search=search, search_args=sargs,
                                trajectory_every=args.trajectory_every, trajectory_samples=args.trajectory_samples,
                                bf16_sampler=sampler, bf16_reference=precision["reference"] == "bfloat16")
    for name in ("ProgressCallback", "PrinterCallback"):  # log() prints a line per step instead
        trainer.remove_callback(getattr(importlib.import_module("transformers"), name))

    # Everything loaded: only now is the output folder touched (rank 0 writes, the others wait for it).
    with targs.main_process_first(desc="output folder"):
        if main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").unlink(missing_ok=True)  # an older final model, about to be superseded
            if ckpt:  # the resumed run logs the steps after its checkpoint again: drop what was logged for them
                resume.truncate_logs(out_dir, resumed_step, trainer)
            run = {"model": args.model, "train_data": args.train_data, "questions": len(dataset),
                   "dropped_long_prompts": too_long, "retriever": getattr(search, "description", sargs.retriever),
                   "top-k": sargs.topk, "max_completion_length": targs.max_completion_length,
                   "group": targs.num_generations, "vllm": targs.use_vllm, "processes": targs.world_size}
            if ckpt:
                run["resuming from"] = ckpt
            print(" | ".join(f"{key} {value}" for key, value in run.items()), flush=True)
            print("precision: " + ", ".join(f"{key} {value}" for key, value in precision.items()), flush=True)
            config = {**run, "corpus": getattr(search, "manifest", {}).get("corpus"), "precision": precision,
                      "search": asdict(sargs), "script": asdict(args), "grpo": targs.to_dict()}
            resume.write_atomic(out_dir / "run_config.json", json.dumps(config, indent=2, default=str))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ckpt)
    save_final_model(trainer, tok, out_dir, args.merge_lora)  # every rank calls it (ZeRO-3 gathers weights)
    if main_process:
        print(f"done in {time.perf_counter() - t0:.0f}s: model -> {out_dir} (use as --model); "
              f"curves: python extras/plot_curves.py {out_dir}")
        trajectories = out_dir / "trajectories.jsonl"
        if trajectories.is_file():  # a page showing which tokens were trained
            print(f"rollouts -> {importlib.import_module('extras.view_trajectories').write_page(trajectories)}")


if __name__ == "__main__":
    utils.run_main(main)
