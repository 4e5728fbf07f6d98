"""Batch prompting throughput and resume overhead, on CPU.

    python bench/bench_batch.py                       # packaged SmolLM2 (+ shipped adapter), bundled MovieLens
    python bench/bench_batch.py --tiny --rows 32      # the tiny in-process LM: checks the machinery quickly

Measures, on the same input (user rows, k=10):
  1. rows/s in one process at batch sizes 1, 8, 32 (`run_batch`, the recommender built and warmed up first);
  2. rows/s with 1 vs 2 processes (`python -m recllm.batch` vs `torchrun --nproc_per_node 2 -m recllm.batch`),
     end to end (start-up and model load included) and while serving (each process reports its serving time;
     the slowest one counts);
  3. resume overhead on a 10k-row file with 9k rows done: a resumed run minus a fresh run of the 1k rows
     left, both with an instant recommender (so only bookkeeping differs), for OUT holding a prefix (one
     process) and for 9k rows spread over 2 shards (a killed data-parallel run: done map + merge).
Prints a markdown table; `--json PATH` saves the figures. State lives under --home (default
/tmp/recllm-bench), so the catalog is indexed once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_factory():
    """`--factory bench_batch:tiny_factory` for subprocess runs with the tiny LM."""
    from recllm.engine import Recommender
    from recllm.llm import tiny_lm

    return Recommender(os.environ.get("BENCH_CATALOG") or None, os.environ.get("BENCH_INTERACTIONS") or None,
                       lm=tiny_lm(0), explain=int(os.environ["BENCH_EXPLAIN"]), progress=False)  # fmt: skip


class Instant:
    """A recommender that answers every request at once with a canned result (for resume bookkeeping)."""

    def __init__(self, result, catalog):
        self.result = result
        self.catalog = catalog

    def recommend_many(self, requests):
        return [copy.deepcopy(self.result) for _ in requests]

    def why(self, item, result):
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, users: list[str], n: int, k: int = 10) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "user": users[i % len(users)], "k": k}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/tmp/recllm-bench"))
    p.add_argument("--catalog", help="catalog path (default: bundled MovieLens)")
    p.add_argument("--interactions", help="interactions CSV (default: the bundled ratings)")
    p.add_argument("--model", help="model id or folder (default: packaged SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="the tiny in-process LM instead of a real model")
    p.add_argument("--rows", type=int, default=64, help="rows per throughput run (default 64)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--explain", type=int, default=0, help="explained items per row (default 0: ranking only)")
    p.add_argument("--procs-batch-size", type=int, default=32, help="batch size of the 1-vs-2-process runs")
    p.add_argument("--skip-procs", action="store_true")
    p.add_argument("--resume-rows", type=int, default=10_000)
    p.add_argument("--resume-done", type=int, default=9_000)
    p.add_argument("--json", type=Path, help="save the figures here")
    a = p.parse_args()

    a.home.mkdir(parents=True, exist_ok=True)
    os.environ["RECLLM_HOME"] = str(a.home)
    work = a.home / "bench-batch"
    work.mkdir(exist_ok=True)
    from recllm import batch
    from recllm.engine import Recommender, Request

    figures: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "rows": a.rows, "explain": a.explain}  # fmt: skip
    t0 = time.perf_counter()
    options = dict(explain=a.explain, progress=True)
    if a.tiny:
        from recllm.llm import tiny_lm

        options["lm"] = tiny_lm(0)
    elif a.model:
        options["model"] = a.model
    rec = Recommender(a.catalog, a.interactions, **options)
    users = rec.interactions.users if rec.interactions is not None else ["1"]
    warm = rec.recommend_many([Request(user=users[0], k=10), Request(user=users[1 % len(users)], k=10)])
    figures["build_and_warmup_s"] = round(time.perf_counter() - t0, 1)
    figures["model"] = rec.describe()["model"]
    figures["adapter"] = rec.describe().get("adapter")
    print(f"recommender ready in {figures['build_and_warmup_s']} s: {rec.describe()}", file=sys.stderr)

    src = write_rows(work / "in.jsonl", users, a.rows)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    figures["batch"] = {}
    for size in sizes:
        out = work / f"out-b{size}.jsonl"
        t = time.perf_counter()
        batch.run_batch(src, out, recommender=rec, batch_size=size, progress=False)
        seconds = time.perf_counter() - t
        figures["batch"][size] = {"seconds": round(seconds, 2), "rows_per_s": round(a.rows / seconds, 3)}
        print(f"batch size {size}: {a.rows} rows in {seconds:.1f} s = {a.rows / seconds:.2f} rows/s", file=sys.stderr)
    base = figures["batch"][sizes[0]]["rows_per_s"]
    for size in sizes:
        figures["batch"][size]["speedup_vs_first"] = round(figures["batch"][size]["rows_per_s"] / base, 2)

    if not a.skip_procs:
        figures["procs"] = _processes(a, src, work)

    figures["resume"] = _resume(a, work, rec, warm[0], users)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    _report(figures, sizes)


def _processes(a, src: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT)]), BENCH_CATALOG=a.catalog or "",
               BENCH_INTERACTIONS=a.interactions or "", BENCH_EXPLAIN=str(a.explain))  # fmt: skip
    if a.tiny:
        engine = ["--factory", "bench_batch:tiny_factory"]
    else:
        engine = [*(["--catalog", a.catalog] if a.catalog else []), *(["--model", a.model] if a.model else []),
                  *(["--interactions", a.interactions] if a.interactions else [])]  # fmt: skip
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    results = {}
    for n in (1, 2):
        launch = [sys.executable, "-m"] if n == 1 else [torchrun, "--nproc_per_node", str(n), "--master_port",
                                                         str(_free_port()), "-m"]  # fmt: skip
        out = work / f"out-p{n}.jsonl"
        cmd = [*launch, "recllm.batch", str(src), "-o", str(out), "--batch-size", str(a.procs_batch_size),
               "--explain", str(a.explain), "-q", *engine]  # fmt: skip
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        # each process reports "served N rows in S s"; the slowest one ends the parallel part
        served = [(int(m[0]), float(m[1])) for m in re.findall(r"served (\d+) rows in ([\d.]+) s", done.stderr)]
        slowest = max(s for _, s in served)
        results[n] = {"wall_s": round(wall, 1), "serve_s": round(slowest, 1),
                      "rows_per_process": [r for r, _ in served],
                      "rows_per_s_end_to_end": round(a.rows / wall, 3),
                      "rows_per_s_serving": round(sum(r for r, _ in served) / slowest, 3)}  # fmt: skip
        print(f"{n} process(es): {results[n]}", file=sys.stderr)
    same = _same_rows(work / "out-p1.jsonl", work / "out-p2.jsonl")
    results["same_rows"] = same
    return results


def _same_rows(one: Path, two: Path, tol: float = 1e-4) -> bool:
    """Same ids, same items in the same order, scores within `tol` (thread counts and batch make-up move
    LLM logits by ~1e-5)."""
    rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (one, two)]
    if [r["id"] for r in rows[0]] != [r["id"] for r in rows[1]]:
        return False
    for a, b in zip(*rows):
        ra, rb = a.get("recommendations", []), b.get("recommendations", [])
        if [r["item_id"] for r in ra] != [r["item_id"] for r in rb] or a.get("error") != b.get("error"):
            return False
        if any(abs(x["score"] - y["score"]) > tol for x, y in zip(ra, rb)):
            return False
    return True


def _resume(a, work: Path, rec, result, users) -> dict:
    """Resume bookkeeping on a big file: only the instant recommender serves, so the model costs nothing."""
    from recllm import batch

    instant = Instant(result, rec.catalog)
    n, done = a.resume_rows, a.resume_done
    src = write_rows(work / "resume-in.jsonl", users, n)
    full = work / "resume-full.jsonl"
    batch.run_batch(src, full, recommender=instant, batch_size=64, progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    rest = write_rows(work / "resume-rest.jsonl", users, n - done)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    out = work / "resume-out.jsonl"

    def prefix_resume():
        out.write_bytes(b"".join(lines[:done]) + lines[done][:50])  # a torn line too
        batch.run_batch(src, out, recommender=instant, resume=True, batch_size=32, progress=False)

    def shard_resume():
        out.unlink(missing_ok=True)
        batch.shard_path(out, 0).write_bytes(b"".join(lines[0:done:2]))
        batch.shard_path(out, 1).write_bytes(b"".join(lines[1:done:2]) + lines[done][:50])
        batch.run_batch(src, out, recommender=instant, resume=True, batch_size=32, progress=False)

    def fresh_rest():
        batch.run_batch(rest, work / "resume-rest-out.jsonl", recommender=instant, batch_size=32, progress=False)

    t_fresh = timed(fresh_rest)
    t_prefix = timed(prefix_resume)
    assert out.read_bytes() == full.read_bytes()
    t_shard = timed(shard_resume)
    assert out.read_bytes() == full.read_bytes()
    return {"rows": n, "done": done, "out_mb": round(full.stat().st_size / 1e6, 1),
            "fresh_rest_s": round(t_fresh, 3), "prefix_resume_s": round(t_prefix, 3),
            "prefix_overhead_s": round(t_prefix - t_fresh, 3), "shard_resume_s": round(t_shard, 3),
            "shard_overhead_s": round(t_shard - t_fresh, 3)}  # fmt: skip


def _report(f: dict, sizes: list[int]) -> None:
    print(f"\nmodel {f['model']} (adapter {f['adapter']}), explain={f['explain']}, {f['rows']} user rows, k=10;"
          f" {f['machine']}\n")  # fmt: skip
    print("| batch size | seconds | rows/s | vs batch 1 |\n|---:|---:|---:|---:|")
    for size in sizes:
        b = f["batch"][size]
        print(f"| {size} | {b['seconds']} | {b['rows_per_s']} | {b['speedup_vs_first']}x |")
    if "procs" in f:
        print("\n| processes | wall s (start-up included) | rows/s end to end | serving s (slowest process) | "
              "rows/s serving |\n|---:|---:|---:|---:|---:|")  # fmt: skip
        for n in (1, 2):
            r = f["procs"][n]
            print(f"| {n} | {r['wall_s']} | {r['rows_per_s_end_to_end']} | {r['serve_s']} | "
                  f"{r['rows_per_s_serving']} |")  # fmt: skip
        print("\n1- and 2-process outputs: same items in the same order, scores within 1e-4:",
              f["procs"]["same_rows"])  # fmt: skip
    r = f["resume"]
    print(f"\nresume, {r['rows']} rows with {r['done']} done (OUT {r['out_mb']} MB): fresh run of the "
          f"{r['rows'] - r['done']} left {r['fresh_rest_s']} s; resumed from a prefix {r['prefix_resume_s']} s "
          f"(overhead {r['prefix_overhead_s']} s); from 2 shards + merge {r['shard_resume_s']} s "
          f"(overhead {r['shard_overhead_s']} s)")  # fmt: skip


if __name__ == "__main__":
    main()
