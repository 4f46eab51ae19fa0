"""Rollouts as one self-contained HTML page (inline CSS and JS, nothing fetched): per rollout the question,
gold answers, reward and its parts, and the response as token spans, data-mask="1" for the model's own
(trained) tokens, data-mask="0" for retrieved (masked) ones, each coloured; filters by step and by reward.
Reads 03_grpo_search.py's trajectories.jsonl, 02_sft_warmup.py's trajectories.jsonl or 04_eval.py's
predictions.jsonl. The tokenizer: --tokenizer, else the model named by run_config.json, warmup.json or
settings.json next to the file. The page opens with filters from its address too: PAGE.html#step=3&min=0.5

    python extras/view_trajectories.py runs/grpo/trajectories.jsonl [--out PAGE.html] [--tokenizer PATH]
"""

import argparse
import html
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

MAX_CARDS = 300  # the page draws at most this many matching rollouts at once

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccd;padding:8px 16px;z-index:1}
h1{font-size:16px;margin:0 0 6px}.bar{display:flex;flex-wrap:wrap;gap:14px;align-items:center}
.sw{display:inline-block;padding:0 6px;border-radius:3px}input[type=number]{width:60px}#count{color:#555}
.card{background:#fff;margin:12px 16px;padding:10px 14px;border:1px solid #dde;border-radius:6px}
.head{color:#666;font-size:12px}.q{font-weight:600;margin:2px 0 6px}.facts{display:flex;flex-wrap:wrap;gap:4px 14px}
.fact b{color:#555;font-weight:600}.resp{white-space:pre-wrap;word-break:break-word;margin-top:8px;
font:12.5px/1.6 ui-monospace,Menlo,Consolas,monospace;border-top:1px solid #eee;padding-top:6px}
[data-mask="1"]{background:#d6e8fb}[data-mask="0"]{background:#fde7c4;color:#6b4a12}
.bounds .resp span{box-shadow:inset -1px 0 #0003}.plain{color:#555}.note{font-style:italic}"""

JS = """const D=JSON.parse(document.getElementById('data').textContent), $=id=>document.getElementById(id);
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;
 if(text!=null)e.textContent=text;return e}
function card(r){const c=el('div','card');c.append(el('div','head',r.head),el('div','q',r.question));
 const f=el('div','facts');for(const[k,v]of r.facts){const s=el('span','fact');s.append(el('b','',k+' '),v);f.append(s)}
 const t=el('div','resp');if(r.runs){for(const[m,pieces]of r.runs)for(const p of pieces){const s=el('span','',p);
  s.dataset.mask=m;t.append(s)}}
 else{t.classList.add('plain');t.append(el('div','note',r.note),r.text)}c.append(f,t);return c}
function render(){const g=$('group').value,lo=parseFloat($('min').value),hi=parseFloat($('max').value);
 const keep=D.rows.filter(r=>(g===''||String(r.group)===g)&&(isNaN(lo)||r.score>=lo)&&(isNaN(hi)||r.score<=hi));
 $('rows').replaceChildren(...keep.slice(0,D.max).map(card));
 $('count').textContent=keep.length+' of '+D.rows.length+' rollouts'
  +(keep.length>D.max?' (the first '+D.max+' drawn: narrow the filters)':'')}
const groups=[...new Set(D.rows.map(r=>r.group))].sort((a,b)=>a<b?-1:a>b?1:0);
for(const g of groups){const o=el('option','',g);o.value=String(g);$('group').append(o)}
if(!D.group)$('groupbox').hidden=true;
const h=new URLSearchParams(location.hash.slice(1));if(h.has(D.group))$('group').value=h.get(D.group);
for(const k of['min','max'])if(h.has(k))$(k).value=h.get(k);
for(const k of['group','min','max'])$(k).oninput=render;
$('bounds').onchange=e=>document.body.classList.toggle('bounds',e.target.checked);render();"""


def append_grpo_rows(path: Path, step: int, rows, samples: int, tok) -> None:
    """03_grpo_search.py's trajectories.jsonl: one line per (rollout, score, reward, input row, advantage) of
    the first `samples` rows (0 = all), appended."""
    lines = []
    for rollout, score, reward, question, advantage in list(rows)[: samples or None]:
        lines.append(json.dumps({
            "step": step, "question_id": question["question_id"], "question": question["question"],
            "golden_answers": question["golden_answers"], "reward": reward, "f1": score["f1"],
            "em": score["em"], "format_ok": score["format_ok"], "prediction": score["prediction"],
            "advantage": advantage, "ended_with_eos": rollout.ended_with_eos, "queries": rollout.queries,
            "num_searches": rollout.num_searches,
            "completion": tok.decode(rollout.completion_ids, skip_special_tokens=True),
            "completion_ids": rollout.completion_ids,
            "mask_runs": [[mask, len(ids)] for ids, mask in rollout.segments()]}, ensure_ascii=False))
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def find_tokenizer(jsonl: Path) -> str:
    for name, key in (("run_config.json", "model"), ("warmup.json", "base_model"), ("settings.json", "model")):
        model = json.loads((jsonl.parent / name).read_text()).get(key) if (jsonl.parent / name).is_file() else None
        if model:
            local = [p for p in (Path(model), utils.REPO_ROOT / model) if p.exists()]  # relative: to cwd or repo
            return str(local[0]) if local else model
    raise utils.ReSearchError(f"{jsonl}: no run_config.json, warmup.json or settings.json next to it names the "
                              "model; pass --tokenizer PATH (the model or tokenizer the rollouts were made with)")


def token_pieces(ids: list[int], tok, cache: dict) -> list[str]:
    """One text per token; a character split over several tokens (its UTF-8 bytes) goes in one piece."""
    pieces, i = [], 0
    while i < len(ids):
        text, j = cache.setdefault(ids[i], tok.decode([ids[i]])), i + 1
        if "\ufffd" in text:  # join the next few tokens until the text decodes (a real U+FFFD: alone)
            for k in range(i + 2, min(len(ids), i + 8) + 1):
                if "\ufffd" not in (joined := tok.decode(ids[i:k])):
                    text, j = joined, k
                    break
        pieces.append(text)
        i = j
    return pieces


def page_row(n: int, r: dict, tok, cache: dict) -> dict:
    if "question" not in r:
        raise utils.ReSearchError(f"line {n}: no \"question\": not a 02/03 trajectories.jsonl or 04 predictions.jsonl")
    traj = r.get("trajectory") or {}
    ids = r.get("completion_ids", traj.get("completion_ids"))
    runs = r.get("mask_runs", traj.get("mask_runs"))
    if ids is None and "input_ids" in r:  # the warm-up's rows: prompt + completion
        ids = r["input_ids"][r["num_prompt_tokens"]:]
        if runs is None:  # an older warm-up log: no mask_runs, its assistant_masks say the same
            runs = [[m, 1] for m in r["assistant_masks"][r["num_prompt_tokens"]:]]
    if ids is not None and runs is None:
        raise utils.ReSearchError(f"line {n}: completion ids but no mask_runs")
    if ids is not None and sum(length for _, length in runs) != len(ids):
        raise utils.ReSearchError(f"line {n}: mask_runs cover {sum(k for _, k in runs)} tokens, "
                                  f"the completion has {len(ids)}")
    merged, start = [], 0  # [[mask, ids]], consecutive runs of one mask joined, then [[mask, [token text]]]
    for m, length in runs if ids is not None else []:
        if merged and merged[-1][0] == int(m):
            merged[-1][1] += ids[start: start + length]
        else:
            merged.append([int(m), ids[start: start + length]])
        start += length
    merged = [[m, token_pieces(run, tok, cache)] for m, run in merged]
    num = lambda k: f"{r[k]:.3g}" if isinstance(r.get(k), (int, float)) else None  # noqa: E731
    facts = [("gold", " | ".join(map(str, r.get("golden_answers") or []))), ("reward", num("reward")),
             ("format ok", r.get("format_ok")), ("F1", num("f1")), ("EM", num("em")), ("acc", num("acc")),
             ("advantage", num("advantage")), ("prediction", r.get("prediction")),
             ("searches", r.get("num_searches", len(r.get("queries") or []) or None)),
             ("ended with EOS", r.get("ended_with_eos", traj.get("ended_with_eos")))]
    head = [f"#{n}"] + [f"{k} {r[k]}" for k in ("step", "dataset", "id", "question_id") if r.get(k) is not None]
    return {"head": " · ".join(head), "question": r["question"], "group": r.get("step", r.get("dataset")),
            "score": r.get("reward", r.get("f1")), "facts": [[k, str(v)] for k, v in facts if v is not None],
            "runs": merged if ids is not None else None, "note": "no token ids logged for this method: its text",
            "text": None if ids is not None else json.dumps(traj or r.get("completion"), ensure_ascii=False, indent=1)}


def write_page(jsonl_path, out=None, tokenizer=None) -> Path:
    """Render jsonl_path to out (default: the same name, .html). tokenizer: a path, a name or a loaded one."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise utils.ReSearchError(f"{jsonl_path}: no such file")
    rows = utils.read_jsonl(jsonl_path)
    if not rows:
        raise utils.ReSearchError(f"{jsonl_path}: no rows")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
        utils.load_tokenizer(str(tokenizer) if tokenizer else find_tokenizer(jsonl_path))
    cache: dict = {}
    data = {"rows": [page_row(n, r, tok, cache) for n, r in enumerate(rows, 1)], "max": MAX_CARDS}
    data["group"] = "step" if "step" in rows[0] else "dataset" if "dataset" in rows[0] else ""
    score = "reward" if "reward" in rows[0] else "F1"
    title = html.escape(f"{jsonl_path} ({len(rows)} rollouts)")
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")  # no "</script>" inside the script
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body><header><h1>{title}</h1><div class="bar">
<span><span class="sw" data-mask="1">model token (trained)</span> <span class="sw" data-mask="0">retrieved
(masked out of the loss)</span></span><label><input type="checkbox" id="bounds"> token boundaries</label>
<label id="groupbox">{data["group"]} <select id="group"><option value="">all</option></select></label>
<label>{score} from <input id="min" type="number" step="0.1"> to <input id="max" type="number" step="0.1"></label>
<span id="count"></span></div></header><div id="rows"></div>
<script type="application/json" id="data">{blob}</script>
<script>{JS}</script></body></html>
"""
    out = Path(out) if out else jsonl_path.with_suffix(".html")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", help="a 02/03 trajectories.jsonl or a 04 predictions.jsonl")
    p.add_argument("--out", help="the page (default: the jsonl's name with .html)")
    p.add_argument("--tokenizer", help="the model or tokenizer that made the rollouts (default: found next to it)")
    a = p.parse_args()
    print(f"wrote {write_page(a.jsonl, a.out, a.tokenizer)}")


if __name__ == "__main__":
    utils.run_main(main)
