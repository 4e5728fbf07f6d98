"""Benchmark the foundation: index from empty, unchanged re-index, retrieval latency, peak RSS of recommend.

    python bench/bench_retrieve.py [--home DIR] [--users 100] [--json]

Targets (2 CPU cores): index of the bundled catalog from empty <= 60 s, unchanged re-index <= 5 s,
retrieval median <= 50 ms (model load excluded). Index timings are of the real `python -m recllm index`
process (wall clock, start-up and model load included) next to the store's own `seconds`. The latency
is measured in-process over real users' histories after one warm-up call; "with query" adds a free-text
ask (the embedder is loaded before timing). Peak RSS is of a whole `recllm recommend --user 1` process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_cli(args: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds user+sys, the finished process) of `python -m recllm ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recllm", *args], env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"recllm {' '.join(args)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, proc


def peak_rss_mb(args: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one `recllm ...` process."""
    if shutil.which("time") or Path("/usr/bin/time").exists():
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "recllm", *args], env=env, cwd=REPO,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        for line in proc.stderr.splitlines():
            if "Maximum resident set size" in line:
                return int(line.split(":")[1]) / 1024, elapsed
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    elapsed, _, _ = timed_cli(args, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024, elapsed  # ru_maxrss is the largest child so far


def latency(home: Path, n_users: int, seed: int = 0) -> dict:
    os.environ["RECLLM_HOME"] = str(home)
    from recllm.catalog import load_catalog, load_interactions
    from recllm.embed import get_embedder
    from recllm.retrieve import Filters, Retriever
    from recllm.store import ItemStore

    catalog, interactions = load_catalog(), load_interactions()
    retriever = Retriever(catalog, ItemStore(), get_embedder(), interactions)
    users = random.Random(seed).sample(interactions.users, min(n_users, len(interactions.users)))
    histories = [retriever.user_history(u) for u in users]
    retriever.retrieve(history=histories[0], k=10)  # warm-up (opens Chroma, loads its index)

    def run(**kwargs) -> list[float]:
        times = []
        for history in histories:
            started = time.perf_counter()
            retriever.retrieve(history=history, k=10, **kwargs)
            times.append((time.perf_counter() - started) * 1000)
        return times

    plain = run()
    filtered = run(filters=Filters(genres=("Comedy",), year_min=1990, year_max=1999))
    retriever.embedder.encode(["warm up"], progress=False)  # model load excluded
    query = run(query="a funny heist movie")
    lengths = [len(h) for h in histories]

    def stats(times):
        times = sorted(times)
        return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2)}

    return {"users": len(users), "history_len_median": statistics.median(lengths), "history_len_max": max(lengths),
            "history_only": stats(plain), "with_filters": stats(filtered), "with_query": stats(query)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="data home to index into (default: a fresh temp dir, removed after)")
    parser.add_argument("--users", type=int, default=100, help="users sampled for the latency figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="recllm-bench-"))
    if (home / "chroma").exists():
        shutil.rmtree(home / "chroma")  # "from empty"
    env = dict(os.environ, RECLLM_HOME=str(home))
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
                    "load_avg_at_start": os.getloadavg()[0]}
    try:
        wall, cpu, proc = timed_cli(["index", "--json", "-q"], env)
        report["index_from_empty"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                      "store_s": round(json.loads(proc.stdout)["seconds"], 1),
                                      "items": json.loads(proc.stdout)["embedded"]}
        wall, cpu, proc = timed_cli(["index", "--json", "-q"], env)
        stats = json.loads(proc.stdout)
        report["reindex_unchanged"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                       "store_s": round(stats["seconds"], 2), "embedded": stats["embedded"]}
        rss, wall = peak_rss_mb(["recommend", "--user", "1", "-k", "10"], env)
        report["recommend_process"] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 2)}
        rss, wall = peak_rss_mb(["recommend", "--user", "1", "-k", "10", "--query", "a funny heist movie"], env)
        report["recommend_with_query_process"] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 2)}
        report["retrieval_latency"] = latency(home, args.users)
        report["load_avg_at_end"] = os.getloadavg()[0]
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    lat = report["retrieval_latency"]
    print(f"machine: {report['machine']} (load avg {report['load_avg_at_start']:.1f} → {report['load_avg_at_end']:.1f})")
    first, again = report["index_from_empty"], report["reindex_unchanged"]
    print(f"index from empty:   {first['wall_s']} s wall, {first['cpu_s']} s CPU ({first['store_s']} s in the store, "
          f"{first['items']} items)   target <= 60 s")
    print(f"re-index unchanged: {again['wall_s']} s wall, {again['cpu_s']} s CPU ({again['store_s']} s in the store, "
          f"{again['embedded']} embedded)   target <= 5 s")
    print(f"retrieval latency over {lat['users']} users (history median {lat['history_len_median']}, max "
          f"{lat['history_len_max']}): median {lat['history_only']['median_ms']} ms, p95 {lat['history_only']['p95_ms']} ms; "
          f"with filters {lat['with_filters']['median_ms']} ms; with a query {lat['with_query']['median_ms']} ms   target <= 50 ms")
    print(f"recllm recommend --user 1: peak RSS {report['recommend_process']['peak_rss_mb']} MB, "
          f"{report['recommend_process']['wall_s']} s wall; with --query: "
          f"{report['recommend_with_query_process']['peak_rss_mb']} MB, {report['recommend_with_query_process']['wall_s']} s")


if __name__ == "__main__":
    main()
