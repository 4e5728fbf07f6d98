"""Concurrent requests sharing model calls: N threads calling `Recommender.recommend` at once vs one after another.

    python bench/bench_concurrency.py [--threads 6] [--k 5] [--explain 3] [--rounds 1] [--baseline] [--json]

On the bundled MovieLens with the packaged SmolLM2 and the shipped adapter (the default engine), after one
warm-up request: each round times the `--threads` requests (users 1..N, k=5, 3 explanations each) called one
after another, then the same requests from N threads at once; reports the medians and their ratio, the model
calls the scheduler made and its time in each (`llm.scheduler`), and whether the concurrent results (items,
explanations) equal the sequential ones. `--baseline` also times the threads on the model without the
scheduler (each thread runs its own model calls, as before issue 14). `run(rec, n_threads=6)` is importable
(bench/bench_speed.py uses it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU figures, even on a machine with a GPU
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _summary(result) -> list:
    return [(r.item_id, r.explanation, r.reason.rejected if r.reason else None) for r in result.recommendations]


def _differences(got: list, want: list) -> dict:
    """How concurrent answers differ from sequential ones: other items, other texts, and texts that differ
    because one side ran past the request time limit (the plain sentence was shown; a loaded machine)."""
    out = {"items": 0, "texts": 0, "texts_past_time_limit": 0}
    for g, w in zip(got, want):
        if [x[0] for x in g] != [x[0] for x in w]:
            out["items"] += 1
            continue
        for (_, text_g, why_g), (_, text_w, why_w) in zip(g, w):
            if text_g != text_w:
                late = "time limit" in f"{why_g} {why_w}"
                out["texts_past_time_limit" if late else "texts"] += 1
    return out


def _sequential(rec, users: list[str], k: int, explain: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [_summary(rec.recommend(user=u, k=k, explain=explain)) for u in users]
    return time.perf_counter() - t0, out


def _concurrent(rec, users: list[str], k: int, explain: int) -> tuple[float, list]:
    out: list = [None] * len(users)
    errors: list = []
    start = threading.Barrier(len(users) + 1)

    def call(i: int) -> None:
        start.wait()
        try:
            out[i] = _summary(rec.recommend(user=users[i], k=k, explain=explain))
        except Exception as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds, out


def run(rec, n_threads: int = 6, *, k: int = 5, explain: int = 3, rounds: int = 1, baseline: bool = False) -> dict:
    """Times `n_threads` requests of `rec` (an `engine.Recommender`) in a row and from as many threads at once.
    Returns seconds (medians over `rounds`), the speed-up, the scheduler's model calls and seconds in the last
    concurrent round, and whether the concurrent results equal the sequential ones."""
    users = [str(u) for u in range(1, n_threads + 1)]
    rec.recommend(user=users[0], k=k, explain=explain)  # warm-up: model loaded, caches filled
    scheduler = rec.lm
    seq, conc, same, calls = [], [], True, []
    for _ in range(rounds):
        seconds, want = _sequential(rec, users, k, explain)
        seq.append(seconds)
        before = {**getattr(scheduler, "model_calls", {}), **{f"{name}_s": v for name, v in
                                                              getattr(scheduler, "model_seconds", {}).items()}}
        seconds, got = _concurrent(rec, users, k, explain)
        conc.append(seconds)
        after = {**getattr(scheduler, "model_calls", {}), **{f"{name}_s": v for name, v in
                                                             getattr(scheduler, "model_seconds", {}).items()}}
        calls.append({name: round(n - before.get(name, 0), 2) for name, n in after.items()})
        same = same and got == want
        differences = _differences(got, want)
    out = {
        "threads": n_threads, "k": k, "explain": explain, "rounds": rounds,
        "sequential_s": round(statistics.median(seq), 2), "concurrent_s": round(statistics.median(conc), 2),
        "speedup": round(statistics.median(seq) / statistics.median(conc), 2),
        "model_calls_concurrent": calls[-1], "same_results": same, "differences_last_round": differences,
    }
    if baseline and hasattr(scheduler, "lm"):
        rec._lm, rec._ranker, rec._explainer = scheduler.lm, None, None  # the bare model: no merging
        import recllm.llm.scheduler as sched

        keep = sched.shared
        sched.shared = lambda lm: lm
        try:
            seconds, got = _concurrent(rec, users, k, explain)
        finally:
            sched.shared = keep
            rec._lm, rec._ranker, rec._explainer = scheduler, None, None
        out["concurrent_without_scheduler_s"] = round(seconds, 2)
        out["speedup_without_scheduler"] = round(statistics.median(seq) / seconds, 2)
        out["same_results_without_scheduler"] = got == want
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--explain", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help="also time the threads without the scheduler")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from bench_rank import print_result  # bench/ is on sys.path when this script runs

    from recllm.engine import Recommender

    rec = Recommender(progress=False)
    result = run(rec, args.threads, k=args.k, explain=args.explain, rounds=args.rounds, baseline=args.baseline)
    print_result(result, args.json, width=32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
