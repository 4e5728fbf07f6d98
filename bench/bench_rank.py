"""Benchmark: LLM ranking latency (verbalizer, one forward pass) vs ranking by generation, and time to the
first explanation token, with the default model on CPU.

    .venv/bin/python bench/bench_rank.py --users 20 --gen-users 8 --explain 5 --threads 2

Per sampled MovieLens user (bundled ml-latest-small, at least 41 ratings): history = the 20 items before the
last one; candidates = the last item plus 19 random unseen catalog items, shuffled (seeded). Reports:
- verbalizer: median / p90 seconds per user one at a time, and per user when batched (rank_many);
- generation: the model writes an ordered list of letters (bench/prompts/rank_generate.txt), greedy; median seconds,
  speed ratio generation / verbalizer, share of outputs naming a non-candidate (a letter past the candidates,
  or a catalog title that is not a candidate), share that are not a full ranking of the candidates;
- hit@1 / mean rank of the held-out item under both (the untuned model is near chance: see DESIGN.md);
- explanations: time to the first streamed token, total time, share accepted by the validator.
Figures go to stdout (`--json` for one JSON object); progress to stderr. Wall times depend on what else runs on
the machine, so the 1-minute load average and process CPU seconds (`*_cpu_s`, all threads summed) are reported
too: with N free cores and N threads, wall time is about CPU seconds / N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PROMPTS = Path(__file__).resolve().parent / "prompts"  # the generation prompts: bench-only, not shipped


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def generation_ranker(lm, name):
    """An LLMRanker whose prompts come from bench/prompts/<name>.txt (`recllm.prompts.Prompt`). Only its
    `build_prompt` is used: generation is judged by parsing the text, not by letter logits."""
    from recllm.prompts import Prompt
    from recllm.rank import LLMRanker

    path = PROMPTS / f"{name}.txt"
    ranker = LLMRanker(lm)
    ranker.prompt = Prompt(name=name, text=path.read_text(encoding="utf-8"), path=path)
    return ranker


def parse_generated(text, n_candidates, candidate_titles, matcher, cut=False):
    """(positions in order, named non-candidate?, full ranking?) of a generated ordering of letters."""
    from recllm.llm import LETTERS

    if cut:  # the token limit was hit: drop the unfinished last entry
        text = re.sub(r"[^,\n]*$", "", text)

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


def parse_generated_titles(text, candidate_titles, cut=False):
    """(positions in order, named non-candidate?, full ranking?) of a generated list of titles, one per line.

    A line matches a candidate when it equals its title, contains it, or is the prompt's cut version of it
    ("Serving in Silence: The Margarethe Ca..."). With `cut` (the token limit was hit) the last, unfinished
    line is ignored."""
    from recllm.catalog import normalize_title

    keys = [normalize_title(re.sub(r"\s*\(\d{4}\)\s*$", "", t)) for t in candidate_titles]
    lines = text.splitlines()
    if cut and lines and not text.endswith("\n"):
        lines = lines[:-1]
    order, non_candidate = [], False
    for line in lines:
        entry = normalize_title(re.sub(r"^\s*(?:\d+[.)]|[-*]|\(?[A-T]\))\s*", "", line))
        entry = re.sub(r"\s*\d{4}$", "", entry).strip()
        if not entry:
            continue
        hits = [i for i, k in enumerate(keys)
                if k and (k == entry or (len(k) > 3 and k in entry) or (len(entry) >= 12 and k.startswith(entry)))]
        if hits:
            if hits[0] not in order:
                order.append(hits[0])
        else:
            non_candidate = True
    return order, non_candidate, sorted(order) == list(range(len(candidate_titles)))


def generation_run(lm, ranker, requests, titles, max_tokens, parse, label):
    times, cpu, non_cand, full, ranks, samples, n_tokens = [], [], 0, 0, [], [], []
    for n, (hist, cands, target) in enumerate(requests):
        prompt = ranker.build_prompt(titles(hist), [c.title for c in cands])
        t, c = time.perf_counter(), time.process_time()
        text = lm.generate(prompt, max_new_tokens=max_tokens)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        n_tokens.append(lm.token_count(text))
        order, nc, fl = parse(text, cands, n_tokens[-1] >= max_tokens)
        non_cand += nc
        full += fl
        ranks.append(order.index(target) + 1 if target in order else None)
        samples.append(text)
        log(f"  generation ({label}) user {n + 1}: {times[-1]:.2f} s, {n_tokens[-1]} tokens, "
            f"non-candidate={nc}, full={fl}: {text[:100]!r}")
    if not times:
        return {}
    return {
        "users": len(times), "s_median": round(statistics.median(times), 3), "s_min": round(min(times), 3),
        "cpu_s_median": round(statistics.median(cpu), 3),
        "tokens_median": statistics.median(n_tokens),
        "s_per_token_median": round(statistics.median(t / max(1, k) for t, k in zip(times, n_tokens)), 4),
        "non_candidate_share": non_cand / len(times), "full_ranking_share": full / len(times),
        "hit1": sum(r == 1 for r in ranks) / len(ranks), "texts": samples,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20, help="users for the verbalizer timing")
    parser.add_argument("--gen-users", type=int, default=8, help="users also ranked by generation (slow)")
    parser.add_argument("--explain", type=int, default=5, help="explanations streamed (first-token latency)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="for the batched timing (1: skip it)")
    parser.add_argument("--gen-mode", choices=("letters", "titles", "both", "none"), default="both",
                        help="ranking by generation: the model writes letters, or titles one per line")
    parser.add_argument("--gen-tokens", type=int, default=80, help="max new tokens when writing letters")
    parser.add_argument("--gen-title-tokens", type=int, default=240, help="max new tokens when writing titles")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="also write the (partial) results here after each stage")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    from recllm.catalog import load_catalog, load_interactions
    from recllm.explain import Explainer, Explanation, evidence
    from recllm.llm import load_model
    from recllm.rank import LLMRanker
    from recllm.retrieve import Candidate
    from recllm.titles import TitleMatcher

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
    single, single_cpu, verbal_rank = [], [], []
    for n, (hist, cands, target) in enumerate(requests):
        t, c = time.perf_counter(), time.process_time()
        ranked = ranker.rank(titles(hist), cands)
        single.append(time.perf_counter() - t)
        single_cpu.append(time.process_time() - c)
        verbal_rank.append([r.candidate.item_id for r in ranked].index(cands[target].item_id) + 1)
        log(f"  verbalizer user {n + 1}/{len(requests)}: {single[-1]:.3f} s, {tokens[n]} tokens")
    med_single = statistics.median(single)
    result = {
        "device": str(lm.device), "threads": args.threads, "model": lm.model_id, "adapter": lm.adapter_id,
        "cpu": platform.processor() or platform.machine(), "loadavg_1m_at_start": load_start,
        "load_s": round(load_s, 3), "users": len(requests),
        "prompt_tokens_median": statistics.median(tokens), "prompt_tokens_max": max(tokens),
        "verbalizer_s_median": round(med_single, 3), "verbalizer_s_p90": round(pct(single, 0.9), 3),
        "verbalizer_s_min": round(min(single), 3),
        "verbalizer_cpu_s_median": round(statistics.median(single_cpu), 3),
        "verbalizer_hit1": sum(r == 1 for r in verbal_rank) / len(verbal_rank),
        "verbalizer_mean_rank": statistics.mean(verbal_rank),
    }

    def emit():  # partial results survive an interrupted run
        result["loadavg_1m_now"] = round(os.getloadavg()[0], 2)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    emit()
    if args.batch_size > 1:
        t = time.perf_counter()
        ranker.config.batch_size = args.batch_size
        ranker.rank_many([(titles(h), c) for h, c, _ in requests])
        result["verbalizer_batched_s_per_user"] = round((time.perf_counter() - t) / len(requests), 3)
        emit()

    matcher = TitleMatcher(i.title for i in catalog)
    explainer = Explainer(lm, titles=matcher)
    first_token, first_cpu, first_piece, total, accepted, reasons, texts = [], [], [], [], 0, [], []
    if args.explain:  # warm-up (the first cached-generation call is slower)
        warm = catalog.get(requests[0][1][0].item_id)
        for _ in explainer.stream(warm, evidence(warm, requests[0][0], None, None, n=2)):
            pass
    for hist, cands, _ in requests[: args.explain]:
        ranked = ranker.rank(titles(hist), cands)
        item = catalog.get(ranked[0].candidate.item_id)
        ev = evidence(item, hist, None, None, n=2)
        prefix = explainer.messages(item, ev)[-1]
        prefix = prefix["content"] if prefix["role"] == "assistant" else ""
        t, c = time.perf_counter(), time.process_time()
        first = first_model = None
        for idx, piece in enumerate(explainer.stream(item, ev)):
            now = time.perf_counter() - t
            if idx == 0:
                first = now
            if idx == (1 if prefix else 0):
                first_model = now  # the first token the model wrote (the prefix is template text)
                first_cpu.append(time.process_time() - c)
            if isinstance(piece, Explanation):
                final = piece
        total.append(time.perf_counter() - t)
        first_piece.append(first)
        first_token.append(first_model)
        accepted += final.source == "llm"
        reasons.append(final.rejected)
        texts.append(final.text)
        log(f"  explanation: first piece {first:.3f} s, first model token {first_model:.2f} s, {final.source}: "
            f"{final.text!r} ({final.rejected})")
    if total:
        result.update({
            "explain_first_piece_s_median": round(statistics.median(first_piece), 4),
            "explain_first_token_s_median": round(statistics.median(first_token), 3),
            "explain_first_token_s_max": round(max(first_token), 3),
            "explain_first_token_s_min": round(min(first_token), 3),
            "explain_first_token_cpu_s_median": round(statistics.median(first_cpu), 3),
            "explain_total_s_median": round(statistics.median(total), 3),
            "explain_llm_accepted_share": accepted / len(total),
            "explain_rejections": reasons, "explain_texts": texts,
        })
        emit()

    generation = result["generation"] = {}
    gen_requests = requests[: args.gen_users]
    modes = {  # mode: (prompt, max new tokens, parser of the generated text)
        "letters": ("rank_generate", args.gen_tokens,  # same lists, asks for an ordered list of letters
                    lambda text, cands, cut: parse_generated(text, len(cands), [c.title for c in cands], matcher, cut)),
        "titles": ("rank_generate_titles", args.gen_title_tokens,  # asks for the titles, one per line
                   lambda text, cands, cut: parse_generated_titles(text, [c.title for c in cands], cut)),
    }
    for mode, (prompt, tokens, parse) in modes.items():
        if args.gen_mode not in (mode, "both"):
            continue
        run = generation[mode] = generation_run(lm, generation_ranker(lm, prompt), gen_requests, titles, tokens,
                                                parse, mode)
        if run:
            run["speed_ratio"] = round(run["s_median"] / med_single, 1)
            run["speed_ratio_of_minimums"] = round(run["s_min"] / min(single), 1)
            run["speed_ratio_cpu"] = round(run["cpu_s_median"] / statistics.median(single_cpu), 1)
        emit()

    print_result(result, args.json)
    return 0


def print_result(result: dict, as_json: bool, width: int = 34) -> None:
    """A bench's figures on stdout: one JSON object, or one `name value` line each."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:{width}s} {value}")


if __name__ == "__main__":
    raise SystemExit(main())
