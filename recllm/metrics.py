"""Top-k metrics for leave-one-out evaluation: one relevant item per user, ranked among all items.

A rank is 1-based (1 = the true item is first); a miss is `math.inf` (the true item was not ranked
at all, e.g. a retriever that did not return it). With one relevant item the usual definitions
reduce to closed forms:

    Recall@k = 1 if rank <= k            (= HitRate@k)
    NDCG@k   = 1 / log2(rank + 1) if rank <= k   (the ideal DCG is 1)
    MRR@k    = 1 / rank if rank <= k

Every metric is the mean over users, misses included as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

KS = (5, 10, 20)
METRICS = ("ndcg", "recall", "mrr")


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean NDCG@k for 1-based ranks (inf = miss)."""
    r = _ranks(ranks)
    if r.size == 0:
        return 0.0
    hit = r <= k
    gains = np.zeros_like(r)
    gains[hit] = 1.0 / np.log2(r[hit] + 1.0)
    return float(gains.mean())


def recall_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean Recall@k (hit rate) for 1-based ranks (inf = miss)."""
    r = _ranks(ranks)
    return float((r <= k).mean()) if r.size else 0.0


def mrr_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean reciprocal rank cut at k for 1-based ranks (inf = miss)."""
    r = _ranks(ranks)
    if r.size == 0:
        return 0.0
    hit = r <= k
    rr = np.zeros_like(r)
    rr[hit] = 1.0 / r[hit]
    return float(rr.mean())


def summarize(ranks: Sequence[float] | np.ndarray, ks: Iterable[int] = KS) -> dict[str, float]:
    """All metrics at all cut-offs, keyed `ndcg@10`, `recall@5`, ..."""
    out: dict[str, float] = {}
    for name, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k), ("mrr", mrr_at_k)):
        for k in ks:
            out[f"{name}@{k}"] = fn(ranks, k)
    return out


def rank_of_targets(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of `targets[b]` in row `scores[b]` (higher score = better).

    Ties are broken by item index, lower first, exactly as a stable descending sort would list
    them, so the rank equals the target's position in the list a system would actually show.
    Items to be excluded (a user's history) must already be set to `-inf`; a target whose score is
    `-inf` or NaN is a miss (`inf`).
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError("scores must be (B, N) and targets (B,)")
    t = scores[np.arange(len(targets)), targets][:, None]  # (B, 1)
    idx = np.arange(scores.shape[1])[None, :]
    better = (scores > t) | ((scores == t) & (idx < targets[:, None]))
    ranks = better.sum(axis=1).astype(np.float64) + 1.0
    dead = ~np.isfinite(t[:, 0])
    ranks[dead] = math.inf
    return ranks


def rank_in_list(ranked: Sequence[str] | Sequence[int], target) -> float:
    """1-based position of `target` in a ranked list, `inf` when absent."""
    for i, x in enumerate(ranked):
        if x == target:
            return float(i + 1)
    return math.inf


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items per row, best first; ties by lower index (stable)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    # argpartition then a stable sort of the slice; the partition may cut a tie group, so take
    # everything >= the k-th value before sorting to keep the tie order exact.
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for b in range(scores.shape[0]):
        cand = np.flatnonzero(scores[b] >= kth[b])
        order = np.argsort(-scores[b, cand], kind="stable")
        out[b] = cand[order][:k]
    return out


def _ranks(ranks) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if np.any(np.isnan(r)) or np.any(r < 1):
        raise ValueError("ranks are 1-based (>= 1) or inf for a miss")
    return r
