"""Every speed figure of issue 14 in one run, side by side with the issue's baseline and target.

    nice -n 5 .venv/bin/python bench/bench_speed.py            # packaged SmolLM2 + shipped adapter, bundled MovieLens
    .venv/bin/python bench/bench_speed.py --quick              # fewer users/rows/repeats: a few minutes
    .venv/bin/python bench/bench_speed.py --load --json out.json

Figures (one recommender, built and warmed up first; wall seconds, medians; the machine may be shared, so the
1-minute load average is printed with them):
  1. a request for 5 items with all 5 explained vs the same with none (`--users` users, alternating order);
  2. 6 threads calling `recommend(explain=3)` at once vs the same calls in a row (`bench_concurrency.run`, if
     that bench exists);
  3. batch 32 vs batch 1 rows/s with explanations on (the engine's default 3), `recllm.batch.run_batch` on
     `bench_batch.write_rows` rows;
  4. verbalizer vs generation ranking (`bench_rank.main`: letters written by the model vs one forward pass);
  5. `recllm recommend --user 1 -k 5` from a cold shell (a subprocess; median of `--cold`);
  6. `--load`: `bench_load.py` with a few sessions (p50/p95 turn time, errors, cross-talk, RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BASELINE = {  # issue 14, measured on main before the work (its "Why" section): (before, target)
    "explain_ratio": ("10.6x (9.3 s vs 0.88 s)", "<= 2.5x, <= 3 s"),
    "concurrency": ("1.39x", ">= 2.5x"),
    "batch": ("2.49x", ">= 4x"),
    "verbalizer": ("7.9x", ">= 10x"),
    "cold": ("24 s (another job running)", "<= 8 s"),
    "load": ("p50 99 s, p95 122 s, 0.25 turns/s", "p50 <= 20 s, p95 <= 40 s, 0 errors, RSS <= 2.5 GB"),
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def explain_vs_none(rec, users: list[str]) -> dict:
    from recllm.request import Request

    times = {5: [], 0: []}
    for n, user in enumerate(users):
        for explain in ((5, 0) if n % 2 == 0 else (0, 5)):  # alternate: drift in machine load hits both
            t = time.perf_counter()
            rec.recommend(Request(user=user, k=5, explain=explain))
            times[explain].append(time.perf_counter() - t)
    with_5, none = statistics.median(times[5]), statistics.median(times[0])
    return {"users": len(users), "explain5_s": round(with_5, 2), "explain0_s": round(none, 2),
            "ratio": round(with_5 / none, 2), "load": load_avg()}


def concurrency(rec, threads: int) -> dict:
    try:
        import bench_concurrency
    except ImportError:
        return {"skipped": "bench/bench_concurrency.py is not there yet"}
    out = bench_concurrency.run(rec, n_threads=threads)
    out["load"] = load_avg()
    return out


def batch_sizes(rec, users: list[str], rows: int, sizes: list[int], work: Path) -> dict:
    from bench_batch import write_rows

    from recllm import batch

    src = write_rows(work / "in.jsonl", users, rows, k=10)
    out = {"rows": rows, "explain": rec.explain_n}
    for size in sizes:
        t = time.perf_counter()
        batch.run_batch(src, work / f"out-b{size}.jsonl", recommender=rec, batch_size=size, progress=False)
        out[f"b{size}_rows_per_s"] = round(rows / (time.perf_counter() - t), 3)
    out["ratio"] = round(out[f"b{sizes[-1]}_rows_per_s"] / out[f"b{sizes[0]}_rows_per_s"], 2)
    out["load"] = load_avg()
    return out


def verbalizer(users: int, gen_users: int) -> dict:
    import bench_rank

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rank.json"
        with contextlib.redirect_stdout(io.StringIO()):
            bench_rank.main(["--users", str(users), "--gen-users", str(gen_users), "--explain", "0",
                             "--gen-mode", "letters", "--threads", str(_threads()), "--out", str(path)])
        r = json.loads(path.read_text())
    gen = r.get("generation", {}).get("letters", {})
    return {"users": r["users"], "verbalizer_s": r["verbalizer_s_median"], "generation_s": gen.get("s_median"),
            "ratio": gen.get("speed_ratio"), "load": load_avg()}


def cold(runs: int) -> dict:
    exe = str(Path(sys.executable).with_name("recllm"))
    out = {}
    for label, extra in (("default", []), ("ranker_none", ["--ranker", "none"])):
        times = []
        for _ in range(runs if label == "default" else 1):
            t = time.perf_counter()
            proc = subprocess.run([exe, "recommend", "--user", "1", "-k", "5", "-q", *extra], capture_output=True,
                                  text=True, timeout=600)
            times.append(time.perf_counter() - t)
            if proc.returncode:  # counted and shown; the time still counts when the answer was printed
                out.setdefault("failed", []).append(f"{label} exit {proc.returncode}: "
                                                    f"{(proc.stderr.strip().splitlines() or [''])[-1][:120]}")
                if not proc.stdout.strip():
                    return out
        out[f"{label}_s"] = round(statistics.median(times), 2)
        out[f"{label}_runs"] = [round(x, 2) for x in times]
    out["load"] = load_avg()
    return out


def load_test(sessions: int, turns: int) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_load.py"), "--sessions", str(sessions),
                           "--turns", str(turns), "--json"], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    report["load"] = load_avg()
    return report


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run: fewer users, rows and repeats")
    p.add_argument("--users", type=int, help="users for explained vs none (default 6; --quick 3)")
    p.add_argument("--rows", type=int, help="batch rows (default 32; --quick 8, batch 8 vs 1)")
    p.add_argument("--cold", type=int, help="cold CLI runs, median (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=6, help="concurrent threads (default 6)")
    p.add_argument("--rank-users", type=int, help="users ranked by the verbalizer (default 20; --quick 8); a third "
                   "of them (at least 2) also by generation")
    p.add_argument("--load", action="store_true", help="also bench_load.py (4 sessions x 3 turns; 20x10 without "
                   "--quick is the issue's figure and takes long)")
    p.add_argument("--skip", nargs="*", default=[], choices=["explain", "concurrency", "batch", "rank", "cold"])
    p.add_argument("--json", type=Path, help="save the figures here")
    a = p.parse_args(argv)
    users_n = a.users or (3 if a.quick else 6)
    rows = a.rows or (8 if a.quick else 32)
    sizes = [1, min(32, rows)]
    cold_runs = a.cold or (1 if a.quick else 3)

    import torch

    from recllm.engine import Recommender
    from recllm.request import Request

    f: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "load_at_start": load_avg()}
    if "cold" not in a.skip:  # first, before this process competes with the subprocess for the CPU
        log("cold recllm recommend")
        f["cold"] = cold(cold_runs)
    t = time.perf_counter()
    rec = Recommender(progress=False)
    users = [u for u in rec.interactions.users][: max(users_n, 8)]
    rec.recommend(Request(user=users[0], k=5, explain=2))  # warm-up: model loaded, first generation done
    f["build_and_warmup_s"] = round(time.perf_counter() - t, 1)
    f["model"] = rec.describe()["model"]
    f["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"{_threads()} torch threads (RECLLM_THREADS={os.environ.get('RECLLM_THREADS') or 'auto'}), "
                    f"RECLLM_DTYPE={os.environ.get('RECLLM_DTYPE') or 'float32'}")
    if "explain" not in a.skip:
        log("explained vs none")
        f["explain"] = explain_vs_none(rec, users[:users_n])
    if "concurrency" not in a.skip:
        log("threads")
        f["concurrency"] = concurrency(rec, a.threads)
    if "batch" not in a.skip:
        log("batch sizes")
        with tempfile.TemporaryDirectory() as tmp:
            f["batch"] = batch_sizes(rec, users, rows, sizes, Path(tmp))
    if "rank" not in a.skip:
        log("verbalizer vs generation")
        rank_users = a.rank_users or (8 if a.quick else 20)
        f["rank"] = verbalizer(rank_users, max(2, rank_users // 3))
    if a.load:
        log("bench_load")
        f["load"] = load_test(4 if a.quick else 20, 3 if a.quick else 10)
    _report(f)
    if a.json:
        a.json.write_text(json.dumps(f, indent=1))
    return 0


def _report(f: dict) -> None:
    rows = []
    if "explain" in f:
        e = f["explain"]
        rows.append(("5 explained vs none (k=5)", f"{e['ratio']}x ({e['explain5_s']} s vs {e['explain0_s']} s, "
                     f"median of {e['users']})", "explain_ratio", e["load"]))
    if "concurrency" in f:
        c = f["concurrency"]
        if "speedup" in c:
            shown = (f"{c['speedup']}x ({c['concurrent_s']} s vs {c['sequential_s']} s; same results: "
                     f"{c.get('same_results')})")
        else:
            shown = c.get("skipped") or ", ".join(f"{k} {v}" for k, v in c.items() if k != "load")
        rows.append((f"{c.get('threads', '')} threads recommend(explain=3) at once vs in a row", shown,
                     "concurrency", c.get("load", "")))
    if "batch" in f:
        b = f["batch"]
        sizes = [k for k in b if k.endswith("_rows_per_s")]
        rows.append((f"batch {sizes[-1][1:-11]} vs 1 (explain {b['explain']}, {b['rows']} rows)",
                     f"{b['ratio']}x ({b[sizes[-1]]} vs {b[sizes[0]]} rows/s)", "batch", b["load"]))
    if "rank" in f:
        r = f["rank"]
        rows.append(("verbalizer vs generation ranking", f"{r['ratio']}x ({r['verbalizer_s']} s vs "
                     f"{r['generation_s']} s per user)", "verbalizer", r["load"]))
    if "cold" in f:
        c = f["cold"]
        shown = (f"{c['default_s']} s (runs {c['default_runs']}); --ranker none {c['ranker_none_s']} s"
                 if "ranker_none_s" in c else "no answer")
        if c.get("failed"):
            shown += f"; {len(c['failed'])} run(s) failed: {c['failed'][-1]}"
        rows.append(("cold `recllm recommend --user 1 -k 5`", shown, "cold", c.get("load", "")))
    if "load" in f:
        r = f["load"]
        shown = r.get("error") or (f"{r['sessions']}x{r['turns_per_session']}: p50 {r['turn_s']['p50']} s, p95 "
                                   f"{r['turn_s']['p95']} s, {r['throughput_turns_per_s']} turns/s, "
                                   f"{len(r['errors'])} errors, {len(r['crosstalk'])} cross-talk, "
                                   f"RSS {r['rss_mb']['end']} MB")
        rows.append(("concurrent chat sessions (bench_load)", shown, "load", r.get("load", "")))
    print(f"\n{f['machine']}; model {f['model']}; load average at start {f['load_at_start']}\n")
    print("| figure | this run | issue 14 before | target | load avg |\n|---|---|---|---|---|")
    for name, value, key, load in rows:
        before, target = BASELINE[key]
        print(f"| {name} | {value} | {before} | {target} | {load} |")


if __name__ == "__main__":
    sys.exit(main())
