"""utils.py: prompts, query extraction, the result block, metrics and the ReSearch reward, hand-worked."""

import json
import re

import pytest

import utils
from conftest import ROOT

GOOD = ("<think> I need the director. </think> <search> Ed Wood director </search> <result>\n</result> "
        "<think> It is Tim Burton. </think> <answer> The final answer is \\[ \\boxed{Tim Burton} \\] </answer>")


# ---------------------------------------------------------------------------------------------- prompts
def test_base_prompt_exact_bytes():
    p = utils.build_prompt("Who directed Ed Wood?", tokenizer=None, template="base")
    assert p.startswith("A conversation between User and Assistant. The user asks a question, and the assistant solves it.")
    assert p.endswith("within \\boxed{} with latex format. User: Who directed Ed Wood?. Assistant:")
    # the question is inserted raw, so "?" becomes "?." exactly as in the reference
    assert "<answer> The final answer is \\[ \\boxed{answer here} \\] </answer>." in p
    assert p.count("{") == 2  # no format() placeholders left behind


def test_chat_prompt_uses_system_message(tokenizer):
    p = utils.build_prompt("Who directed Ed Wood?", tokenizer, template="auto")
    assert p.startswith("<|im_start|>system\nYou are a helpful assistant that can solve the given question step by step")
    assert "<|im_start|>user\nWho directed Ed Wood?<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n")
    assert utils.SYSTEM_PROMPT.endswith("the final exact answer is enclosed within \\boxed{} with latex format.")
    with pytest.raises(utils.ReSearchError, match="prompt_template"):
        utils.build_prompt("q", tokenizer, template="fancy")


# ------------------------------------------------------------------------------ query and result block
@pytest.mark.parametrize("text,query", [
    ("<think> a </think> <search>  Ed Wood  </search>", "Ed Wood"),
    ("<search> first </search> <search> second </search>", "second"),   # the LAST call
    ("<search>\nmulti\nline\n</search>", "multi\nline"),
    ("<search></search>", ""),                                           # empty query
    ("no opening tag </search>", ""),
    ("no search at all", ""),
    ("<search> a <search> b </search>", "b"),
])
def test_extract_query(text, query):
    assert utils.extract_query(text) == query


def test_result_block_exact_bytes():
    passages = [{"id": "1", "contents": "\"Ed Wood\"\nEd Wood is a 1994 film."},
                {"id": "2", "contents": "\"Tim Burton\"\nTim Burton is a director.  "}]
    assert utils.format_result_block(passages) == (
        ' <result>\n"Ed Wood"\nEd Wood is a 1994 film.\n\n"Tim Burton"\nTim Burton is a director.\n</result>')
    assert utils.format_result_block([]) == " <result>\n\n</result>"
    short = utils.format_result_block(passages, max_words=3)
    assert short == ' <result>\n"Ed Wood"\nEd Wood is\n\n"Tim Burton"\nTim Burton is\n</result>'
    assert utils.LIMIT_BLOCK.startswith(" <result>\nSearch limit reached")


# ------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("s,norm", [
    ("The  Beatles!", "beatles"), ("an Apple, a day", "apple day"), ("U.S.A.", "usa"),
    ("Théâtre", "théâtre"), ("  A  ", ""),
])
def test_normalize(s, norm):
    assert utils.normalize_answer(s) == norm


def test_em_f1_cover_hand_worked():
    assert utils.exact_match("the Tim Burton", ["Tim Burton"]) == 1.0
    assert utils.exact_match("Burton", ["Tim Burton"]) == 0.0
    # F1: pred "tim burton jr" vs gold "tim burton": P = 2/3, R = 1 -> 0.8
    assert utils.f1_score("Tim Burton Jr.", ["Tim Burton"]) == pytest.approx(0.8)
    # max over gold answers (aliases)
    assert utils.f1_score("Stanley Hall", ["G. Stanley Hall", "Stanley Hall"]) == 1.0
    assert utils.f1_score("Stanley Hall", ["G. Stanley Hall"]) == pytest.approx(0.8)
    assert utils.f1_score("", ["x"]) == 0.0


def test_yes_no_rule():
    assert utils.f1_score("yes", ["yes"]) == 1.0
    assert utils.f1_score("no", ["yes"]) == 0.0
    # without the rule "yes they are" vs "yes" would score 0.5; with it, a yes/no gold needs equality
    assert utils.f1_score("yes they are", ["yes"]) == 0.0
    assert utils.f1_score("yes", ["yes indeed"]) == 0.0
    assert utils.f1_score("noanswer", ["no answer"]) == 0.0
    assert utils.f1_score("no", ["no", "nope"]) == 1.0


# ------------------------------------------------------------------------------------------- reward
def reward(text, golds=("Tim Burton",), eos=True):
    return utils.compute_reward(text, list(golds), eos)


def test_reward_full_and_partial_credit():
    assert reward(GOOD)["reward"] == 1.0
    partial = GOOD.replace("Tim Burton} ", "Tim Burton Jr} ")
    assert reward(partial)["reward"] == pytest.approx(0.8)
    wrong = GOOD.replace("boxed{Tim Burton}", "boxed{Steven Spielberg}")
    r = reward(wrong)
    assert r["reward"] == 0.1 and r["f1"] == 0.0 and r["format_ok"]
    assert reward(GOOD, golds=("X", "tim  BURTON"))["reward"] == 1.0  # aliases, normalised


def test_reward_no_search_is_fine():
    text = "<think> I know it. </think> <answer> The final answer is \\[ \\boxed{Tim Burton} \\] </answer>"
    assert reward(text)["reward"] == 1.0


@pytest.mark.parametrize("bad", [
    GOOD.replace("<think> It is", "It is"),                         # unbalanced think
    GOOD.replace("<think>", "").replace("</think>", ""),            # no think at all
    GOOD + " <answer> \\boxed{Tim Burton} </answer>",                # two answers
    GOOD.replace("</answer>", ""),                                  # unclosed answer
    GOOD.split("<answer>")[0] + "</answer> \\boxed{Tim Burton} <answer>",  # answer tags reversed
    GOOD.replace(" <result>\n</result>", ""),                        # search without result
    GOOD.replace(" <result>\n</result>", " <result>\n"),             # result not closed
    GOOD.replace("<search> Ed Wood director </search>", "<search> Ed Wood director"),  # unclosed search
    GOOD.replace("<search>", "<result>", 1),                         # wrong order
    GOOD.replace("\\boxed{Tim Burton}", "Tim Burton"),              # missing \boxed{}
    GOOD.replace("\\boxed{Tim Burton}", "\\boxed{Tim Burton"),      # unclosed \boxed{
])
def test_reward_format_failures_score_zero(bad):
    r = reward(bad)
    assert r["reward"] == 0.0
    assert not r["format_ok"]


def test_reward_no_eos_scores_zero():
    r = reward(GOOD, eos=False)
    assert r["reward"] == 0.0 and not r["format_ok"] and r["f1"] == 1.0


def test_extract_answer_last_boxed_inside_answer():
    assert utils.extract_answer("<answer> \\boxed{a} then \\boxed{b} </answer>") == "b"
    assert utils.extract_answer("\\boxed{outside} <answer> \\boxed{in} </answer>") == "in"
    assert utils.extract_answer("<answer> \\boxed{f(x^{2})} </answer>") == "f(x^{2})"
    assert utils.extract_answer("<answer> nothing boxed </answer>") is None
    assert utils.extract_answer("\\boxed{outside only}") is None


# ---------------------------------------------------------------------------------------- questions
def test_load_questions_local_and_limit():
    rows = utils.load_questions(str(ROOT / "data/mini/hotpotqa_dev.jsonl"), limit=7)
    assert len(rows) == 7
    assert rows[0]["question"] == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert rows[0]["golden_answers"] == ["yes"]
    full = utils.load_questions(str(ROOT / "data/mini/hotpotqa_dev.jsonl"))
    assert len(full) == 500 and [r["id"] for r in full[:7]] == [r["id"] for r in rows]  # fixed order


def test_load_questions_bad_input(tmp_path):
    with pytest.raises(utils.ReSearchError, match="unknown dataset 'hotpot_qa'"):
        utils.load_questions("hotpot_qa")
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "a?", "golden_answers": ["x"]}) + "\n{broken\n")
    with pytest.raises(utils.ReSearchError, match=re.escape(f"{f}:2: not valid JSON")):
        utils.load_questions(str(f))
    f.write_text(json.dumps({"golden_answers": ["x"]}) + "\n")
    with pytest.raises(utils.ReSearchError, match=":1: missing or empty"):
        utils.load_questions(str(f))
    with pytest.raises(utils.ReSearchError, match="no such file"):
        utils.load_questions(str(tmp_path / "missing.jsonl"))


def test_search_arguments_validate():
    with pytest.raises(utils.ReSearchError, match="topk"):
        utils.SearchArguments(topk=0)
    with pytest.raises(utils.ReSearchError, match="max_searches"):
        utils.SearchArguments(max_searches=-1)
