"""Paired bootstrap of an adapter's test-split gain over the retriever, from the LLM scores `recllm train` saved
(`<work dir>/scores-test.npz`, retriever order as served) — no model run needed.

    python bench/adapter_paired.py --scores WORK/scores-test.npz --adapter adapters/NAME [--write]

Prints retriever vs fused NDCG@10 (all test users, the adapter's fusion weight) and the paired difference with its
95% interval and p-values (`fusion.paired_gain`); `--write` adds it to the adapter's metadata (metrics.test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from recllm import evaluate, fusion, llm, seqrec, split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="scores-test.npz from the training work folder")
    parser.add_argument("--adapter", required=True, help="the adapter folder (its fusion weight and retriever)")
    parser.add_argument("--write", action="store_true", help="store the result in the adapter's metadata")
    args = parser.parse_args(argv)
    meta = llm.read_adapter_metadata(Path(args.adapter))
    catalog, interactions = split.load_inputs(None, None)
    data = split.prepare(catalog, interactions)
    fitted = seqrec.CollaborativeRetriever.load(meta["training_data"]["retriever"]["path"])
    ranking = evaluate.rank_all(fitted.scores_idx, data, "test")
    saved = np.load(args.scores)
    users = [int(u) for u in saved["users"]]
    keep = [np.isfinite(row) for row in saved["llm"]]
    scores = fusion.PhaseScores("test", ranking, users, [r[k] for r, k in zip(saved["retriever"], keep)],
                               [r[k] for r, k in zip(saved["llm"], keep)])
    weight = float(meta["fusion_weight"])
    found = fusion.phase_metrics(scores, data, weight)
    out = {"adapter": Path(args.adapter).name, "fusion_weight": weight, "users": found["users"],
           "retriever_ndcg@10": round(found["retriever"]["ndcg@10"], 4), "fused_ndcg@10": round(found["fused"]["ndcg@10"], 4),
           "paired_ndcg@10": found["paired_ndcg@10"]}
    print(json.dumps(out, indent=1))
    if args.write:
        path = Path(args.adapter) / llm.ADAPTER_METADATA
        full = json.loads(path.read_text())
        full["metrics"]["test"]["paired_ndcg@10"] = found["paired_ndcg@10"]
        path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
