"""02_sft_warmup.py: trajectories built from the data's supervision have the GRPO rollout's exact ids and
mask, score reward 1.0, unretrieved hops and bad rows are dropped with counts, and training on them
lowers the loss and writes a checkpoint the other stages can load."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import ROOT, load_stage, run_script

import utils

sft = load_stage("02_sft_warmup.py", "sft_warmup")
rejection = __import__("extras.rejection_sampling", fromlist=["rejection_sampling"])  # --source rollouts

TRAIN = utils.read_jsonl(ROOT / "data" / "mini" / "train.jsonl")
# 2 HotpotQA bridge rows, MuSiQue 2-hop rows and a 4-hop row with #1/#2/#3 references.
ROWS = [TRAIN[0], TRAIN[2], TRAIN[100], TRAIN[101], TRAIN[103]]
SARGS = utils.SearchArguments(retriever="tiny", topk=2, passage_max_words=12, max_searches=4)


def tiny_search(passages: list[str]):
    """A small deterministic retriever over the given passage contents: rank by the number of distinct
    query words in the passage (ties by corpus order), passages sharing no word are never returned."""
    docs = [{"id": str(i), "contents": c} for i, c in enumerate(passages)]
    words = [set(re.findall(r"\w+", c.lower())) for c in passages]

    def search(queries, k):
        out = []
        for q in queries:
            qw = set(re.findall(r"\w+", q.lower())) - {"the", "of", "a", "in", "is", "what", "who", "was"}
            scored = sorted(((len(qw & w), -i) for i, w in enumerate(words)), reverse=True)
            out.append([docs[-i] for s, i in scored[:k] if s > 0])
        return out

    return search


CORPUS = sorted({p for r in TRAIN[:10] + TRAIN[100:110] for p in r["metadata"]["supporting_passages"]})
SEARCH = tiny_search(CORPUS)


@pytest.fixture(scope="module")
def built(tokenizer):
    records, stats = sft.build_from_supervision(ROWS, tokenizer, SEARCH, SARGS, 512, tokenizer.eos_token_id)
    return records, stats


def replay(records, tokenizer, search):
    """Drive utils.search_rollout (the GRPO rollout loop) with a scripted generate function that replays
    each trajectory's model tokens, followed by junk the loop must trim (as a real generate returns
    ids past the stop string, or pad = EOS after EOS)."""
    by_prompt = {tuple(r["input_ids"][: r["num_prompt_tokens"]]): r for r in records}
    junk = tokenizer(" more text <think>", add_special_tokens=False)["input_ids"]

    def generate(contexts, max_new_tokens):
        outs = []
        for c in contexts:
            r = next(v for k, v in by_prompt.items() if tuple(c[: len(k)]) == k)
            ids, mask = r["input_ids"], r["assistant_masks"]
            assert ids[: len(c)] == c, "the rollout's context left the trajectory"
            end = len(c)
            while end < len(ids) and mask[end]:
                end += 1
            tail = junk if end < len(ids) else [tokenizer.pad_token_id] * 3
            outs.append((ids[len(c) : end] + tail)[:max_new_tokens])
        return outs, None

    prompts = [r["input_ids"][: r["num_prompt_tokens"]] for r in records]
    return utils.search_rollout(prompts, generate, search, tokenizer, {tokenizer.eos_token_id},
                                max_completion_length=512, topk=SARGS.topk, max_searches=SARGS.max_searches,
                                passage_max_words=SARGS.passage_max_words)


def test_supervision_trajectories_are_the_grpo_rollouts_ids_and_mask(built, tokenizer):
    records, stats = built
    assert stats["kept"] == len(ROWS) == len(records), stats
    assert {r["dataset"] for r in records} == {"hotpotqa", "musique"}
    rollouts = replay(records, tokenizer, SEARCH)
    for rec, ro in zip(records, rollouts):
        p = rec["num_prompt_tokens"]
        prompt = utils.encode(utils.build_prompt(rec["question"], tokenizer), tokenizer)
        assert rec["input_ids"][:p] == prompt
        # Same ids (no re-tokenisation drift at any segment boundary) and the same loss mask.
        assert rec["input_ids"][p:] == ro.completion_ids
        assert rec["assistant_masks"] == [0] * p + ro.mask
        assert ro.ended_with_eos and rec["input_ids"][-1] == tokenizer.eos_token_id and rec["assistant_masks"][-1] == 1
        assert rec["queries"] == ro.queries
        # The masked part of the completion is exactly the result blocks, one per search, byte for byte.
        masked = [ids for ids, m in ro.segments() if m == 0]
        assert len(masked) == len(rec["queries"]) >= 2
        for ids, q in zip(masked, rec["queries"]):
            assert tokenizer.decode(ids) == utils.format_result_block(SEARCH([q], SARGS.topk)[0], SARGS.passage_max_words)
        # ... and everything else is the model's own text; mask_runs (the viewer's) says the same.
        assert rec["mask_runs"] == [[m, len(ids)] for ids, m in ro.segments()] and rec["mask_runs"][0][0] == 1
        trained = "".join(tokenizer.decode(ids) for ids, m in ro.segments() if m)
        assert utils.RESULT_OPEN not in trained


def test_every_trajectory_scores_reward_one(built, tokenizer):
    records, _ = built
    for rec in records:
        p = rec["num_prompt_tokens"]
        ro = utils.Rollout(prompt_ids=rec["input_ids"][:p], completion_ids=rec["input_ids"][p:],
                           mask=rec["assistant_masks"][p:], ended_with_eos=True)
        score = utils.compute_reward(utils.reward_text(ro, tokenizer), rec["golden_answers"], True)
        assert score["reward"] == 1.0 and score["format_ok"], (rec["completion"], score)
    musique_4hop = next(r for r in records if r["id"] == TRAIN[101]["id"])
    # #1/#2/#3 references are filled with the earlier hops' answers.
    assert musique_4hop["queries"][1] == "What city did Hank Snow live when he died?"
    assert "#" not in " ".join(musique_4hop["queries"]) and ">>" not in musique_4hop["queries"][0]


def test_a_hop_that_is_not_retrieved_drops_the_trajectory(tokenizer):
    hidden = TRAIN[100]["metadata"]["supporting_passages"][1]  # the 2nd hop's passage of one MuSiQue row

    def search(queries, k):
        return [[p for p in row if p["contents"] != hidden] for row in SEARCH(queries, k)]

    records, stats = sft.build_from_supervision(ROWS, tokenizer, search, SARGS, 512, tokenizer.eos_token_id)
    assert stats["hop_not_retrieved"] == 1 and stats["kept"] == len(ROWS) - 1
    assert TRAIN[100]["id"] not in {r["id"] for r in records}
    # A budget too small for the result blocks drops (never truncates) the rest.
    records, stats = sft.build_from_supervision(ROWS, tokenizer, SEARCH, SARGS, 60, tokenizer.eos_token_id)
    assert records == [] and stats["longer_than_max_completion_length"] == len(ROWS)


def test_bad_rows_are_skipped_with_a_count(tokenizer):
    good = json.loads(json.dumps(TRAIN[0]))
    good["unexpected_field"] = {"anything": 1}  # extra fields are ignored, the row is still used
    bad = [
        {"id": "a", "question": "Who?", "golden_answers": ["x"]},  # no metadata at all
        {"id": "b", "question": "Who?", "golden_answers": ["x"], "metadata": {"dataset": "nq", "foo": 1}},
        {"id": "c", "question": "Who?", "golden_answers": [], "metadata": TRAIN[0]["metadata"]},
        {"id": "d", "question": "Who?", "golden_answers": ["  "], "metadata": TRAIN[0]["metadata"]},
        {"id": "e", "question": "", "golden_answers": ["x"], "metadata": TRAIN[0]["metadata"]},
        {"id": "f", "question": "Who?", "golden_answers": ["x"],
         "metadata": {**TRAIN[100]["metadata"], "decomposition": "not a list"}},
        {"id": "g", "question": "Who?", "golden_answers": ["x"],  # a reference to a later hop
         "metadata": {**TRAIN[100]["metadata"], "decomposition": [
             {"question": "What is #2 ?", "answer": "y"}, {"question": "Where?", "answer": "x"}]}},
        {"id": "h", "question": "Who?", "golden_answers": ["x"],
         "metadata": {**TRAIN[0]["metadata"], "supporting_titles": ["only one"]}},
        {"id": "i", "question": "Who?", "golden_answers": ["The"], "metadata": TRAIN[0]["metadata"]},
        {"id": "j", "question": "Who?", "golden_answers": ["x"], "metadata": "not a dict"},
        ["not", "an", "object"],
    ]
    records, stats = sft.build_from_supervision(bad + [good], tokenizer, SEARCH, SARGS, 512, tokenizer.eos_token_id)
    assert [r["id"] for r in records] == [good["id"]]
    assert stats == {"kept": 1, "no_supporting_info": 3, "empty_answer": 2, "no_question": 1,
                     "malformed_decomposition": 2, "malformed_supporting_titles": 1, "unscorable_answer": 1,
                     "not_an_object": 1}


def test_rejection_sampling_keeps_only_passing_rollouts(built, tokenizer):
    records, _ = built
    rec = records[0]
    p = rec["num_prompt_tokens"]
    right = rec["input_ids"][p:]
    wrong = tokenizer(f"<think> no idea </think>{sft.answer_text('nobody')}", add_special_tokens=False)["input_ids"]
    rows = [ROWS[0], ROWS[2], {"question": "q", "golden_answers": []}]

    def generate(contexts, max_new_tokens):  # row 0 replays its gold trajectory, row 1 answers wrong
        outs = []
        for c in contexts:
            if c[: p] == rec["input_ids"][:p]:
                done = len(c) - p
                end = done
                while end < len(right) and rec["assistant_masks"][p + end]:
                    end += 1
                outs.append(right[done:end])
            else:
                outs.append(wrong + [tokenizer.eos_token_id])
        return outs, None

    args = sft.WarmupArguments(rollout_samples=2, min_f1=0.8)
    kept, stats = rejection.build_from_rollouts(rows, tokenizer, SEARCH, SARGS, args, generate, tokenizer,
                                                {tokenizer.eos_token_id}, tokenizer.eos_token_id, sft.make_record)
    assert stats == {"kept": 1, "f1_below_min": 1, "empty_answer": 1}
    assert kept[0]["input_ids"] == rec["input_ids"] and kept[0]["assistant_masks"] == rec["assistant_masks"]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # ReSearch's /batch_search
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = json.dumps(SEARCH(body["query"], body["top_n"])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def retrieval_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def masked_nll(model, records) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]])
            k = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * k
            n += k
    return total / n


def test_script_trains_and_writes_a_loadable_checkpoint(tmp_path, tiny_model_dir, tiny_model, retrieval_server):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS + [{"id": "x", "question": "Who?", "golden_answers": [""]}]))
    out = tmp_path / "sft"
    p = run_script("02_sft_warmup.py", "--model", tiny_model_dir, "--train_data", train, "--retriever", retrieval_server,
                   "--topk", 2, "--passage_max_words", 12, "--max_searches", 4, "--output_dir", out,
                   "--learning_rate", 3e-3, "--max_steps", 6, "--per_device_train_batch_size", 2,
                   "--logging_steps", 1, "--gradient_checkpointing", "true", timeout=300)
    assert "kept 5/6 rows" in p.stdout and "empty_answer 1" in p.stdout
    assert not (tmp_path / "sft.tmp").exists()
    meta = json.loads((out / "warmup.json").read_text())
    assert (meta["topk"], meta["passage_max_words"], meta["max_searches"], meta["max_completion_length"]) == (2, 12, 4, 512)
    assert meta["retriever"] == retrieval_server and meta["yield"]["kept"] == 5 and meta["result"]["steps"] == 6
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 5
    # The checkpoint loads as a plain model (what 03/04 do with --model) and fits the trajectories better.
    tuned = utils.load_model(str(out), device="cpu")
    assert utils.load_tokenizer(str(out)).eos_token_id == tiny_model.config.eos_token_id
    before, after = masked_nll(tiny_model, records), masked_nll(tuned, records)
    assert after < before - 0.5, (before, after)


def test_lora_training_merges_into_a_plain_checkpoint(tmp_path, tiny_model_dir, tiny_model, built, tokenizer):
    from trl import SFTConfig
    records, _ = built
    targs = SFTConfig(output_dir=str(tmp_path / "tr"), max_steps=4, learning_rate=1e-2, per_device_train_batch_size=2,
                      bf16=False, save_strategy="no", report_to="none", gradient_checkpointing=False)
    args = sft.WarmupArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj")
    result = sft.train(records, tiny_model_dir, tokenizer, targs, args, tmp_path / "ckpt")
    assert result["steps"] == 4
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()
    tuned = utils.load_model(str(tmp_path / "ckpt"), device="cpu")
    changed = [n for n, p in tuned.named_parameters()
               if not torch.equal(p, dict(tiny_model.named_parameters())[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    assert masked_nll(tuned, records) < masked_nll(tiny_model, records)
