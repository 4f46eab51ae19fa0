"""04_eval.py --question "...": ask mode. One research rollout, printed as it happens: the model's text, each
search and the titles it found, then the answer as evaluation reads it."""

import utils


def ask(args, e) -> None:
    """Print one research trajectory as it happens: the generated text, each search, the titles found."""
    tok, s = e.tok, e.sargs
    print(f"model {args.model} · retriever {getattr(e.search, 'description', s.retriever)} · top-k {s.topk}\n")

    def generate(contexts, max_new_tokens):
        outs = e.generate_ids(contexts, max_new_tokens)
        print(tok.decode(outs[0], skip_special_tokens=True), end="", flush=True)
        return outs

    def search(queries, k):
        res = e.search(queries, k)
        print(f"\n  [search] {queries[0]!r}\n" + "".join(f"  [{i + 1}] {utils.passage_title(p['contents'])}\n" for i, p in enumerate(res[0])),
              end="", flush=True)
        return res

    prompt = utils.encode(utils.build_prompt(args.question, tok, s.prompt_template), tok)
    (r,) = utils.search_rollout([prompt], generate, search, tok, e.eos_ids, max_completion_length=args.max_completion_length,
                                topk=s.topk, max_searches=s.max_searches, passage_max_words=s.passage_max_words)
    text = utils.reward_text(r, tok)
    print(f"\n\nanswer: {utils.eval_prediction(text, r.ended_with_eos)!r} · searches {r.num_searches} · format valid "
          f"{utils.compute_reward(text, [], r.ended_with_eos)['format_ok']} · {len(r.completion_ids)} tokens "
          f"({r.mask.count(0)} retrieved)")
