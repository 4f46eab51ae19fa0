"""03_grpo_search.py: the search rollout through TRL's real GRPO loss (the retrieved-token mask), the
Hugging Face back end with a real model, a two-step run with checkpoint, logs, trajectories, resume
and curves. The vLLM back end: tests/test_vllm.py.

A model that really searches: the conftest's tiny random Llama, taught in a few seconds (in this
file) to answer one question at once and to search once for another, then answer."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import utils
from conftest import ROOT, load_stage, run_script
from test_rollout import word_search

fast_rollout = __import__("extras.fast_rollout", fromlist=["fast_rollout"])  # --fast_rollout

SEARCH_Q = "Q: Ed Wood's nationality?"
DIRECT_Q = "Q: 2 + 2?"
TURN1 = " <think> Look up. </think> <search> Ed Wood </search>"
TURN2 = " <think> So. </think> <answer> \\boxed{American} </answer>"
DIRECT = " <think> Easy. </think> <answer> \\boxed{4} </answer>"
SEARCH_ARGS = utils.SearchArguments(retriever="(in-test word_search)", topk=1, max_searches=4)


def write_train_data(path: Path) -> Path:
    """The two scripted questions as a FlashRAG jsonl (03's --train_data): one that searches, one answered at once."""
    path.write_text("".join(json.dumps({"id": str(i), "question": q, "golden_answers": [g]}) + "\n"
                            for i, (q, g) in enumerate([(SEARCH_Q, "American"), (DIRECT_Q, "4")])))
    return path


def enc(text, tok):
    return tok(text, add_special_tokens=False)["input_ids"]


def scripted_completion(tok, prompt):
    """The (ids, mask) the taught model produces for a prompt: its turns, the result block spliced in."""
    if prompt == DIRECT_Q:
        ids = enc(DIRECT, tok) + [tok.eos_token_id]
        return ids, [1] * len(ids)
    block = enc(utils.format_result_block(word_search()(["Ed Wood"], SEARCH_ARGS.topk)[0]), tok)
    t1, t2 = enc(TURN1, tok), enc(TURN2, tok) + [tok.eos_token_id]
    return t1 + block + t2, [1] * len(t1) + [0] * len(block) + [1] * len(t2)


def load_script():
    return load_stage("03_grpo_search.py", "grpo_search")


def teach(model, rows, pad_id=0, lr=1e-2):
    """Fit the model to (prompt ids, completion ids) pairs until it reproduces them (loss < 3e-3)."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.tensor([p + c + [pad_id] * (width - len(p) - len(c)) for p, c in rows])
    labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in rows])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 3e-3:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2, f"the tiny model did not learn its script (loss {loss.item():.3f})"


@pytest.fixture(scope="module")
def search_model_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    import transformers
    tok = tokenizer
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teach(model, [(enc(p, tok), scripted_completion(tok, p)[0]) for p in (SEARCH_Q, DIRECT_Q)], tok.eos_token_id)
    out = tmp_path_factory.mktemp("search_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("fast,per_call,dtype", [(False, 0, "float32"), (True, 0, "float32"), (False, 15, "float32"),
                                                (True, 15, "float32"), (True, 5, "float32"), (True, 5, "bfloat16")])
def test_hf_backend_follows_the_script_token_for_token(search_model_dir, tokenizer, fast, per_call, dtype):
    """Real Hugging Face generate: both rows generate together, the searching row stops at </search>
    (stop string) while the other runs on to EOS and is padded; the ids are the model's own. The same
    with the KV cache kept across calls (--fast_rollout), and with calls cut every few tokens (15 cuts
    " </search>" after " </": the stop straddles two calls). In bf16 too."""
    model = utils.load_model(search_model_dir, dtype, device="cpu")
    calls = []
    generate = utils.hf_generate_fn(model, tokenizer, fast=fast)

    def spy(contexts, n):
        calls.append(len(contexts))
        return generate(contexts, n)

    rows = utils.search_rollout([enc(SEARCH_Q, tokenizer), enc(DIRECT_Q, tokenizer)], spy, word_search(), tokenizer,
                                utils.eos_token_ids(tokenizer, model), max_completion_length=300,
                                topk=SEARCH_ARGS.topk, max_new_tokens_per_call=per_call)
    for r, q in zip(rows, (SEARCH_Q, DIRECT_Q)):
        assert (r.completion_ids, r.mask) == scripted_completion(tokenizer, q)
        assert r.ended_with_eos
    assert rows[0].queries == ["Ed Wood"]
    if per_call == 0:
        assert calls == [2, 1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_cache_reuse_changes_nothing_but_time(tiny_model_dir, search_model_dir, tokenizer, dtype):
    """Greedy rollouts cut into many calls: identical ids from the plain generate and from --fast_rollout's,
    which keeps the KV cache across calls (prompts of different lengths: left padding and holes). float32:
    the random tiny model, off any script, on three prompts. bfloat16 rounds keys and values computed in a
    decode step differently from a prefill's, so near-tied logits (a random model's are all near ties) can
    flip: there the taught model, whose logits have margins, on its two prompts."""
    model_dir = tiny_model_dir if dtype == "float32" else search_model_dir
    model = utils.load_model(model_dir, dtype, device="cpu")
    questions = ("Question: who?", DIRECT_Q, SEARCH_Q + " Think step by step, please.")
    if dtype == "bfloat16":
        questions = (SEARCH_Q, DIRECT_Q)
    prompts = [enc(q, tokenizer) for q in questions]
    out = {}
    for reuse in (False, True):
        generate = utils.hf_generate_fn(model, tokenizer, fast=reuse)
        rows = utils.search_rollout(prompts, generate, word_search(), tokenizer, {tokenizer.eos_token_id},
                                    max_completion_length=40, topk=2, max_new_tokens_per_call=7)
        out[reuse] = [r.completion_ids for r in rows]
    assert out[True] == out[False] and all(len(ids) > 7 for ids in out[True])


@pytest.mark.parametrize("per_call,dtype", [(0, "float32"), (5, "float32"), (5, "bfloat16")])
def test_result_blocks_prefilled_alone_change_nothing(search_model_dir, tokenizer, monkeypatch, per_call, dtype):
    """Rows resuming after a result block prefill it in a forward of their own (fast_rollout.PREFILL_ALONE),
    not padded inside the batched call: the taught model's rollouts (one row searches, one answers at
    once; calls whole or cut every 5 tokens) follow its script token for token whether blocks are
    prefilled alone (threshold 0: every row with two or more new ids), by the default rule, or never.
    (Off its script the tiny model's logits are near ties, and a different batch shape can flip them.)"""
    model = utils.load_model(search_model_dir, dtype, device="cpu")
    prompts = [enc(q, tokenizer) for q in (SEARCH_Q, DIRECT_Q)]
    out, forwards = {}, {}
    model.register_forward_pre_hook(lambda *a: forwards.__setitem__(alone, forwards.get(alone, 0) + 1))
    for alone in (10**9, 0, fast_rollout.PREFILL_ALONE):
        monkeypatch.setattr(fast_rollout, "PREFILL_ALONE", alone)
        generate = utils.hf_generate_fn(model, tokenizer, fast=True)
        rows = utils.search_rollout(prompts, generate, word_search(), tokenizer, utils.eos_token_ids(tokenizer, model),
                                    max_completion_length=300, topk=SEARCH_ARGS.topk, max_new_tokens_per_call=per_call)
        out[alone] = [(r.completion_ids, r.mask) for r in rows]
        monkeypatch.undo()
    for alone in out:
        assert out[alone] == [scripted_completion(tokenizer, q) for q in (SEARCH_Q, DIRECT_Q)], alone
    # the forwards of their own happened: one per call that resumed rows after a block
    assert forwards[0] > forwards[10**9] and forwards[fast_rollout.PREFILL_ALONE] > forwards[10**9], forwards

def _two_rank_worker(rank, model_dir, port, out_dir):
    """One of two gloo ranks: a fast-rollout search loop in lock-step, counting the forwards made outside
    model.generate (a block prefilled alone). Rank 0's question searches (it resumes after a block), rank 1's
    does not: a forward of rank 0's own would deadlock ZeRO-3 / FSDP, where every forward is collective."""
    import json
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok, model = utils.load_tokenizer(model_dir), utils.load_model(model_dir, "float32", device="cpu")
    inside, outside = [False], [0]
    real_generate = model.generate

    def generate(*a, **k):
        inside[0] = True
        try:
            return real_generate(*a, **k)
        finally:
            inside[0] = False

    model.generate = generate
    model.register_forward_pre_hook(lambda *a: outside.__setitem__(0, outside[0] + (not inside[0])))

    def gather(flag):  # accelerator.gather, in plain torch.distributed
        flags = [torch.zeros_like(flag) for _ in range(2)]
        dist.all_gather(flags, flag)
        return torch.cat(flags)

    fast_rollout.PREFILL_ALONE = 0  # every resumed row would qualify for a forward of its own
    q = (SEARCH_Q, DIRECT_Q)[rank]
    lock_step = __import__("extras.lock_step", fromlist=["lock_step"])
    generate, wait_for_other_ranks = lock_step.wrap(utils.hf_generate_fn(model, tok, fast=True), gather)
    rows = utils.search_rollout([enc(q, tok)], generate, word_search(), tok, utils.eos_token_ids(tok, model),
                                max_completion_length=300, topk=1)
    wait_for_other_ranks(rows[0].prompt_ids)
    (out_dir / f"{rank}.json").write_text(json.dumps({"outside": outside[0], "ids": rows[0].completion_ids}))
    dist.destroy_process_group()


def test_no_forward_of_one_rank_alone_under_two_ranks(search_model_dir, tokenizer, tmp_path):
    """Before the fix, the rank resuming after a block made a prefill forward the other rank did not make."""
    import json
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(search_model_dir, port, tmp_path), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [g["outside"] for g in got] == [0, 0]
    assert [g["ids"] for g in got] == [scripted_completion(tokenizer, q)[0] for q in (SEARCH_Q, DIRECT_Q)]


def make_trainer(grpo, model_dir, tokenizer, out_dir, bf16=False, **config):
    """bf16: what --dtype auto does on a CPU with native bf16: bf16 autocast over float32 master weights,
    rollouts sampled from a bf16 copy of the policy, a bf16 reference."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig
    kw = dict(grpo.PAPER_GRPO)  # the paper's settings, then the test's
    kw.update(output_dir=str(out_dir), num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
              max_completion_length=300, beta=0.001, learning_rate=1e-5, bf16=bf16, gradient_checkpointing=False,
              report_to="none", logging_steps=1, max_steps=1, save_strategy="no", disable_dropout=True, seed=0,
              temperature=0.3, use_cpu=True)  # the taught model follows its script at this temperature
    kw.update(config)
    rows = [{"prompt": q, "golden_answers": [g], "question_id": str(i), "question": q}
            for i, (q, g) in enumerate([(SEARCH_Q, "American"), (DIRECT_Q, "4")])]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sampler = utils.load_model(model_dir, "bfloat16", device="cpu") if bf16 else None
    return grpo.SearchGRPOTrainer(model=model, args=GRPOConfig(**kw), train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, search=word_search(), search_args=SEARCH_ARGS,
                                  trajectory_every=0, bf16_sampler=sampler, bf16_reference=bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_retrieved_tokens_get_exactly_zero_gradient_through_the_owned_loss(search_model_dir, tokenizer, tmp_path, bf16):
    """The mask built in utils.search_rollout reaches TRL's batch as tool_mask, and 03's _compute_loss gives
    the retrieved positions exactly zero gradient, every model token some; in float32 and in bf16."""
    grpo = load_script()
    trainer = make_trainer(grpo, search_model_dir, tokenizer, tmp_path, bf16=bf16)
    trainer.model.train()
    assert trainer.paper_loss_applies()  # the loss below is 03's own
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)  # TRL: our rollout, the reward, advantages, reference log-probs

    # the rollout reached TRL unchanged: ids and mask of every row, behind TRL's right padding
    assert sorted(r.num_searches for r in trainer._rollouts) == [0, 0, 1, 1]
    by_prompt = {tuple(r.prompt_ids): r for r in trainer._rollouts}
    for i in range(inputs["completion_ids"].size(0)):
        prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
        ids, mask = scripted_completion(tokenizer, SEARCH_Q if prompt == enc(SEARCH_Q, tokenizer) else DIRECT_Q)
        assert by_prompt[tuple(prompt)].completion_ids == ids
        assert inputs["completion_ids"][i][: len(ids)].tolist() == ids
        assert inputs["tool_mask"][i][: len(ids)].tolist() == mask
        assert inputs["completion_mask"][i].sum().item() == len(ids)
    assert [s["reward"] for s in trainer._scores] == [1.0] * 4
    for key in ("search/f1", "search/format_ok", "search/searches_per_rollout", "search/retrieved_token_frac",
                "time/generate_s", "time/retrieve_s"):
        assert key in trainer._metrics["train"]

    # Every reward is 1.0, so every advantage is 0: give the rows non-zero advantages to see the gradient.
    inputs["advantages"] = torch.tensor([1.0, -0.5, 0.75, -1.25])
    grads = {}
    backbone = trainer.model.model  # TRL's fused head reads the backbone's last hidden state (after the norm)

    def keep_grad(module, args, out):
        out.register_hook(lambda g: grads.update(h=g))  # returns None: the output stays as it is

    handle = backbone.norm.register_forward_hook(keep_grad)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop at each step; we call the loss directly
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    handle.remove()
    P, C = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
    # the hidden state at position P-1+j gives the logits of completion token j
    per_token = grads["h"][:, P - 1 : P - 1 + C].abs().sum(-1)
    real = inputs["completion_mask"].bool()
    retrieved, own = real & (inputs["tool_mask"] == 0), real & (inputs["tool_mask"] == 1)
    assert retrieved.sum() > 0 and own.sum() > 0
    assert torch.all(per_token[retrieved] == 0), "a retrieved token leaked into the loss"
    assert torch.all(per_token[own] > 0), "a model token got no gradient"
    assert torch.all(per_token[~real] == 0)


LOSS_SETTINGS = {"paper": {}, "no_kl": {"beta": 0.0}, "clipped": {},
                 "accumulated": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
                 "bf16": {"bf16": True}, "trl_grpo_loss": {"loss_type": "grpo"}}


@pytest.mark.parametrize("setting", list(LOSS_SETTINGS))
def test_owned_loss_equals_trls_loss_and_gradients(search_model_dir, tokenizer, tmp_path, setting):
    """03's _compute_loss against TRL 1.16's own on the same batch: the loss and every parameter's gradient
    agree to 1e-6 relative. clipped: old log-probs moved off the policy's, so both clips act; accumulated:
    the generation batch split over two accumulation steps (the token normaliser); trl_grpo_loss: a
    setting 03 does not implement goes to TRL's loss."""
    from trl import GRPOTrainer
    trainer = make_trainer(load_script(), search_model_dir, tokenizer, tmp_path, **LOSS_SETTINGS[setting])
    trainer.model.train()
    assert trainer.paper_loss_applies() == (setting != "trl_grpo_loss")
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = inputs["completion_ids"].size(0)
    inputs["advantages"] = torch.tensor([1.0, -0.5, 0.75, -1.0])[:rows]  # every reward is 1.0: give some signal
    if setting == "clipped":
        with torch.no_grad():
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention,
                                                                      inputs["completion_ids"].size(1))
        shift = torch.linspace(-0.6, 0.6, logps.numel()).view_as(logps)  # ratios from 0.55 to 1.8
        inputs["old_per_token_logps"] = logps + shift
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # the loop sets it

    def loss_and_grads(compute):
        trainer.model.zero_grad()
        loss = compute(trainer.model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    ours, our_grads = loss_and_grads(trainer._compute_loss)
    trls, trl_grads = loss_and_grads(lambda model, batch: GRPOTrainer._compute_loss(trainer, model, batch))
    assert ours.item() != 0 and abs(ours.item() - trls.item()) <= 1e-6 * abs(trls.item())
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    for name, grad in trl_grads.items():
        assert grad.norm() > 0 or name.endswith("bias")
        assert (our_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
    if setting == "clipped":
        metrics = trainer._metrics["train"]
        assert metrics["clip_ratio/low_mean"][-2] > 0 and metrics["clip_ratio/high_mean"][-2] > 0
        for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            ours_logged, trls_logged = metrics[key][-2:]  # the same metrics, logged by each loss in turn
            assert ours_logged == pytest.approx(trls_logged, rel=1e-5, abs=1e-9), key


def test_two_step_run_writes_checkpoint_logs_trajectories_and_resumes(tiny_model_dir, mini_index, tmp_path):
    out = tmp_path / "grpo"
    cmd = ["03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--model", tiny_model_dir, "--retriever",
           mini_index, "--output_dir", out, "--max_steps", "2", "--save_steps", "1", "--max_completion_length", "32",
           "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
           "--trajectory_samples", "0", "--save_total_limit", "3"]
    run_script(*cmd)
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()  # the final model
    assert any((out / "tb").iterdir())  # TensorBoard events
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model"] == tiny_model_dir and cfg["search"]["topk"] == 3 and "17247 passages" in cfg["retriever"]

    def logged():
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        traj = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
        return [m["step"] for m in metrics if "reward" in m], [t["step"] for t in traj], traj

    steps, traj_steps, traj = logged()
    assert steps == [1, 2] and traj_steps == [1, 1, 2, 2]
    for t in traj:
        assert {"step", "question", "completion", "reward", "f1", "format_ok", "advantage", "num_searches",
                "completion_ids", "mask_runs"} <= set(t)
        assert sum(n for _, n in t["mask_runs"]) == len(t["completion_ids"]) <= 32

    # Kill after step 2 was logged but before checkpoint-2 was written: the same command resumes from
    # checkpoint-1, and the logs continue from step 1 instead of restarting or repeating step 2.
    shutil.rmtree(out / "checkpoint-2")
    p = run_script(*cmd)
    assert "resuming from" in p.stdout and "checkpoint-1" in p.stdout
    steps, traj_steps, _ = logged()
    assert steps == [1, 2] and traj_steps == [1, 1, 2, 2]
    assert (out / "checkpoint-2").is_dir() and (out / "config.json").is_file()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "reward" in h] == [1, 2]

    # Killed while checkpoint-2 was being written (Trainer writes trainer_state.json last): before the fix
    # the same command died with a bare FileNotFoundError; now it says so, removes it and resumes from 1.
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # torn
    p = run_script(*cmd)
    assert "checkpoint-2 is incomplete" in p.stdout and "resuming from" in p.stdout and "checkpoint-1" in p.stdout
    steps, traj_steps, _ = logged()
    assert steps == [1, 2] and traj_steps == [1, 1, 2, 2]
    json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())  # written whole again

    # the same folder with other settings is refused with the setting named, not resumed or crashed deep in
    # Trainer (use_lora, learning rate, beta, loss_type and dtype were not checked before)
    for flag, value, shown in (("--topk", "5", "--topk 3 -> 5"), ("--use_lora", "true", "--use_lora False -> True"),
                               ("--learning_rate", "3e-5", "--learning_rate 2e-05 -> 3e-05"),
                               ("--beta", "0.01", "--beta 0.001 -> 0.01"), ("--loss_type", "grpo", "--loss_type"),
                               ("--dtype", "bfloat16", "--dtype 'auto' -> 'bfloat16'")):
        p = run_script(*cmd, flag, value, check=False)
        assert p.returncode == 2 and shown in p.stderr and "Traceback" not in p.stderr, (flag, p.stderr[-2000:])

    # the token view of the trajectories, written at the end; the curves, from the run's logs
    assert "trajectories.jsonl (4 rollouts)" in (out / "trajectories.html").read_text()
    run_script("extras/plot_curves.py", out)
    assert (out / "training_curves.png").stat().st_size > 10_000


def test_two_process_run_keeps_ranks_in_lock_step(search_model_dir, tokenizer, mini_index, tmp_path):
    """accelerate launch, two CPU processes over gloo, two GRPO steps on the mini index. The taught model,
    taught again on the script's own chat prompts: rank 0 gets one question's group and rank 1 the
    other's (TRL splits each generation batch [a, a, b, b] by process), so the rank that answers at once
    is done after one generate call while the other searches and goes on; with the lock-step hook the
    finished rank keeps making (one-token) calls until both are done, logged as idle calls."""
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(search_model_dir)
    pairs = [(utils.encode(utils.build_prompt(q, tokenizer), tokenizer), enc(c, tokenizer) + [tokenizer.eos_token_id])
             for q, c in ((SEARCH_Q, TURN1), (DIRECT_Q, DIRECT))]  # turn 1 only: after the block it improvises
    teach(model, pairs)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_train_data(tmp_path / "train.jsonl")
    out = tmp_path / "grpo"
    p = run_script("-m", "accelerate.commands.launch", "--config_file", "configs/accelerate_ddp.yaml",
                   "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517",
                   "03_grpo_search.py", "--config", "configs/grpo_cpu.yaml", "--use_cpu", "true",
                   "--model", tmp_path / "model", "--train_data", data, "--retriever", mini_index,
                   "--output_dir", out, "--max_steps", "2", "--save_steps", "2", "--num_generations", "2",
                   "--per_device_train_batch_size", "2", "--max_completion_length", "300", "--temperature", "0.3",
                   "--max_new_tokens_per_call", "0", "--report_to", "none", timeout=600)
    assert "processes 2" in p.stdout
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()
    assert (out / "config.json").is_file()  # the final model, written by rank 0 only
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # every step one rank waited: mean over the two ranks of their idle calls >= 0.5
    traj = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert all(m["search/idle_generate_calls"] >= 0.5 for m in steps), [(t["question"], t["completion"]) for t in traj]
    # the main process writes its own rows only; TRL's seeded sampler gives it each question in one of the steps
    assert {t["question"] for t in traj} == {SEARCH_Q, DIRECT_Q}


def test_bad_input_fails_clearly(tmp_path, tokenizer):
    p = run_script("extras/plot_curves.py", tmp_path, check=False)
    assert p.returncode == 2 and "metrics.jsonl" in p.stderr and "Traceback" not in p.stderr
    grpo = load_script()
    with pytest.raises(utils.ReSearchError, match="missing.jsonl"):
        grpo.load_prompts(grpo.GRPOSearchArguments(train_data=str(tmp_path / "missing.jsonl")),
                          utils.SearchArguments(), tokenizer)
    with pytest.raises(utils.ReSearchError, match="max_prompt_length"):
        grpo.load_prompts(grpo.GRPOSearchArguments(train_data=str(ROOT / "data/mini/train.jsonl"),
                                                   max_prompt_length=10),
                          utils.SearchArguments(), tokenizer)
