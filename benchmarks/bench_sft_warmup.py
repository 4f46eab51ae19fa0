"""The warm-up's measured effect: greedy search rollouts (utils.search_rollout + utils.hf_generate_fn,
do_sample=False) on held-out HotpotQA dev questions with the model before and after 02_sft_warmup.py:
format-valid rate (valid format and ended with EOS), mean searches per question, F1, EM. Same prompts,
retriever and budgets as GRPO and evaluation; the search settings are read from the warmed-up
checkpoint's warmup.json so both models meet the result blocks that were trained on.

    python 02_sft_warmup.py --config configs/sft_cpu.yaml          # writes runs/sft
    python benchmarks/bench_sft_warmup.py --before models/SmolLM2-135M-Instruct --after runs/sft --n 50

(02_sft_warmup.py --eval_before_after N does the same inside the warm-up run.)
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib.util  # noqa: E402

import utils  # noqa: E402


@dataclass
class BenchArguments:
    before: str = utils.DEFAULT_MODEL
    """The model before the warm-up."""
    after: str = "runs/sft"
    """The warmed-up checkpoint (a 02_sft_warmup.py output folder, with its warmup.json)."""
    eval_data: str = str(utils.MINI_DATA / "hotpotqa_dev.jsonl")
    """Held-out questions (not used by the warm-up)."""
    n: int = 50
    """The first n questions."""
    batch_size: int = 25
    """Questions per generate batch."""
    output: str = ""
    """Also write the table and figures as json here."""


def main():
    from trl import TrlParser
    (args,) = TrlParser((BenchArguments,)).parse_args_and_config()
    spec = importlib.util.spec_from_file_location("sft_warmup", utils.REPO_ROOT / "02_sft_warmup.py")
    sft = importlib.util.module_from_spec(spec)
    sys.modules["sft_warmup"] = sft
    spec.loader.exec_module(sft)
    meta_path = Path(args.after) / "warmup.json"
    if not meta_path.is_file():
        raise utils.ReSearchError(f"--after {args.after}: no warmup.json (not a 02_sft_warmup.py output)")
    meta = json.loads(meta_path.read_text())
    sargs = utils.SearchArguments(retriever=meta["retriever"], topk=meta["topk"],
                                  passage_max_words=meta["passage_max_words"], max_searches=meta["max_searches"],
                                  prompt_template=meta["prompt_template"])
    search = utils.load_retriever(sargs.retriever)
    tokenizer = utils.load_tokenizer(args.after)
    questions = utils.load_questions(args.eval_data, limit=args.n)
    print(f"{len(questions)} questions of {args.eval_data} | retriever {getattr(search, 'description', sargs.retriever)} | "
          f"topk {sargs.topk} | passage_max_words {sargs.passage_max_words} | max_searches {sargs.max_searches} | "
          f"max_completion_length {meta['max_completion_length']} | greedy", flush=True)
    res = {}
    for name, path in (("before", utils.resolve_model(args.before)), ("after", args.after)):
        res[name] = sft.measure(path, questions, tokenizer, search, sargs, meta["max_completion_length"], args.batch_size)
        print(f"{name} ({path}): {res[name]}", flush=True)
    sft.print_table(res["before"], res["after"])
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "search": vars(sargs), **res}, indent=2) + "\n")


if __name__ == "__main__":
    utils.run_main(main)
