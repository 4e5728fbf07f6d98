"""Test-split quality of the ranker before/after LoRA tuning, and letter win-rates (position bias).

    python bench/bench_train.py --retriever RETRIEVER_DIR --adapter adapters/smollm2-135m-ml --out runs/train-bench

Systems (LlamaRec protocol via recllm.evaluate, all users, history excluded from the ranking):
  retriever          the fitted collaborative retriever alone
  untuned            retriever + the untuned default model (fusion weight rank.DEFAULT_FUSION_WEIGHT)
  tuned              retriever + the adapter (its fusion weight, chosen on validation)
Both LLM systems read the same prompts (the adapter's rank_config: history and title lengths). Per-user LLM
scores are cached under --out (scores-<system>.npz) so tables can be rebuilt with --systems ... --reuse
(`recllm train` leaves the tuned model's test scores in its work folder as scores-test.npz: the same format).
Also prints training throughput from the adapter's metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from recllm import evaluate, metrics
from recllm.llm import LETTERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retriever", required=True, help="fitted retriever folder (fitted on this data's train split)")
    p.add_argument("--adapter", help="adapter folder (its rank_config and fusion weight are used)")
    p.add_argument("--systems", nargs="+", default=["retriever", "untuned", "tuned"])
    p.add_argument("--phase", choices=("valid", "test"), default="test")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md and cached scores")
    p.add_argument("--reuse", action="store_true", help="reuse cached LLM scores in --out")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from recllm import llm, seqrec
    from recllm.catalog import load_catalog, load_interactions
    from recllm.rank import DEFAULT_FUSION_WEIGHT, LLMRanker, RankConfig
    from recllm.fusion import PhaseScores, phase_metrics, score_phase

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog()
    data = evaluate.prepare(catalog, load_interactions())
    fitted = seqrec.CollaborativeRetriever.load(args.retriever)
    seqrec.check_fitted_on(fitted, data)
    titles = [catalog.get(i).label for i in data.item_ids]
    ranking = evaluate.rank_all(fitted.scores_idx, data, args.phase)
    meta = llm.read_adapter_metadata(args.adapter) if args.adapter else {}
    rank_cfg = RankConfig(**meta["rank_config"]) if meta.get("rank_config") else RankConfig(max_history=10,
                                                                                              title_chars=30)

    report: dict = {"phase": args.phase, "users": data.n_users, "retriever": args.retriever, "adapter": args.adapter,
                    "rank_config": rank_cfg.to_dict(), "systems": {}, "timings_s": {}}
    hit = ranking.ranks <= ranking.top.shape[1]
    report["systems"]["retriever"] = {"all": metrics.summarize(ranking.ranks),
                                      "subset": metrics.summarize(ranking.ranks[hit]), "subset_users": int(hit.sum())}
    target_letters = [0] * len(LETTERS)
    for r in ranking.ranks[hit]:
        target_letters[int(r) - 1] += 1
    report["true_item_letter"] = dict(zip(LETTERS, target_letters))

    for system in [s for s in args.systems if s != "retriever"]:
        cache = out / f"scores-{system}.npz"
        if system == "tuned" and not args.adapter:
            print("bench: --adapter needed for the tuned system", file=sys.stderr)
            return 2
        weight = float(meta["fusion_weight"]) if system == "tuned" else DEFAULT_FUSION_WEIGHT
        t = time.monotonic()
        if args.reuse and cache.is_file():
            z = np.load(cache)
            keep = [np.isfinite(r) for r in z["retriever"]]  # rows are padded with -inf (PhaseScores.save)
            sc = PhaseScores(args.phase, ranking, [int(u) for u in z["users"]],
                             [r[k] for r, k in zip(z["retriever"], keep)], [s[k] for s, k in zip(z["llm"], keep)])
        else:
            lm = llm.load_model(None, args.adapter if system == "tuned" else None)
            ranker = LLMRanker(lm, config=rank_cfg, fusion_weight=weight)
            sc = score_phase(ranker, data, fitted.scores_idx, titles, args.phase, progress=True, ranking=ranking)
            sc.save(cache)
            report["timings_s"][system] = round(time.monotonic() - t, 1)
            report["timings_s"][f"{system}_per_user"] = round((time.monotonic() - t) / max(len(sc.users), 1), 2)
        m = phase_metrics(sc, data, weight)
        llm_only = phase_metrics(sc, data, 1.0)
        wins = m["letter_wins"]
        report["systems"][system] = {
            "fusion_weight": weight, "all": m["fused"], "subset": m["fused_subset"],
            "subset_users": m["subset_users"],
            "llm_alone_all": llm_only["fused"], "llm_alone_subset": llm_only["fused_subset"],
            "letter_win_rate": {LETTERS[i]: round(w / max(sum(wins), 1), 4) for i, w in enumerate(wins)},
            "letter_wins": dict(zip(LETTERS, wins)),
        }
    if meta:
        report["training"] = meta.get("training", {})
        report["training_data"] = {k: v for k, v in meta.get("training_data", {}).items() if k != "retriever"}
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    md = _markdown(report)
    (out / "bench.md").write_text(md)
    print(md)
    return 0


def _markdown(report: dict) -> str:
    cols = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10"]
    lines = [f"# Ranker tuning: {report['phase']} split, {report['users']} users", "",
             "| system | fusion w | " + " | ".join(cols) + " | subset users | subset ndcg@10 | subset recall@10 |",
             "|---|---|" + "---|" * (len(cols) + 3)]
    for name, s in report["systems"].items():
        row = " | ".join(f"{s['all'][c]:.4f}" for c in cols)
        lines.append(f"| {name} | {s.get('fusion_weight', '-')} | {row} | {s['subset_users']} | "
                     f"{s['subset']['ndcg@10']:.4f} | {s['subset']['recall@10']:.4f} |")
        if "llm_alone_all" in s:
            row = " | ".join(f"{s['llm_alone_all'][c]:.4f}" for c in cols)
            lines.append(f"| {name} (LLM order alone) | 1.0 | {row} | {s['subset_users']} | "
                         f"{s['llm_alone_subset']['ndcg@10']:.4f} | {s['llm_alone_subset']['recall@10']:.4f} |")
    lines += ["", "## Letter win-rate (how often each prompt position gets the top LLM score)", "",
              "| system | " + " | ".join(LETTERS) + " |", "|---|" + "---|" * len(LETTERS)]
    for name, s in report["systems"].items():
        if "letter_win_rate" in s:
            lines.append(f"| {name} | " + " | ".join(f"{s['letter_win_rate'][c]:.2f}" for c in LETTERS) + " |")
    t = report["true_item_letter"]
    total = max(sum(t.values()), 1)
    lines.append("| (true item's letter) | " + " | ".join(f"{t[c] / total:.2f}" for c in LETTERS) + " |")
    if report.get("training"):
        tr = report["training"]
        lines += ["", f"Training: {tr.get('global_step')} steps, {tr.get('train_wall_s')} s wall "
                      f"(incl. {tr.get('eval_during_training_s')} s validation), {tr.get('examples_per_s')} examples/s "
                      f"on {tr.get('device')}."]
    if report.get("timings_s"):
        lines += ["", "Scoring time (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
