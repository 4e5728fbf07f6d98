"""The product's retrieval path (Chroma queries + fused re-scoring) against the evaluation's numpy path.

    python bench/bench_product_path.py          # bundled MovieLens, shipped fitted retriever, test split

Prints NDCG/Recall@10 of `Retriever.retrieve` (what recommend/chat/batch use) for every user's test
history, next to the same fitted retriever scored over all items in numpy (what `recllm eval` reports).
"""

import math
import statistics
import sys
import time

import numpy as np

from recllm import evaluate, metrics, split
from recllm.engine import Recommender


def main() -> int:
    rec = Recommender(ranker="none", progress=False)
    if rec.collaborative is None:
        print("no fitted retriever", file=sys.stderr)
        return 1
    data = split.prepare(rec.catalog, rec.interactions)
    histories = data.histories("test")
    targets = data.targets("test")
    ranks, seconds = [], []
    for hist, target in zip(histories, targets):
        ids = [data.item_ids[i] for i in hist]
        t0 = time.perf_counter()
        cands = rec.retriever.retrieve(history=ids, k=20)
        seconds.append(time.perf_counter() - t0)
        order = [c.item_id for c in cands]
        tid = data.item_ids[int(target)]
        ranks.append(order.index(tid) + 1 if tid in order else math.inf)
    product = np.array(ranks, dtype=float)
    fitted = rec.collaborative  # fitted on this split: its item order is data.item_ids
    numpy_path = evaluate.rank_all(lambda h: fitted.scores([[data.item_ids[i] for i in x] for x in h]), data,
                                   "test").ranks
    for name, r in (("product path (Chroma)", product), ("eval path (numpy, all items)", numpy_path)):
        print(f"{name:30s} NDCG@10 {metrics.ndcg_at_k(r, 10):.4f}  Recall@10 {metrics.recall_at_k(r, 10):.4f}  "
              f"Recall@20 {metrics.recall_at_k(r, 20):.4f}")
    print(f"product path retrieval latency: median {1000 * statistics.median(seconds):.1f} ms over {len(seconds)} users")
    return 0


if __name__ == "__main__":
    sys.exit(main())
