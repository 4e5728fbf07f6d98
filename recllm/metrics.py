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


def per_user(ranks: Sequence[float] | np.ndarray, metric: str, k: int) -> np.ndarray:
    """(U,) value of `metric` ("ndcg", "recall" or "mrr") at k for each user; 0 for a miss or rank > k."""
    r = _ranks(ranks)
    out = np.zeros_like(r)
    hit = r <= k
    if metric == "ndcg":
        out[hit] = 1.0 / np.log2(r[hit] + 1.0)
    elif metric == "recall":
        out[hit] = 1.0
    elif metric == "mrr":
        out[hit] = 1.0 / r[hit]
    else:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return out


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean NDCG@k for 1-based ranks (inf = miss)."""
    return _mean(per_user(ranks, "ndcg", k))


def recall_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean Recall@k (hit rate) for 1-based ranks (inf = miss)."""
    return _mean(per_user(ranks, "recall", k))


def mrr_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean reciprocal rank cut at k for 1-based ranks (inf = miss)."""
    return _mean(per_user(ranks, "mrr", k))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def summarize(ranks: Sequence[float] | np.ndarray, ks: Iterable[int] = KS) -> dict[str, float]:
    """All metrics at all cut-offs, keyed `ndcg@10`, `recall@5`, ..."""
    return {f"{name}@{k}": _mean(per_user(ranks, name, k)) for name in METRICS for k in ks}


def per_user_table(ranks: Sequence[float] | np.ndarray, ks: Iterable[int] = KS) -> tuple[list[str], np.ndarray]:
    """(keys as in `summarize`, (U, len(keys)) per-user values): what `bootstrap` resamples."""
    keys = [f"{name}@{k}" for name in METRICS for k in ks]
    cols = [per_user(ranks, name, k) for name in METRICS for k in ks]
    return keys, np.stack(cols, axis=1) if cols else np.zeros((len(_ranks(ranks)), 0))


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


def ranks_excluding(scores: np.ndarray, histories, targets: np.ndarray) -> np.ndarray:
    """`rank_of_targets` after setting each user's own history items to -inf (in place: pass a copy to keep
    `scores`); the protocol never recommends an item the user already has."""
    for b, h in enumerate(histories):
        scores[b, h] = -np.inf
    return rank_of_targets(scores, targets)


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


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap(values, baseline=None, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              level: float = 0.95) -> dict:
    """Percentile bootstrap over users of a mean.

    values: (U,) per-user values (e.g. `per_user`), or (U, M) for M metrics at once. Users are drawn with
    replacement `resamples` times (a fixed seed: the same draws for every call with the same U, so
    intervals of different systems use the same resampled user sets).
    Alone: {"mean", "low", "high"}, the mean and its `level` interval.
    With `baseline` (same shape, same users in the same order): a PAIRED bootstrap of values - baseline,
    {"mean" (mean difference), "low", "high", "p_one_sided", "p_two_sided"}: `p_one_sided` is the share of
    resamples whose mean difference is <= 0 (evidence that `values` is better: small p); `p_two_sided` is
    2 x the smaller of the shares <= 0 and >= 0, at most 1. Identical systems give difference 0, p = 1.
    Entries are floats for (U,) input and (M,) arrays for (U, M).
    """
    x = np.asarray(values, dtype=np.float64)
    one = x.ndim == 1
    if baseline is not None:
        base = np.asarray(baseline, dtype=np.float64)
        if base.shape != x.shape:
            raise ValueError(f"paired bootstrap needs the same users: {x.shape} vs {base.shape}")
        x = x - base
    x = x.reshape(len(x), -1)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap over no users")
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, x.shape[1]))
    for lo in range(0, resamples, 100):  # resampled user counts, 100 resamples at a time
        r = min(100, resamples - lo)
        draws = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]
        counts = np.bincount(draws.ravel(), minlength=r * n).reshape(r, n)
        means[lo : lo + r] = counts @ x / n
    alpha = (1.0 - level) / 2
    out = {"mean": x.mean(axis=0), "low": np.quantile(means, alpha, axis=0),
           "high": np.quantile(means, 1 - alpha, axis=0)}
    if baseline is not None:
        le, ge = (means <= 1e-12).mean(axis=0), (means >= -1e-12).mean(axis=0)
        out.update(p_one_sided=le, p_two_sided=np.minimum(1.0, 2 * np.minimum(le, ge)))
    return {k: float(v[0]) if one else v for k, v in out.items()}
