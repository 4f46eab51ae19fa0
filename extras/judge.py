"""04_eval.py --judge_base_url URL: the LLM-as-judge client (the paper: gpt-4o-mini, temperature 0, JSON
output, the prompt below). An item whose call still fails after --judge_retries attempts
(no connection, an HTTP error, or a reply without a valid JSON "judgement") is recorded as failed and kept:
LJ = judged correct / ALL questions, so a failure counts as wrong. (The reference's judge drops such items,
shrinking the denominator.) A rerun judges what is not judged yet, or failed, without generating again.
"""

import concurrent.futures
import json
import os
import re
import sys
import time

JUDGE_PROMPT = (  # the paper's exact text
    "You will be given a question and its ground truth answer list where each item can be a ground truth answer. "
    "Provided a pred_answer, you need to judge if the pred_answer correctly answers the question based on the "
    "ground truth answer list. You should first give your rationale for the judgement, and then give your "
    "judgement result (i.e., correct or incorrect).\n\nHere is the criteria for the judgement:\n1. The "
    "pred_answer doesn't need to be exactly the same as any of the ground truth answers, but should be "
    "semantically same for the question.\n2. Each item in the ground truth answer list can be viewed as a ground "
    "truth answer for the question, and the pred_answer should be semantically same to at least one of them.\n\n"
    "question: {question}\nground truth answers: {gt_answer}\npred_answer: {pred_answer}\n\nThe output should "
    "in the following json format:\n```json \n{\n    \"rationale\": \"your rationale for the judgement, as a "
    "text\",\n    \"judgement\": \"your judgement result, can only be 'correct' or 'incorrect'\"\n}\n```\n\n"
    "Your output:")



def parse_judge_reply(raw: str) -> str | None:
    """'correct' / 'incorrect' from the judge's JSON reply (bare, in a ```json fence, or the first {...});
    None without such an object holding a valid "judgement"."""
    fence = re.search(r"```(?:json)?\s*(.*?)```", raw, re.S)
    for cand in (raw.strip(), fence.group(1).strip() if fence else "", raw[raw.find("{"): raw.rfind("}") + 1]):
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            continue
        verdict = str(obj.get("judgement", "")).strip().lower() if isinstance(obj, dict) else ""
        if verdict in ("correct", "incorrect"):
            return verdict
    return None


def make_judge(args):
    """judge(question, golds, prediction) -> {"judgement": "correct" | "incorrect" | None, "status": "ok" |
    "empty" | "failed", ...}. A failed call or unparseable reply is retried; then the item is "failed" (never
    dropped: the reference's judge drops it, shrinking the denominator). An empty prediction is wrong."""
    import openai
    client = openai.OpenAI(base_url=args.judge_base_url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                           max_retries=0, timeout=60)

    def judge(question: str, golds: list[str], prediction: str) -> dict:
        if not prediction.strip():
            return {"judgement": "incorrect", "status": "empty", "model": args.judge_model}
        prompt = (JUDGE_PROMPT.replace("{question}", question).replace("{gt_answer}", str(list(golds)))
                  .replace("{pred_answer}", prediction))
        error, kind, raw = "", "", None
        for attempt in range(args.judge_retries):
            time.sleep(args.judge_backoff * 2 ** (attempt - 1) if attempt else 0)
            try:
                r = client.chat.completions.create(model=args.judge_model, temperature=0, max_tokens=args.judge_max_tokens,
                                                   messages=[{"role": "user", "content": prompt}],
                                                   response_format={"type": "json_object"})
                raw = r.choices[0].message.content or ""
            except openai.APIStatusError as ex:  # the server answered with an error
                error, kind = f"HTTP {ex.status_code}: {str(ex)[:300]}", "http"
                if ex.status_code in (400, 401, 403, 404, 422):
                    break  # our request (key, model name) is wrong: retrying cannot help
                continue
            except openai.APIError as ex:  # connection refused, timeout, ...
                error, kind = f"{type(ex).__name__}: {ex} ({args.judge_base_url})", "connection"
                continue
            verdict = parse_judge_reply(raw)
            if verdict:
                return {"judgement": verdict, "status": "ok", "raw": raw[:2000], "model": args.judge_model}
            error, kind = "reply is not the requested JSON with judgement correct/incorrect", "unparseable"
        return {"judgement": None, "status": "failed", "error": error, "error_kind": kind,
                "raw": raw if raw is None else raw[:2000], "model": args.judge_model}

    return judge


def judge_cell(records: list[dict], judge, args, path, all_records: list[dict]) -> None:
    """Judge every record not judged yet (or failed before), in chunks; predictions.jsonl (all_records) is
    rewritten after each. If every call of a chunk fails to connect, the rest is marked failed uncalled."""
    todo = [r for r in records if r.get("judge") is None or r["judge"]["status"] == "failed"]
    chunk = max(4 * args.batch_size, 8)
    with concurrent.futures.ThreadPoolExecutor(args.batch_size) as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start: start + chunk]
            for rec, j in zip(part, pool.map(lambda r: judge(r["question"], r["golden_answers"], r["prediction"]),
                                             part)):
                rec["judge"] = j
            called = [r["judge"] for r in part if r["judge"]["status"] != "empty"]
            down = bool(called) and all(j.get("error_kind") == "connection" for j in called)
            for rec in todo[start + chunk:] if down else []:
                rec["judge"] = ({"judgement": None, "status": "failed", "error_kind": "connection",
                                 "error": f"not attempted: judge unreachable ({called[0]['error']})"}
                                if rec["prediction"].strip() else {"judgement": "incorrect", "status": "empty"})
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_records), encoding="utf-8")
            os.replace(tmp, path)
            if down:
                print(f"error: judge unreachable: {called[0]['error']}; {len(todo) - start} items counted as "
                      "judge failures (rerun with the judge up to judge them)", file=sys.stderr)
                return
