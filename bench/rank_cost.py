"""What a richer rank prompt costs: prompt tokens and seconds per user of LLM ranking, adapters side by side.

The same validation users (true item in the retriever's top 20, a fixed sample) are ranked by each adapter
through `evaluate.llm_ranker` (exactly as `recllm eval --ranker llm` and the engine build prompts: history and
candidates as `rank.Line`s, genres and retriever ranks shown when the adapter's rank_config asks for them), in
batches of `--batch-size`, the adapters taking turns per batch so machine noise falls on both alike. Prints mean
prompt tokens, median seconds per user and the ratio to the first adapter.

    nice -n 5 python bench/rank_cost.py --adapters smollm2-135m-ml-explain smollm2-135m-ml-rich --users 48
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    from recllm import evaluate, llm, split
    from recllm.rank import Line, LLMRanker
    from recllm.seqrec import CollaborativeRetriever

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, help="adapter names or folders ('none': untuned)")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--retriever", default="recllm/data/retrievers/ml-latest-small", help="fitted retriever folder")
    args = parser.parse_args(argv)

    catalog, interactions = split.load_inputs(None, None)
    data = split.prepare(catalog, interactions)
    fitted = CollaborativeRetriever.load(args.retriever)
    ranking = evaluate.rank_all(fitted.scores_idx, data, "valid")
    hists = data.histories("valid")
    users = np.flatnonzero(ranking.ranks <= evaluate.N_CANDIDATES)
    users = np.sort(np.random.default_rng(0).choice(users, min(args.users, len(users)), replace=False))
    requests = [([data.item_ids[i] for i in hists[u][-evaluate.HISTORY_LEN:]],
                 [data.item_ids[i] for i in ranking.top[u] if i >= 0],
                 [float(evaluate.N_CANDIDATES - n) for n in range(evaluate.N_CANDIDATES)]) for u in users]
    rankers, tokens = {}, {}
    for name in args.adapters:
        lm = llm.load_model(None, None if name == "none" else name)
        ranker = LLMRanker(lm, catalog=catalog)
        rankers[name] = evaluate.llm_ranker(ranker, catalog)
        prompts = [ranker.build_prompt([Line.of(catalog.get(i)) for i in h],
                                       [ranker.candidate_line(c, n) for n, c in enumerate(
                                           [_candidate(catalog, i) for i in cands])])
                   for h, cands, _ in requests]
        tokens[name] = float(np.mean([lm.token_count(p) for p in prompts]))
    for rank in rankers.values():
        rank(requests[: args.batch_size])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in rankers}
    for lo in range(0, len(requests), args.batch_size):
        batch = requests[lo:lo + args.batch_size]
        for name, rank in rankers.items():
            t = time.perf_counter()
            rank(batch)
            seconds[name].append((time.perf_counter() - t) / len(batch))
    first = args.adapters[0]
    out = {"users": len(requests), "load_avg_1m": round(os.getloadavg()[0], 2), "adapters": {}}
    for name in args.adapters:
        med = statistics.median(seconds[name])
        out["adapters"][name] = {"prompt_tokens_mean": round(tokens[name], 1), "s_per_user_median": round(med, 3),
                                 "vs_first": round(med / statistics.median(seconds[first]), 2)}
    print(json.dumps(out, indent=1))
    return 0


def _candidate(catalog, item_id):
    from recllm.retrieve import Candidate

    return Candidate(item_id, catalog.get(item_id).label, 0.0)


if __name__ == "__main__":
    sys.exit(main())
