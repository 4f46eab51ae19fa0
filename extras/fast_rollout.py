"""--fast_rollout: the search rollout's Hugging Face generate, with the same tokens as utils.hf_generate_fn
and about twice as fast on a CPU (BENCHMARKS.md, "GRPO").

The search loop calls generate once per turn, each row's context grown by what it generated and a result
block. The plain generate re-reads every context each turn; this one keeps the KV cache of the previous
call and only prefills what is new (on a CPU a 700-token context costs as much as ~100 decode steps). A row
resuming after a search brings a ~100-token block while the others bring one id: it prefills the block
in a forward of its own first, so the other rows are not padded to the block's width. Equivalence with
the plain generate is tested token for token (tests/test_grpo.py).
"""

from __future__ import annotations

import utils

PREFILL_ALONE = 8  # a row with more ids than this to prefill (besides its last) prefills them alone


def hf_generate_fn(model, tokenizer, generation_config=None) -> utils.GenerateFn:
    """utils.hf_generate_fn's contract (left-padded batch, stop at EOS or </search>, new ids per row;
    generation_config samples, None = greedy), keeping the KV cache from one call to the next: the keys and
    values of a row's unchanged prefix are gathered from the previous call's cache and only its new ids
    are prefilled. A context that extends no previous row is computed afresh; sliding-window or static
    caches turn reuse off. Rows with more than PREFILL_ALONE new ids prefill them in a forward of their own,
    except with several processes, where a forward that only some ranks make would deadlock ZeRO-3 / FSDP
    (transformers then keeps the ranks' generate steps in step itself, synced_gpus)."""
    import copy

    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import DynamicCache, StoppingCriteriaList, StopStringCriteria
    from transformers.cache_utils import DynamicLayer

    pad_id = tokenizer.pad_token_id
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=[utils.SEARCH_CLOSE])])
    config = copy.deepcopy(generation_config or model.generation_config)
    if generation_config is None:  # real greedy, whatever sampling defaults the checkpoint ships
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    several_ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    last: dict = {}  # the previous call: its cache and, per row, the ids fed and their cache columns

    def common_prefix(a: list[int], b: list[int], limit: int) -> int:
        n = min(len(a), len(b), limit)
        diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
        return int(diff[0]) if len(diff) else n

    def reusable(contexts: list[list[int]]) -> list[tuple[int, int]]:
        """Per new row: (previous row, number of its leading ids whose keys/values are cached); (0, 0)
        when none. Rows keep their order from call to call, so previous rows are scanned in order."""
        if not last:
            return [(0, 0)] * len(contexts)
        rows, plan, j0 = last["rows"], [], 0
        for c in contexts:
            best = (0, 0)
            for j in range(j0, len(rows)):
                ids, n_cached = rows[j]["ids"], rows[j]["n_cached"]
                n = common_prefix(c, ids, min(n_cached, len(c) - 1))  # keep >= 1 id to feed
                if n > best[1]:
                    best = (j, n)
            plan.append(best)
            if best[1]:
                j0 = best[0] + 1
        return plan

    def generate(contexts: list[list[int]], max_new_tokens: int):
        device = next(model.parameters()).device
        plan = reusable(contexts)
        width_cached = max(n for _, n in plan)
        # A row resuming after a search brings a ~100-token result block; the others bring one id. Prefilled
        # in the batched call, every row would be padded to the block's width (on a CPU one such call cost
        # as much as 8 x 130 tokens however few rows had a block): the block rows prefill it first, alone.
        pre = {i: c[n:-1] for i, (c, (_, n)) in enumerate(zip(contexts, plan))
               if n and len(c) - n - 1 > PREFILL_ALONE and not several_ranks}
        width_pre = max((len(p) for p in pre.values()), default=0)
        feed = [c[n + len(pre.get(i, [])):] for i, (c, (_, n)) in enumerate(zip(contexts, plan))]
        width_new = max(len(f) for f in feed)
        width = width_cached + width_pre + width_new
        # Layout of each row: [holes | cached prefix] [holes | ids prefilled alone] [holes | ids fed to
        # generate]; holes have attention 0 and do not advance positions (transformers derives position
        # ids from the attention mask).
        ids, attention, cols = [], [], []
        for i, (c, (j, n)) in enumerate(zip(contexts, plan)):
            p, new = pre.get(i, []), feed[i]
            ids.append([pad_id] * (width_cached - n) + c[:n] + [pad_id] * (width_pre - len(p)) + p
                       + [pad_id] * (width_new - len(new)) + new)
            attention.append([0] * (width_cached - n) + [1] * n + [0] * (width_pre - len(p)) + [1] * len(p)
                             + [0] * (width_new - len(new)) + [1] * len(new))
            cols.append(list(range(width_cached - n, width_cached))
                        + list(range(width_cached + width_pre - len(p), width_cached + width_pre))
                        + list(range(width - len(new), width)))
        cache = DynamicCache(config=model.config)
        if width_cached:  # gather each row's cached prefix from the previous cache into the new layout
            src = torch.tensor([j for j, _ in plan], device=device)
            index = torch.zeros(len(contexts), width_cached, dtype=torch.long)
            for i, (j, n) in enumerate(plan):
                if n:
                    index[i, width_cached - n:] = torch.tensor(last["rows"][j]["cols"][:n])
            index = index.to(device)
            for old, layer in zip(last["cache"].layers, cache.layers):
                k, v = old.keys[src], old.values[src]  # (rows, heads, columns, head_dim)
                layer.lazy_initialization(k, v)
                layer.keys = torch.gather(k, 2, index[:, None, :, None].expand(-1, k.size(1), -1, k.size(3)))
                layer.values = torch.gather(v, 2, index[:, None, :, None].expand(-1, v.size(1), -1, v.size(3)))
        last.clear()  # the previous cache is no longer needed: free it before generating
        if pre:  # the block rows' forward of their own, on their rows of the cache; then back into the batch
            order = list(pre)  # row indices, ascending (pre was built in row order)
            rows = torch.tensor(order, device=device)
            sub = DynamicCache(config=model.config)
            for full, part in zip(cache.layers, sub.layers):
                part.lazy_initialization(full.keys[rows], full.values[rows])
                part.keys, part.values = full.keys[rows], full.values[rows]
            mask = torch.tensor([attention[i][:width_cached + width_pre] for i in order], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width_cached:]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[i][width_cached:width_cached + width_pre] for i in order],
                                             device=device),
                      attention_mask=mask, position_ids=positions, cache=sub, use_cache=True,
                      logits_to_keep=1)  # only the cache is wanted: skip the LM head over the block
            for full, part in zip(cache.layers, sub.layers):  # other rows: width_pre hole columns (attention 0)
                for name in ("keys", "values"):
                    old, new = getattr(full, name), getattr(part, name)
                    grown = old.new_zeros(old.size(0), old.size(1), width_cached + width_pre, old.size(3))
                    grown[:, :, :width_cached] = old
                    grown[rows] = new
                    setattr(full, name, grown)
        config.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(ids, device=device),
                                 attention_mask=torch.tensor(attention, device=device), cache=cache,
                                 generation_config=config, stopping_criteria=stop)
        new_ids = out[:, width:].tolist()
        last.clear()
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            n_cached = cache.get_seq_length()  # columns with keys/values (the last sampled id has none)
            last["cache"] = cache
            last["rows"] = [{"ids": c + o, "cols": (col := cs + list(range(width, width + len(o)))),
                             "n_cached": sum(1 for x in col if x < n_cached)}
                            for c, o, cs in zip(contexts, new_ids, cols)]
        return new_ids, None

    return generate
