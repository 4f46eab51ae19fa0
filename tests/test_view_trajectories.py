"""extras/view_trajectories.py rendered by a real browser (headless Chromium, Debian's `chromium`): real
rollouts (utils.search_rollout with the real SmolLM2 tokenizer, a scripted model and passages full of
< > & and tags) logged as 03_grpo_search.py, 02_sft_warmup.py and 04_eval.py log them; in the page the
browser built, each maximal run of data-mask="0" spans must read exactly as the result block and each
data-mask="1" run as the model's text."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import run_script

import utils
from extras.view_trajectories import write_page

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` (apt-get install -y chromium)")

PASSAGES = {  # query -> passages; the text a browser must not read as markup
    "Plan 9 director": [{"id": "0", "contents": '"Plan 9 <b>&amp;</b>"\nA 1957 film by Ed Wood; 5 < 6 > 4 & '
                                                 "</result> </script><script>document.title='x'</script>"},
                        {"id": "1", "contents": '"Ed Wood"\nEdward Davis Wood Jr. was an American filmmaker.'}],
    "Huangfu Mi": [{"id": "2", "contents": '"Huangfu Mi"\nHe wrote the Records of Emperors and Kings (帝王世纪) 🙂.'}],
}
SCRIPTS = {  # question -> (gold answers, the model's turns: each sampled on its own)
    "Who directed Plan 9?": (["Ed Wood"], ["<think> I should search. </think> <search> Plan 9 director </search>",
                                          "<think> And the book? </think> <search> Huangfu Mi </search>",
                                          "<think> Found it. </think> <answer> \\boxed{Ed Wood} </answer>"]),
    "What is the capital of France?": (["London"], ["<think> I know it. </think> <answer> \\boxed{Paris} </answer>"]),
}


def make_rollouts(tok):
    prompts = [utils.encode(utils.build_prompt(q, tok), tok) for q in SCRIPTS]
    calls = [0] * len(prompts)

    def generate(contexts, max_new_tokens):  # each row's next scripted turn, EOS after the last one
        outs = []
        for c in contexts:
            i = next(i for i, p in enumerate(prompts) if c[: len(p)] == p)
            turns = SCRIPTS[list(SCRIPTS)[i]][1]
            outs.append(tok(turns[calls[i]], add_special_tokens=False)["input_ids"]
                        + ([tok.eos_token_id] if calls[i] == len(turns) - 1 else []))
            calls[i] += 1
        return outs, None

    search = lambda queries, k: [PASSAGES[q][:k] for q in queries]  # noqa: E731
    rollouts = utils.search_rollout(prompts, generate, search, tok, {tok.eos_token_id}, max_completion_length=2000)
    return [(q, golds, r, utils.compute_reward(utils.reward_text(r, tok), golds, r.ended_with_eos))
            for (q, (golds, _)), r in zip(SCRIPTS.items(), rollouts)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class Cards(HTMLParser):
    """The rendered rollouts: each card's head text, its [mask, text] spans and every <script> seen."""
    def __init__(self, dom):
        super().__init__()
        self.cards, self.scripts, self.span, self.head = [], 0, None, False
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.scripts += tag == "script"
        if tag == "div" and a.get("class") == "card":
            self.cards.append({"head": "", "spans": [], "text": ""})
        self.head = tag == "div" and a.get("class") == "head"
        if tag == "span" and "data-mask" in a and self.cards:
            self.span = [int(a["data-mask"]), ""]
            self.cards[-1]["spans"].append(self.span)

    def handle_endtag(self, tag):
        self.span, self.head = None if tag == "span" else self.span, False

    def handle_data(self, data):
        if self.span is not None:
            self.span[1] += data
        elif self.cards:
            self.cards[-1]["head" if self.head else "text"] += data


def render(page, tmp_path, fragment=""):
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri() + fragment],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and "<body" in p.stdout, p.stderr[-2000:]
    return Cards(p.stdout)


def runs_of(spans):
    """Maximal runs of one mask value: [(mask, joined text, number of spans)]."""
    out = []
    for m, text in spans:
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + text, out[-1][2] + 1)
        else:
            out.append((m, text, 1))
    return out


def check_card(card, r, tok):
    """The page shows r's completion: mask-0 runs = the result blocks, mask-1 runs = the model's text."""
    got = runs_of(card["spans"])
    assert [(m, text) for m, text, _ in got] == [(m, tok.decode(ids)) for ids, m in r.segments()]
    blocks = [utils.format_result_block(PASSAGES[q][:5]) for q in r.queries]
    assert [text for m, text, _ in got if m == 0] == blocks  # byte for byte the blocks the model was given
    for (m, text, n), (ids, _) in zip(got, r.segments()):
        assert m == 0 or text.isascii() and n == len(ids)  # the model's runs: one span per token


@needs_chromium
def test_grpo_log_in_chromium(tokenizer, tmp_path):
    rows = make_rollouts(tokenizer)
    lines = [{"step": step, "question_id": f"q{i}", "question": q, "golden_answers": golds, "reward": s["reward"],
              "f1": s["f1"], "em": s["em"], "format_ok": s["format_ok"], "prediction": s["prediction"],
              "advantage": 0.5 - i, "ended_with_eos": r.ended_with_eos, "queries": r.queries,
              "num_searches": r.num_searches,
              "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
              "completion_ids": r.completion_ids, "mask_runs": [[m, len(ids)] for ids, m in r.segments()]}
             for step in (1, 2) for i, (q, golds, r, s) in enumerate(rows)]  # exactly as 03 writes them
    assert [r.num_searches for _, _, r, _ in rows] == [2, 0] and rows[0][3]["reward"] == 1.0
    (tmp_path / "run_config.json").write_text(json.dumps({"model": utils.DEFAULT_MODEL}))
    log = write_jsonl(tmp_path / "trajectories.jsonl", lines)
    run_script("extras/view_trajectories.py", log)  # the command line; the tokenizer named by run_config.json
    page = tmp_path / "trajectories.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text and " src=" not in text

    dom = render(page, tmp_path)
    assert dom.scripts == 2 and len(dom.cards) == 4  # the passage's <script> stayed text
    for card, (_, _, r, s) in zip(dom.cards, rows * 2):
        check_card(card, r, tokenizer)
        assert f"reward {s['reward']:.3g}" in card["text"] and "format ok True" in card["text"]
    assert "Kings (帝王世纪) 🙂." in runs_of(dom.cards[0]["spans"])[3][1]  # characters split over tokens
    assert "advantage 0.5" in dom.cards[0]["text"] and "prediction Paris" in dom.cards[1]["text"]
    # the filters, as the page's address sets them
    assert [c["head"] for c in render(page, tmp_path, "#step=2").cards] == ["#3 · step 2 · question_id q0",
                                                                            "#4 · step 2 · question_id q1"]
    assert [c["head"] for c in render(page, tmp_path, "#min=0.5&max=1").cards] == [
        "#1 · step 1 · question_id q0", "#3 · step 2 · question_id q0"]


@needs_chromium
def test_warmup_and_eval_logs_in_chromium(tokenizer, tmp_path, monkeypatch):
    rows = make_rollouts(tokenizer)
    q, golds, r, s = rows[0]
    warm = {"id": "w0", "dataset": "hotpotqa", "source": "supervision", "question": q, "golden_answers": golds,
            "queries": r.queries, "reward": s["reward"], "f1": s["f1"],
            "completion": tokenizer.decode(r.completion_ids),
            "num_prompt_tokens": len(r.prompt_ids), "num_tokens": len(r.prompt_ids + r.completion_ids),
            "mask_runs": [[m, len(ids)] for ids, m in r.segments()], "input_ids": r.prompt_ids + r.completion_ids,
            "assistant_masks": [0] * len(r.prompt_ids) + r.mask}  # as 02's make_record
    old = {k: v for k, v in warm.items() if k != "mask_runs"}  # an older warm-up log: assistant_masks only
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "warmup.json").write_text(json.dumps({"base_model": "models/SmolLM2-135M-Instruct"}))
    monkeypatch.chdir(tmp_path)  # a relative model path: relative to the repo when not to the cwd
    page = write_page(write_jsonl(tmp_path / "sft" / "trajectories.jsonl", [warm, old]))
    dom = render(page, tmp_path)
    assert len(dom.cards) == 2
    for card in dom.cards:
        check_card(card, r, tokenizer)

    research = {"id": "e0", "question": q, "golden_answers": golds, "prediction": s["prediction"], "em": 1.0,
                "f1": 1.0, "acc": 1.0, "num_searches": 2, "format_ok": True,
                "trajectory": {"response": utils.reward_text(r, tokenizer), "ended_with_eos": True, "searches": [],
                               "completion_ids": r.completion_ids,
                               "mask_runs": [[m, len(ids)] for ids, m in r.segments()]}}
    baseline = {"id": "e1", "question": "Capital of France?", "golden_answers": ["Paris"], "prediction": "Paris",
                "em": 1.0, "f1": 1.0, "acc": 1.0, "num_searches": 0, "trajectory": {"generation": "Paris <ok>"}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "settings.json").write_text(json.dumps({"model": utils.DEFAULT_MODEL}))
    page = write_page(write_jsonl(tmp_path / "eval" / "predictions.jsonl", [research, baseline]),
                      out=tmp_path / "eval.html")
    dom = render(page, tmp_path)
    check_card(dom.cards[0], r, tokenizer)
    assert dom.cards[1]["spans"] == [] and "no token ids" in dom.cards[1]["text"]
    assert "Paris <ok>" in dom.cards[1]["text"]  # a baseline's text, shown as text


def test_clear_errors(tmp_path, tokenizer):
    row = {"question": "q", "completion_ids": [1, 2], "mask_runs": [[1, 1]]}
    log = write_jsonl(tmp_path / "trajectories.jsonl", [row])
    with pytest.raises(utils.ReSearchError, match="--tokenizer"):
        write_page(log)
    with pytest.raises(utils.ReSearchError, match="mask_runs cover 1 tokens, the completion has 2"):
        write_page(log, tokenizer=tokenizer)
