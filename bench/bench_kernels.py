"""CPU kernel options for the packaged SmolLM2-135M + shipped adapter, measured on this machine.

    python bench/bench_kernels.py                           # every variant, 8 users, 2 repeats
    python bench/bench_kernels.py --variants fp32 bf16 --eval --eval-users 10   # + NDCG@10, explanation metrics

One fp32 pass of the engine (k=5, all 5 explained) over `--users` users records the real rank prompts
(`letter_scores`, 20 candidates each) and explanation calls (`stream_many`, the 5 rows of a request in one
batch). Each variant then replays exactly those calls:
  rank:    users/s of `letter_scores` (the ranker's batch size), and against fp32: top-1 agreement, mean top-10
           overlap of the 20 letter scores, largest score difference;
  explain: decoded tokens/s (output tokens re-encoded), and the share of rows whose text equals fp32's.
Variants: fp32 (today's default), fp32-t1 / fp32-t2 (1 / 2 torch threads), bf16 (weights cast), autocast (fp32 weights,
bf16 autocast), int8 (dynamic int8 `quantize_dynamic` of every Linear after the LoRA merge), compile
(`torch.compile`, inductor), static (HF `generate` with a static vs dynamic KV cache, decode only).
`--eval`: NDCG@10 on the test split (`evaluate.run_eval`, shipped fitted retriever, every variant as one
ranker system of one report with paired comparisons) and the explanation metrics of `explain_eval.measure`.
Times are medians of `--repeats`; the machine is shared, so read ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("fp32", "fp32-t1", "fp32-t2", "bf16", "autocast", "int8", "compile", "static")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- recording


class Recorder:
    """Wraps an LM: records the prompts of `letter_scores` and the arguments of `stream_many` calls."""

    def __init__(self, lm):
        self.lm, self.rank_calls, self.explain_calls = lm, [], []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def letter_scores(self, prompts, letter_ids, batch_size=8):
        self.rank_calls.append((list(prompts), list(letter_ids), batch_size))
        return self.lm.letter_scores(prompts, letter_ids, batch_size=batch_size)

    def stream_many(self, prompts, max_new_tokens=60, **kwargs):
        self.explain_calls.append((list(prompts), max_new_tokens, kwargs))
        return self.lm.stream_many(prompts, max_new_tokens, **kwargs)


def record(base, users: list[str]) -> tuple[object, Recorder]:
    from recllm.engine import Recommender
    from recllm.request import Request

    spy = Recorder(base)
    rec = Recommender(lm=spy, explain=5, progress=False)
    for user in users:
        rec.recommend(Request(user=user, k=5, explain=5))
    return rec, spy


# ------------------------------------------------------------------------------------------- variants


def make_variant(name: str, base, threads: int):
    """(LM, context factory, torch threads) for a variant of the merged fp32 `base` LM."""
    import torch

    from recllm.llm.model import LM

    net, ctx = base.model, nullcontext
    if name in ("fp32-t1", "fp32-t2"):
        threads = int(name[-1])
    elif name == "bf16":
        net = copy.deepcopy(base.model).to(torch.bfloat16)
    elif name == "autocast":
        ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif name == "int8":
        net = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8)
    elif name == "compile":
        net = torch.compile(copy.deepcopy(base.model), dynamic=True)
    lm = LM(net, base.tokenizer, base.model_id, adapter_id=base.adapter_id, adapter_metadata=base.adapter_metadata)
    return lm, ctx, threads


def _top(scores, n: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:n]


def replay(lm, ctx, spy: Recorder, repeats: int) -> dict:
    """Time the recorded rank and explanation calls on `lm`; their outputs for comparison."""
    import numpy as np

    rank_s, explain_s, scores, texts = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ctx():
            scores = [lm.letter_scores(p, ids, batch_size=b) for p, ids, b in spy.rank_calls]
        rank_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        texts = []
        with ctx():
            for prompts, max_new, kwargs in spy.explain_calls:
                rows = [""] * len(prompts)
                for row, piece in lm.stream_many(prompts, max_new, **kwargs):
                    rows[row] += piece or ""
                texts += rows
        explain_s.append(time.perf_counter() - t0)
    tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"rank_s": statistics.median(rank_s), "explain_s": statistics.median(explain_s),
            "scores": np.concatenate(scores), "texts": texts, "tokens": tokens}


def compare(out: dict, ref: dict) -> dict:
    a, b = out["scores"], ref["scores"]
    top1 = sum(_top(x, 1) == _top(y, 1) for x, y in zip(a, b)) / len(a)
    top10 = sum(len(set(_top(x, 10)) & set(_top(y, 10))) / 10 for x, y in zip(a, b)) / len(a)
    order = sum(_top(x, 20) == _top(y, 20) for x, y in zip(a, b)) / len(a)
    same = sum(x == y for x, y in zip(out["texts"], ref["texts"])) / max(1, len(ref["texts"]))
    return {"top1_agree": round(top1, 3), "top10_overlap": round(top10, 3), "same_order": round(order, 3),
            "max_score_diff": round(float(abs(a - b).max()), 4), "same_text": round(same, 3)}


def static_cache(base, spy: Recorder, repeats: int) -> dict:
    """HF `generate` (greedy, the recorded explanation batches) with a dynamic vs a static KV cache: tokens/s."""
    import torch

    tok = base.tokenizer
    out = {}
    for impl in ("dynamic", "static"):
        times, tokens = [], 0
        for _ in range(repeats):
            t0, tokens = time.perf_counter(), 0
            for prompts, max_new, _ in spy.explain_calls:
                enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
                kwargs = {"cache_implementation": "static"} if impl == "static" else {}
                with torch.inference_mode():
                    ids = base.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                              pad_token_id=tok.pad_token_id, **kwargs)
                tokens += int((ids[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
            times.append(time.perf_counter() - t0)
        out[impl] = {"explain_s": round(statistics.median(times), 3), "tokens": tokens,
                     "tokens_per_s": round(tokens / statistics.median(times), 1)}
    return out


# ------------------------------------------------------------------------------------------- quality


def quality(rec, lms: dict, n_users: int) -> dict:
    """NDCG@10 on the test split (one report, one ranker system per variant) + explanation metrics."""
    from recllm import evaluate, explain_eval, paths
    from recllm.engine import Recommender
    from recllm.rank import LLMRanker

    retriever = paths.bundled_retriever_dir() if hasattr(paths, "bundled_retriever_dir") else \
        ROOT / "recllm" / "data" / "retrievers" / "ml-latest-small"
    rankers, contexts = {}, {}
    for name, (lm, ctx, threads) in lms.items():
        rank = evaluate.llm_ranker(LLMRanker(lm), rec.catalog)

        def run(requests, rank=rank, ctx=ctx, threads=threads):
            _threads(threads)
            with ctx():
                return rank(requests)

        rankers[name] = run
    t0 = time.perf_counter()
    report = evaluate.run_eval(systems=["retriever"], ranker=rankers, retriever=str(retriever), progress=False)
    data = json.loads(report.to_json())
    out = {"eval_s": round(time.perf_counter() - t0, 1), "ndcg@10": {}, "explain": {}}
    for name, system in data["systems"].items():
        out["ndcg@10"][name] = round(system["metrics"]["ndcg@10"], 4)
    out["comparisons"] = data.get("comparisons")
    users = explain_eval.sample_users(rec.interactions, n_users)
    for name, (lm, ctx, threads) in lms.items():
        _threads(threads)
        one = Recommender(rec.catalog, rec.interactions, lm=lm, progress=False)
        with ctx():
            measured = explain_eval.measure(one, users, k=5, progress=False)
        out["explain"][name] = measured["summary"]
        out["explain"][name]["texts"] = [e["text"] for e in measured["explanations"]]
    return out


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8, help="users whose calls are recorded and replayed (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="replays per variant; the median counts (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every variant but fp32-t1/-t2 "
                   "(default 2; on a busy machine 1 is fairer)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--eval", action="store_true", help="also NDCG@10 (test split) and explanation metrics")
    p.add_argument("--eval-variants", nargs="+", default=["fp32", "bf16"], choices=VARIANTS[:-1])
    p.add_argument("--eval-users", type=int, default=10, help="users for the explanation metrics (default 10)")
    p.add_argument("--json", type=Path, help="save the figures here")
    a = p.parse_args(argv)

    import torch

    from recllm import llm
    from recllm.engine import default_adapter

    import os
    os.environ["RECLLM_DTYPE"] = "float32"  # the reference the variants are compared with, whatever the default
    os.environ["RECLLM_THREADS"] = str(a.threads)
    base = llm.load_model(None, default_adapter(None))
    _threads(a.threads)
    log(f"recording {a.users} users with {base!r}")
    from recllm.catalog import default_interactions

    users = sorted(default_interactions(None, None).users, key=str)[: a.users]
    rec, spy = record(base, users)
    prompts = sum(len(c[0]) for c in spy.rank_calls)
    rows = sum(len(c[0]) for c in spy.explain_calls)
    figures = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                          f"{torch.__version__}", "users": len(users), "rank_prompts": prompts,
               "explain_rows": rows, "threads": a.threads, "load_avg": os.getloadavg()[0], "variants": {}}
    ref = None
    for name in ["fp32"] + [v for v in a.variants if v not in ("fp32", "static")]:
        log(f"variant {name}")
        try:
            lm, ctx, threads = make_variant(name, base, a.threads)
            _threads(threads)
            out = replay(lm, ctx, spy, 1 if name == "compile" else a.repeats)
            if name == "compile":  # the first replay compiled; time the second
                out = replay(lm, ctx, spy, 1)
        except Exception as exc:  # noqa: BLE001 - a variant that does not run here is a finding, not a crash
            figures["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        finally:
            _threads(a.threads)
        ref = ref or out
        row = {"rank_users_per_s": round(len(users) / out["rank_s"], 2), "rank_s": round(out["rank_s"], 3),
               "explain_tokens_per_s": round(out["tokens"] / out["explain_s"], 1),
               "explain_s": round(out["explain_s"], 3), **compare(out, ref)}
        figures["variants"][name] = row
        log(json.dumps(row))
    if "static" in a.variants:
        log("static KV cache (HF generate)")
        try:
            figures["static_cache"] = static_cache(base, spy, a.repeats)
        except Exception as exc:  # noqa: BLE001
            figures["static_cache"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        log(json.dumps(figures["static_cache"]))
    if a.eval:
        log("quality: NDCG@10 on the test split and explanation metrics")
        lms = {name: make_variant(name, base, a.threads) for name in a.eval_variants}
        figures["quality"] = quality(rec, lms, a.eval_users)
    _report(figures)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1))
    return 0


def _report(f: dict) -> None:
    fp = f["variants"].get("fp32", {})
    print(f"\n{f['machine']}; {f['users']} users, {f['rank_prompts']} rank prompts, {f['explain_rows']} explained rows")
    print("| variant | rank users/s | × fp32 | explain tok/s | × fp32 | top-1 agree | top-10 overlap | same order "
          "| max score diff | same text |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in f["variants"].items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue
        print(f"| {name} | {r['rank_users_per_s']} | {r['rank_users_per_s'] / fp['rank_users_per_s']:.2f} "
              f"| {r['explain_tokens_per_s']} | {r['explain_tokens_per_s'] / fp['explain_tokens_per_s']:.2f} "
              f"| {r['top1_agree']} | {r['top10_overlap']} | {r['same_order']} | {r['max_score_diff']} "
              f"| {r['same_text']} |")
    if "static_cache" in f:
        print(f"\nHF generate, KV cache: {json.dumps(f['static_cache'])}")
    q = f.get("quality")
    if q:
        print(f"\nNDCG@10 (test split, shipped retriever's top 20 re-ranked): {json.dumps(q['ndcg@10'])}")
        for name, s in q["explain"].items():
            same = sum(x == y for x, y in zip(s["texts"], next(iter(q["explain"].values()))["texts"]))
            print(f"explanations {name}: " + json.dumps({k: v for k, v in s.items() if k != "texts"})
                  + f" same text as first: {same}/{len(s['texts'])}")


if __name__ == "__main__":
    sys.exit(main())
