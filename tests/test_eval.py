"""04_eval.py: metrics, baseline answer parsing, the judge against a real OpenAI-compatible server
(`transformers serve` on 127.0.0.1), every method end to end, the api back end, resume, errors.

A "scripted" model makes the end-to-end checks able to fail: a 2-layer model trained here (~20 s)
until greedy decoding reproduces, token for token, (1) a ReSearch trajectory for the first mini
HotpotQA question (one search, then \\boxed{yes}), (2) the naive-generation answer "Paris" to a
France question, and (3) the judge's JSON verdict "correct" for that answer. The random tiny model
gives garbage, i.e. a malformed judge reply."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, load_stage, run_script

import utils

ev = load_stage("04_eval.py", "eval04")
tables = __import__("extras.results_table", fromlist=["results_table"])
api = __import__("extras.api_backend", fromlist=["api_backend"])  # --backend api
judging = __import__("extras.judge", fromlist=["judge"])  # --judge_base_url
resume = __import__("extras.resume", fromlist=["resume"])  # a rerun resumes

CPU = ["--topk", "3", "--passage_max_words", "30", "--max_searches", "4", "--max_completion_length", "256"]
# Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads per
# process make them ~20x slower (measured): one thread everywhere in this file.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run(*args, **kw):
    return run_script(*args, env=ONE_THREAD, **kw)
Q1 = "Were Scott Derrickson and Ed Wood of the same nationality?"  # first question of mini hotpotqa dev
FRANCE = {"id": "fr", "question": "What is the capital of France?", "golden_answers": ["Paris"]}
JUDGE_OK = '{"rationale": "same city", "judgement": "correct"}'


# ---------------------------------------------------------------------------------------------
# Metrics and parsing (hand-worked)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, golds, em, f1, acc", [
    ("Yes", ["yes"], 1, 1, 1),
    ("yes", ["no"], 0, 0, 0),
    ("no, they were not", ["no"], 0, 0, 1),  # yes/no rule: F1 0 unless equal; acc = containment
    ("Nottingham", ["no"], 0, 0, 1),  # acc is string containment (FlashRAG's), so "no" is in "nottingham"
    ("The Beatles", ["Beatles"], 1, 1, 1),  # articles dropped
    ("U.S.A.", ["USA"], 1, 1, 1),  # punctuation dropped
    ("Ed Wood Jr", ["Edward Davis Wood Jr."], 0, 4 / 7, 0),  # P 2/3, R 2/4
    ("NYC", ["New York City", "NYC"], 1, 1, 1),  # best of several golds
    ("new york", ["New York City", "Big Apple"], 0, 0.8, 0),  # P 1, R 2/3
    ("Beyoncé", ["Beyonce"], 0, 0, 0),  # SQuAD normalisation keeps accents
    ("Beyoncé Knowles", ["beyoncé"], 0, 2 / 3, 1),
    ("“Hello”", ["hello"], 0, 0, 1),  # curly quotes are not string.punctuation
    ("1939–1945", ["1939-1945"], 0, 0, 0),  # en dash kept, hyphen dropped
    ("", ["Paris"], 0, 0, 0),
    ("Paris", ["", "paris"], 1, 1, 1),  # an empty gold never matches by containment
])
def test_metrics_hand_worked(pred, golds, em, f1, acc):
    assert utils.exact_match(pred, golds) == em
    assert utils.f1_score(pred, golds) == pytest.approx(f1)
    assert ev.cover_match(pred, golds) == acc


# How evaluation reads the research answer: as the reference's ReSearchPipeline.run_item does (its
# extract_answer, last_boxed_only_string and remove_boxed), cases worked out from that code by hand.
@pytest.mark.parametrize("text, eos, want", [
    (" <think> a </think> <answer> The final answer is \\[ \\boxed{Paris} \\] </answer>", True, "Paris"),
    (" <think> a </think> <answer> The final answer is \\[ \\boxed{Paris} \\] </answer>", False, None),  # no EOS
    (" <answer> \\boxed{A} </answer> <answer> \\boxed{B} </answer>", True, "A"),  # two blocks: the first
    (" <think> a </think> <answer> \\boxed{A}", True, None),  # never closed: nothing
    (" <answer> \\boxed{A} <answer> \\boxed{B} </answer>", True, "B"),  # first <answer> to first </answer>
    (" <answer> \\boxed{A} or \\boxed{B} </answer>", True, "B"),  # the last box
    (" <answer> \\boxed{ Paris } </answer>", True, " Paris "),  # not stripped (EM normalises anyway)
    (" <answer> \\boxed Paris$ and </answer>", True, "Paris"),  # "\boxed x" runs to the next $
    (" <answer> \\boxed{\\text{New York}} </answer>", True, "\\text{New York}"),  # nested braces
    (" <answer> \\boxed{a </answer>", True, None),  # unbalanced
    (" <answer> \\fbox{x} </answer>", True, None),
    (" <answer> Paris </answer>", True, None),  # no box
    ("<answer> \\boxed{X} </answer>", True, "X"),  # no <think>: the format is not checked
    (" <answer> \\boxed{} </answer>", True, ""),
])
def test_eval_prediction_reads_as_the_reference(text, eos, want):
    assert ev.eval_prediction(text, eos) == want


def test_eval_and_the_training_reward_differ_where_the_reference_does():
    two = " <think> a </think> <answer> \\boxed{A} </answer> <answer> \\boxed{B} </answer>"
    assert utils.compute_reward(two, ["B"], True)["reward"] == 0.0  # the reward: two answers is a bad format
    assert ev.eval_prediction(two, True) == "A"  # evaluation: the first, format unchecked
    unclosed = " <think> a </think> <answer> \\boxed{A}"
    assert utils.extract_answer(unclosed) == "A" and ev.eval_prediction(unclosed, True) is None


def test_bootstrap_ci_is_seeded_paired_and_brackets_the_mean():
    import random
    rng = random.Random(1)
    before = [float(rng.random() < 0.3) for _ in range(300)]
    after = [b if rng.random() < 0.9 else 1.0 for b in before]  # mostly the same questions right, a few more
    mean, low, high = tables.bootstrap_ci(after)
    assert tables.bootstrap_ci(after) == [mean, low, high] and low < mean < high  # seeded: the same every time
    assert mean == pytest.approx(100 * sum(after) / len(after), abs=0.01)
    assert tables.bootstrap_ci([1.0] * 10) == [100.0, 100.0, 100.0] and tables.bootstrap_ci(after, after) == [0.0, 0.0, 0.0]
    d_mean, d_low, d_high = tables.bootstrap_ci(after, before)
    assert d_mean == pytest.approx(mean - tables.bootstrap_ci(before)[0], abs=0.01) and 0 < d_low < d_mean < d_high
    # pairing removes the spread the two runs share: far narrower than either run's own interval
    assert d_high - d_low < (high - low) / 2


def test_ircot_keeps_every_passage_by_best_score_ascending(mini_index, tokenizer):
    """FlashRAG's IRCOTPipeline: the first prompt lists the question's passages in retrieval order; once a
    thought has searched, every passage found so far, each at its best score, ascending (best last); no
    cap; a thought saying "So the answer is:" stops the loop; the prediction is the text after it."""
    search = utils.load_retriever(mini_index)
    thoughts = [" Scott Derrickson is an American director.", " Ed Wood was an American filmmaker.",
                " Doctor Strange is a 2016 film.", " Plan 9 from Outer Space is a film.", " So the answer is: yes."]
    prompts = []

    def complete(batch_prompts, max_new_tokens, stop=None):
        assert stop == [".", "\n"]
        prompts.extend(batch_prompts)
        return [thoughts[len(prompts) - 1]]

    e = SimpleNamespace(tok=tokenizer, complete=complete, search=search, args=ev.EvalArguments(),
                        sargs=utils.SearchArguments(retriever=mini_index, topk=5))
    (out,) = ev.run_ircot([{"question": Q1}], e)
    assert out["prediction"] == "yes." and out["num_searches"] == 5 and len(prompts) == 5
    best: dict[str, tuple] = {}
    for i, query in enumerate([Q1] + thoughts[:4]):
        for p, s in search.scored([query], 5)[0]:
            best[p["id"]] = (p, max(s, best.get(p["id"], (p, s))[1]))
        order = [p for p, _ in search.scored([Q1], 5)[0]] if i == 0 else \
            [p for p, _ in sorted(best.values(), key=lambda ps: ps[1])]
        listed = "".join(ev.references(order, "Wikipedia Title: {title}\n{text}\n\n", 0))
        assert prompts[i].split(ev.IRCOT_EXAMPLE)[1] == f"\n\n{listed}Question: {Q1}\nThought:" + " ".join(thoughts[:i])
    assert prompts[4].count("Wikipedia Title:") - ev.IRCOT_EXAMPLE.count("Wikipedia Title:") > 15  # no cap


def test_every_back_end_stops_at_the_generation_configs_eos_ids(tmp_path, tiny_model_dir, mini_index):
    """Qwen2.5-Instruct's generation config lists two stop ids; the tokenizer knows one. Every back end
    stops at both: load_engine reads them before it builds any back end (here hf, on the tiny model)."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, 7]}))
    e = ev.load_engine(ev.EvalArguments(model=str(tmp_path / "m"), backend="hf"),
                       utils.SearchArguments(retriever=mini_index))
    assert {2, 7} <= e.eos_ids


def test_judge_reply_parsing_and_prompt():
    assert judging.parse_judge_reply(JUDGE_OK) == "correct"
    assert judging.parse_judge_reply('```json\n{"rationale": "r", "judgement": "Incorrect "}\n```') == "incorrect"
    assert judging.parse_judge_reply('Sure! {"rationale": "r", "judgement": "correct"} Hope this helps') == "correct"
    for bad in ['{"judgement": "maybe"}', '{"rationale": "r"}', "correct", "[1, 2]", "", '{"judgement": "corr']:
        assert judging.parse_judge_reply(bad) is None
    # The paper's prompt: gold answers as a Python list repr, braces kept literally.
    assert "ground truth answers: ['Paris', 'City of Light']\npred_answer: x\n" in judging.JUDGE_PROMPT.replace(
        "{gt_answer}", str(["Paris", "City of Light"])).replace("{pred_answer}", "x")
    assert judging.JUDGE_PROMPT.endswith('can only be \'correct\' or \'incorrect\'"\n}\n```\n\nYour output:')


def test_api_text_to_ids(tokenizer):
    eos = tokenizer.eos_token_id
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    # transformers serve returns the stop string; vLLM names it (stop_reason); OpenAI only says "stop"
    assert api.api_ids_from_text(" <search> x </search>", "stop", None, tokenizer, eos) == enc(" <search> x </search>")
    assert api.api_ids_from_text(" <search> x ", "stop", "</search>", tokenizer, eos) == enc(" <search> x </search>")
    assert api.api_ids_from_text(" <search> x ", "stop", None, tokenizer, eos) == enc(" <search> x </search>")
    assert api.api_ids_from_text(" <answer> y </answer>", "stop", None, tokenizer, eos) == enc(" <answer> y </answer>") + [eos]
    assert api.api_ids_from_text(" <search> x ", "stop", eos, tokenizer, eos) == enc(" <search> x ") + [eos]  # SGLang: EOS id
    assert api.api_ids_from_text(" abc", "length", None, tokenizer, eos) == enc(" abc")


def test_read_predictions_tolerates_only_a_truncated_last_line(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "predic')
    assert list(resume.read_predictions(p)) == ["a", "b"]
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'  # cut, so appending continues cleanly
    p.write_text('{"id": "a"}\n{"id": "b"}')  # complete but unterminated: kept, and terminated
    assert list(resume.read_predictions(p)) == ["a", "b"] and p.read_text().endswith("}\n")
    p.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(utils.ReSearchError, match=r"predictions.jsonl:2"):
        resume.read_predictions(p)
    p.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(utils.ReSearchError, match="duplicate id"):
        resume.read_predictions(p)


# ---------------------------------------------------------------------------------------------
# Fixtures: the scripted model and a real OpenAI-compatible server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted_model_dir(tmp_path_factory, tokenizer, mini_index):
    # "instruct" in its path: FlashRAG's rule gives the baselines chat prompts
    return train_scripted_model(tmp_path_factory.mktemp("scripted-instruct"), tokenizer, mini_index)


def train_scripted_model(out: Path, tok, mini_index: str, heads: int = 4, kv_heads: int = 2, extra=()) -> str:
    """The scripted model, saved in out. heads / kv_heads: 4 / 2 (head size 16) here; tests/test_vllm.py
    asks for 2 / 1 (head size 32: vLLM's CPU attention takes 32 and up) and extra sequences (same layout)."""
    import torch
    import transformers
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    search = utils.load_retriever(mini_index)
    engine = SimpleNamespace(tok=tok, sargs=utils.SearchArguments(), args=SimpleNamespace(model=str(out)))
    block = utils.format_result_block(search(["Scott Derrickson"], 3)[0], 30)
    judge_prompt = (judging.JUDGE_PROMPT.replace("{question}", FRANCE["question"])
                    .replace("{gt_answer}", str(FRANCE["golden_answers"])).replace("{pred_answer}", "Paris"))
    # (ids, trained?) pieces, laid out exactly as evaluation builds them
    seqs = [
        [(utils.encode(utils.build_prompt(Q1, tok), tok), 0),
         (ids(" <think> I need his nationality. </think> <search> Scott Derrickson </search>"), 1), (ids(block), 0),
         (ids(" <think> Both are American. </think> <answer> The final answer is \\[ \\boxed{yes} \\] </answer>")
          + [tok.eos_token_id], 1)],
        [(utils.encode(ev.chat_or_plain(ev.NAIVE_GEN_SYSTEM, f"Question: {FRANCE['question']}", engine), tok), 0),
         (ids("Paris") + [tok.eos_token_id], 1)],
        [(utils.encode(tok.apply_chat_template([{"role": "user", "content": judge_prompt}], tokenize=False,
                                                      add_generation_prompt=True), tok), 0),
         (ids(JUDGE_OK) + [tok.eos_token_id], 1)],
        *extra,
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=4096,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    rows = [(torch.tensor([[t for p, _ in s for t in p]]), torch.tensor([t if f else -100 for p, f in s for t in p]))
            for s in seqs]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def logits_and_targets(x, lab):  # only the trained positions go through the 49k-word head
        y = lab[1:]
        return model.lm_head(model.model(input_ids=x).last_hidden_state[0, :-1][y != -100]), y[y != -100]

    for step in range(600):
        opt.zero_grad()
        for x, lab in rows:
            torch.nn.functional.cross_entropy(*logits_and_targets(x, lab)).backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():
                if all(bool((lg.argmax(-1) == y).all()) for lg, y in (logits_and_targets(x, lab) for x, lab in rows)):
                    break
    else:
        pytest.fail("the scripted model did not learn its trajectories")
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`transformers serve` on loopback, offline, loading whichever local model a request names."""
    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        pytest.fail(f"{exe} missing: transformers[serving] is in requirements.txt")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **ONE_THREAD)
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not come up in 120 s")
        yield url + "/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def judge_args(url, model, **kw):
    return ev.EvalArguments(judge_base_url=url, judge_model=model, judge_retries=2, judge_backoff=0.05,
                            judge_max_tokens=24, **kw)


# ---------------------------------------------------------------------------------------------
# The judge against the real server
# ---------------------------------------------------------------------------------------------
def test_judge_client_real_server(server, scripted_model_dir, tiny_model_dir):
    ok = judging.make_judge(judge_args(server, scripted_model_dir))(FRANCE["question"], FRANCE["golden_answers"], "Paris")
    assert ok["status"] == "ok" and ok["judgement"] == "correct" and ok["raw"] == JUDGE_OK
    # A random model answers garbage: retried, then reported failed with the raw reply kept.
    bad = judging.make_judge(judge_args(server, tiny_model_dir))(FRANCE["question"], FRANCE["golden_answers"], "Paris")
    assert bad["status"] == "failed" and bad["judgement"] is None and bad["error_kind"] == "unparseable"
    assert isinstance(bad["raw"], str)
    # An empty prediction is wrong without a call; a server that is down fails with a clear error.
    down = judging.make_judge(judge_args(f"http://127.0.0.1:{free_port()}/v1", "m"))
    assert down("q", ["a"], "")["judgement"] == "incorrect"
    res = down("q", ["a"], "b")
    assert res["status"] == "failed" and res["error_kind"] == "connection" and "Connection" in res["error"]


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------
def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_method_writes_its_row(tmp_path, scripted_model_dir, mini_index):
    out = tmp_path / "ev"
    run("04_eval.py", "--model", scripted_model_dir, "--retriever", mini_index, *CPU, "--limit", "3",
               "--batch_size", "2", "--output_dir", out)
    res = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert res["header"]["corpus"].endswith("data/mini/corpus.jsonl") and res["search"]["topk"] == 3
    for m, row in ev.ROW_NAMES.items():
        recs = read_jsonl(out / m / "mini_hotpotqa_dev" / "predictions.jsonl")
        first3 = [json.loads(line)["id"] for line in open(ROOT / "data/mini/hotpotqa_dev.jsonl")][:3]
        assert [r["id"] for r in recs] == first3  # file order, --limit = first N
        for r in recs:
            assert {"id", "question", "golden_answers", "prediction", "em", "f1", "acc", "judge", "num_searches",
                    "trajectory"} <= set(r) and r["judge"] is None
        cell = res["cells"][m]["mini_hotpotqa_dev"]
        assert cell["n"] == 3 and cell["lj"] is None
        assert cell["em"] == pytest.approx(100 * sum(r["em"] for r in recs) / 3)
        assert table.count(f"| {row} |") == 1
    research = read_jsonl(out / "research" / "mini_hotpotqa_dev" / "predictions.jsonl")[0]
    assert research["prediction"] == "yes" and research["em"] == 1 and research["format_ok"] is True
    assert research["num_searches"] == 1
    assert research["trajectory"]["queries"] == ["Scott Derrickson"]
    assert research["trajectory"]["titles"][0][0] == "Scott Derrickson"
    assert res["cells"]["naive-rag"]["mini_hotpotqa_dev"]["mean_searches"] == 1
    assert res["cells"]["iter-retgen"]["mini_hotpotqa_dev"]["mean_searches"] == 3
    assert 1 <= res["cells"]["ircot"]["mini_hotpotqa_dev"]["mean_searches"] <= 6  # the question + up to 5 thoughts
    assert res["cells"]["research"]["mini_hotpotqa_dev"]["format_valid"] == pytest.approx(100 / 3)


def test_resume_after_interruption(tmp_path, tiny_model_dir, mini_index):
    out = tmp_path / "ev"
    pred = out / "naive-rag" / "mini_hotpotqa_dev" / "predictions.jsonl"
    args = ["04_eval.py", "--model", tiny_model_dir, "--retriever", mini_index, *CPU, "--methods", "naive-rag",
            "--limit", "8", "--batch_size", "1", "--output_dir", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **ONE_THREAD)
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if pred.exists() and pred.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    before = [line for line in pred.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 2 <= len(before) < 8, "the run should have been killed part-way"
    with open(pred, "a") as f:
        f.write('{"id": "5ab3b0bf5542992ade7c6e39", "question": "What ')  # a write cut short
    p = run(*args)
    assert f"{len(before)} already done" in p.stderr
    after = pred.read_text().splitlines(keepends=True)
    assert after[: len(before)] == before  # finished questions not re-generated
    ids = [json.loads(line)["id"] for line in after]
    assert len(ids) == len(set(ids)) == 8
    assert ids == [json.loads(line)["id"] for line in open(ROOT / "data/mini/hotpotqa_dev.jsonl")][:8]
    # Other settings in the same folder are refused rather than mixed in.
    p = run(*args[:-2], "--output_dir", out, "--topk", "2", check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_api_backend_and_judge_in_the_script(tmp_path, server, scripted_model_dir, mini_index):
    qfile = tmp_path / "q.jsonl"
    first = json.loads(open(ROOT / "data/mini/hotpotqa_dev.jsonl").readline())
    qfile.write_text(json.dumps(FRANCE) + "\n" + json.dumps(first) + "\n")
    out, tag = tmp_path / "ev", f"{qfile.parent.name}_q"
    common = ["04_eval.py", "--model", scripted_model_dir, "--backend", "api", "--api_base_url", server,
              "--retriever", mini_index, *CPU, "--methods", "naive-gen", "research", "--datasets", qfile,
              "--output_dir", out, "--judge_model", scripted_model_dir, "--judge_retries", "2",
              "--judge_backoff", "0.05", "--judge_max_tokens", "24"]
    # 1) the judge is down: predictions are kept, every judged item counts as failed, LJ = 0 of 2
    p = run(*common, "--judge_base_url", f"http://127.0.0.1:{free_port()}/v1")
    assert "judge unreachable" in p.stderr
    res = json.loads((out / "results.json").read_text())
    gen = read_jsonl(out / "naive-gen" / tag / "predictions.jsonl")
    assert gen[0]["prediction"] == "Paris" and gen[0]["em"] == 1
    assert all(r["judge"]["status"] in ("failed", "empty") for r in gen)
    cell = res["cells"]["naive-gen"][tag]
    assert cell["n"] == 2 and cell["lj"] == 0 and cell["judge_failed"] == sum(r["judge"]["status"] == "failed" for r in gen)
    research = read_jsonl(out / "research" / tag / "predictions.jsonl")
    assert research[1]["prediction"] == "yes" and research[1]["num_searches"] == 1  # through /v1/completions
    # 2) the judge is up: nothing is re-generated, the failed items are judged now
    p = run(*common, "--judge_base_url", server)
    assert "2 already done" in p.stderr
    gen2 = read_jsonl(out / "naive-gen" / tag / "predictions.jsonl")
    assert [r["seconds"] for r in gen2] == [r["seconds"] for r in gen]
    assert gen2[0]["judge"]["status"] == "ok" and gen2[0]["judge"]["judgement"] == "correct"
    cell = json.loads((out / "results.json").read_text())["cells"]["naive-gen"][tag]
    correct = sum(r["judge"]["judgement"] == "correct" for r in gen2)
    assert cell["lj"] == pytest.approx(100 * correct / 2) and correct >= 1
    assert cell["judge_failed"] == sum(r["judge"]["status"] == "failed" for r in gen2)


def test_ask_mode_prints_the_trajectory(scripted_model_dir, mini_index):
    p = run("04_eval.py", "--model", scripted_model_dir, "--retriever", mini_index, *CPU, "--question", Q1)
    assert "[search] 'Scott Derrickson'" in p.stdout and "[1] Scott Derrickson" in p.stdout
    assert "answer: 'yes'" in p.stdout


def test_user_errors(tmp_path, tiny_model_dir):
    p = run("04_eval.py", "--model", tiny_model_dir, "--datasets", "nosuchdataset", check=False)
    assert p.returncode == 2 and "unknown dataset 'nosuchdataset'" in p.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n{"id": "2", "question": \n')
    p = run("04_eval.py", "--model", tiny_model_dir, "--datasets", broken, check=False)
    assert p.returncode == 2 and f"{broken}:2" in p.stderr
    p = run("04_eval.py", "--methods", "self-rag", check=False)
    assert p.returncode == 2 and "--methods ['self-rag']" in p.stderr and "the methods are" in p.stderr
    assert not (ROOT / "runs" / "eval" / Path(tiny_model_dir).name).exists()  # nothing written
