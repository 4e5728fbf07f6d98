"""Benchmark: LLM ranking latency (verbalizer, one forward pass) vs ranking by generation, and time to the
first explanation token, with the default model on CPU.

    .venv/bin/python bench/bench_rank.py --users 20 --gen-users 8 --explain 5 --threads 2

Per sampled MovieLens user (bundled ml-latest-small, at least 41 ratings): history = the 20 items before the
last one; candidates = the last item plus 19 random unseen catalog items, shuffled (seeded). Reports:
- verbalizer: median / p90 seconds per user one at a time, and per user when batched (rank_many);
- generation: the model writes an ordered list of letters (prompts/rank_generate.txt), greedy; median seconds,
  speed ratio generation / verbalizer, share of outputs naming a non-candidate (a letter past the candidates,
  or a catalog title that is not a candidate), share that are not a full ranking of the candidates;
- hit@1 / mean rank of the held-out item under both (the untuned model is near chance: see DESIGN.md);
- explanations: time to the first streamed token, total time, share accepted by the validator.
Figures go to stdout (`--json` for one JSON object); progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def parse_generated(text, n_candidates, candidate_titles, matcher):
    """(positions in order, named non-candidate?, full ranking?) of a generated ordering."""
    from recllm.llm import LETTERS

    letters = re.findall(r"(?<![A-Za-z])([A-Z])(?![a-z])", text)
    order, non_candidate = [], False
    for letter in letters:
        i = LETTERS.find(letter) if letter in LETTERS else -1
        if 0 <= i < n_candidates:
            if i not in order:
                order.append(i)
        else:
            non_candidate = True
    named = matcher.find(text)
    lowered = [t.lower() for t in candidate_titles]
    if any(not any(t.lower() in c for c in lowered) for t in named):
        non_candidate = True
    return order, non_candidate, sorted(order) == list(range(n_candidates))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20, help="users for the verbalizer timing")
    parser.add_argument("--gen-users", type=int, default=8, help="users also ranked by generation (slow)")
    parser.add_argument("--explain", type=int, default=5, help="explanations streamed (first-token latency)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=80, help="max new tokens for ranking by generation")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from recllm.catalog import load_catalog, load_interactions
    from recllm.explain import Explainer, Explanation, TitleMatcher, evidence
    from recllm.llm import load_model
    from recllm.rank import LLMRanker
    from recllm.retrieve import Candidate

    rng = random.Random(args.seed)
    catalog, interactions = load_catalog(), load_interactions()
    all_ids = list(catalog.items)
    users = [u for u in interactions.users if len(interactions.history(u)) >= 41]
    users = rng.sample(users, min(args.users, len(users)))
    requests = []  # (history items, candidates, index of the held-out item)
    for user in users:
        seq = interactions.history(user)
        history, target = seq[-21:-1], seq[-1]
        seen = set(seq)
        others = []
        while len(others) < 19:
            pick = rng.choice(all_ids)
            if pick not in seen and pick not in others:
                others.append(pick)
        ids = others + [target]
        rng.shuffle(ids)
        cands = [Candidate(i, catalog.get(i).label, 0.0, {}) for i in ids]  # equal retriever scores
        requests.append(([catalog.get(i) for i in history], cands, ids.index(target)))

    t0 = time.perf_counter()
    lm = load_model(args.model, args.adapter)
    load_s = time.perf_counter() - t0
    ranker = LLMRanker(lm, fusion_weight=1.0)  # LLM order only
    log(f"model {lm.model_id} on {lm.device} loaded in {load_s:.2f} s; {len(requests)} users")

    def titles(hist):
        return [h.label for h in hist]

    ranker.rank(titles(requests[0][0]), requests[0][1])  # warm-up
    tokens = [lm.token_count(ranker.build_prompt(titles(h), [c.title for c in c_])) for h, c_, _ in requests]
    single, verbal_rank = [], []
    for n, (hist, cands, target) in enumerate(requests):
        t = time.perf_counter()
        ranked = ranker.rank(titles(hist), cands)
        single.append(time.perf_counter() - t)
        verbal_rank.append([r.candidate.item_id for r in ranked].index(cands[target].item_id) + 1)
        log(f"  verbalizer user {n + 1}/{len(requests)}: {single[-1]:.3f} s, {tokens[n]} tokens")
    t = time.perf_counter()
    ranker.config.batch_size = args.batch_size
    ranker.rank_many([(titles(h), c) for h, c, _ in requests])
    batched = (time.perf_counter() - t) / len(requests)

    gen_ranker = LLMRanker(lm, prompt="rank_generate")  # same lists, asks for an ordered list of letters
    matcher = TitleMatcher(i.title for i in catalog)
    gen_times, gen_non_cand, gen_full, gen_rank, samples = [], 0, 0, [], []
    for n, (hist, cands, target) in enumerate(requests[: args.gen_users]):
        prompt = gen_ranker.build_prompt(titles(hist), [c.title for c in cands])
        t = time.perf_counter()
        text = lm.generate(prompt, max_new_tokens=args.gen_tokens)
        gen_times.append(time.perf_counter() - t)
        order, non_cand, full = parse_generated(text, len(cands), [c.title for c in cands], matcher)
        gen_non_cand += non_cand
        gen_full += full
        gen_rank.append(order.index(target) + 1 if target in order else None)
        samples.append(text[:160])
        log(f"  generation user {n + 1}: {gen_times[-1]:.2f} s, non-candidate={non_cand}, full={full}: {text[:80]!r}")

    explainer = Explainer(lm, titles=matcher)
    first_token, total, accepted, reasons = [], [], 0, []
    for hist, cands, _ in requests[: args.explain]:
        ranked = ranker.rank(titles(hist), cands)
        item = catalog.get(ranked[0].candidate.item_id)
        ev = evidence(item, hist, None, None, n=2)
        t = time.perf_counter()
        first = None
        for piece in explainer.stream(item, ev):
            if first is None:
                first = time.perf_counter() - t
            if isinstance(piece, Explanation):
                final = piece
        total.append(time.perf_counter() - t)
        first_token.append(first)
        accepted += final.source == "llm"
        reasons.append(final.rejected)
        log(f"  explanation: first token {first:.2f} s, {final.source}: {final.text!r} ({final.rejected})")

    med_single = statistics.median(single)
    med_gen = statistics.median(gen_times) if gen_times else float("nan")
    result = {
        "device": str(lm.device), "threads": args.threads, "model": lm.model_id, "adapter": lm.adapter_id,
        "cpu": platform.processor() or platform.machine(), "load_s": round(load_s, 3), "users": len(requests),
        "prompt_tokens_median": statistics.median(tokens), "prompt_tokens_max": max(tokens),
        "verbalizer_s_median": round(med_single, 3), "verbalizer_s_p90": round(pct(single, 0.9), 3),
        "verbalizer_batched_s_per_user": round(batched, 3),
        "verbalizer_hit1": sum(r == 1 for r in verbal_rank) / len(verbal_rank),
        "verbalizer_mean_rank": statistics.mean(verbal_rank),
        "generation_users": len(gen_times), "generation_s_median": round(med_gen, 3),
        "speed_ratio": round(med_gen / med_single, 1) if gen_times else None,
        "generation_non_candidate_share": gen_non_cand / len(gen_times) if gen_times else None,
        "generation_full_ranking_share": gen_full / len(gen_times) if gen_times else None,
        "generation_hit1": sum(r == 1 for r in gen_rank) / len(gen_rank) if gen_rank else None,
        "generation_samples": samples[:3],
        "explain_first_token_s_median": round(statistics.median(first_token), 3) if first_token else None,
        "explain_first_token_s_max": round(max(first_token), 3) if first_token else None,
        "explain_total_s_median": round(statistics.median(total), 3) if total else None,
        "explain_llm_accepted_share": accepted / len(total) if total else None,
        "explain_rejections": reasons,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:34s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
