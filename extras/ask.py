"""04_eval.py --question "...": ask mode. One research rollout, printed as it happens: the model's text, each
search and the titles it found, then the answer as evaluation reads it."""

from types import SimpleNamespace

import utils


def ask(args, engine, run_research) -> None:
    """04's run_research on one question, with the engine's generate and search printing what they do."""
    tok = engine.tok
    sargs = engine.sargs
    print(f"model {args.model} · retriever {getattr(engine.search, 'description', sargs.retriever)} · "
          f"top-k {sargs.topk}\n")

    def generate(contexts, max_new_tokens):
        new_ids, logprobs = engine.generate_ids(contexts, max_new_tokens)
        print(tok.decode(new_ids[0], skip_special_tokens=True), end="", flush=True)
        return new_ids, logprobs

    def search(queries, k):
        results = engine.search(queries, k)
        titles = "".join(f"  [{i + 1}] {utils.passage_title(p['contents'])}\n" for i, p in enumerate(results[0]))
        print(f"\n  [search] {queries[0]!r}\n{titles}", end="", flush=True)
        return results

    printing = SimpleNamespace(**{**vars(engine), "generate_ids": generate, "search": search})
    (record,) = run_research([{"question": args.question}], printing)
    trajectory = record["trajectory"]
    retrieved = sum(n for mask, n in trajectory["mask_runs"] if mask == 0)
    print(f"\n\nanswer: {record['prediction']!r} · searches {record['num_searches']} · format valid "
          f"{record['format_ok']} · {len(trajectory['completion_ids'])} tokens ({retrieved} retrieved)")
