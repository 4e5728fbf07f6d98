"""The LLM ranker on a split's users, and the retriever/LLM fusion weight chosen on validation.

`retrieve` gives the retriever's top n per history (as `evaluate.rank_all`); `score_phase` scores, with an
`LLMRanker`, the top 20 (retriever order, as served) of every user of a phase whose true item is there;
`choose_fusion_weight` picks the LLM share on validation; `phase_metrics` gives the LlamaRec metrics of that
weight with the paired bootstrap against the retriever alone (`paired_gain`). Used by `recllm train` (stored in
the adapter) and by the bench scripts that re-score saved runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recllm import evaluate, metrics, split

FUSION_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # LLM share tried on validation


def retrieve(score_fn, histories: list[np.ndarray], n: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Top-n item indices (B, n) and their scores per history, the history excluded (as `evaluate.rank_all`)."""
    tops, vals = [], []
    for lo in range(0, len(histories), chunk):
        hist = histories[lo:lo + chunk]
        s = np.array(score_fn(hist), dtype=np.float32)
        s[np.isnan(s)] = -np.inf
        for b, h in enumerate(hist):
            s[b, h] = -np.inf
        best = metrics.top_k(s, n)
        v = np.take_along_axis(s, best, axis=1)
        top = np.full((len(hist), n), -1, dtype=np.int64)  # -1 pads, as in evaluate.Ranking.top
        val = np.full((len(hist), n), -np.inf, dtype=np.float32)
        top[:, : best.shape[1]] = np.where(np.isfinite(v), best, -1)
        val[:, : best.shape[1]] = v
        tops.append(top)
        vals.append(val)
    return np.concatenate(tops), np.concatenate(vals)


@dataclass
class PhaseScores:
    """LLM and retriever scores on one phase for the users whose true item the retriever put in its top n."""

    phase: str
    ranking: evaluate.Ranking  # the retriever's ranks (all users) and top lists
    users: list[int]  # scored users (true item retrieved)
    retriever: list[np.ndarray] = field(default_factory=list)  # per scored user: (n,) retriever scores
    llm: list[np.ndarray] = field(default_factory=list)  # per scored user: (n,) letter logits

    def ranks(self, data: split.EvalData, weight: float) -> np.ndarray:
        """Ranks over ALL users after fusing with `weight` (misses stay inf), through `evaluate.rerank`.

        Users with a retrieved true item that were not scored (a sample was) keep the retriever's rank.
        """
        from recllm.rank import fuse

        fused = {u: fuse(l, r, weight) for u, l, r in zip(self.users, self.llm, self.retriever)}
        hists = data.histories(self.phase)
        keys = {(tuple(data.item_ids[i] for i in hists[u][-evaluate.HISTORY_LEN:]),
                 tuple(data.item_ids[i] for i in self.ranking.top[u] if i >= 0)): u for u in self.users}

        def ranker(requests):  # evaluate.Ranker: [(history ids, candidate ids, retriever scores)] -> scores
            return [fused[keys[(tuple(h), tuple(c))]] for h, c, _ in requests]

        only = evaluate.Ranking(ranks=self.ranking.ranks, top=self.ranking.top.copy())
        for u in range(len(only.top)):
            if u not in fused:  # make rerank skip users we did not score (their target was not retrieved)
                only.top[u] = -1
        ranks = evaluate.rerank(only, data, ranker, self.phase)
        unscored = np.ones(len(ranks), dtype=bool)
        unscored[self.users] = False
        ranks[unscored] = self.ranking.ranks[unscored]
        return ranks

    def save(self, path: Path) -> None:
        """Per-user scores as .npz (users, retriever, llm; rows padded with -inf to the same length)."""
        width = max((len(x) for x in self.llm), default=0)

        def pad(rows):
            return np.array([np.pad(np.asarray(r, dtype=np.float64), (0, width - len(r)), constant_values=-np.inf)
                             for r in rows]).reshape(len(rows), width)

        np.savez(path, users=np.array(self.users, dtype=np.int64), retriever=pad(self.retriever), llm=pad(self.llm))

    def letter_wins(self) -> list[int]:
        """How often each letter (prompt position) gets the highest LLM score."""
        wins = [0] * len(self.llm[0]) if self.llm else []
        for s in self.llm:
            wins[int(np.argmax(s))] += 1
        return wins


def score_phase(ranker, data: split.EvalData, score_fn, titles: list[str], phase: str, *,
                users: int = 0, seed: int = 0, progress: bool = False, history_len: int = evaluate.HISTORY_LEN,
                ranking: evaluate.Ranking | None = None) -> PhaseScores:
    """Score the retriever's top 20 (retriever order, as served) with `ranker` for users whose true item is there.

    users: at most this many of them (a fixed random sample by `seed`; 0: all).
    """
    ranking = ranking or evaluate.rank_all(score_fn, data, phase)
    hists = data.histories(phase)
    hit = np.flatnonzero(ranking.ranks <= ranking.top.shape[1])
    if users and len(hit) > users:
        hit = np.sort(np.random.default_rng(seed).choice(hit, users, replace=False))
    top, vals = retrieve(score_fn, [hists[u] for u in hit], ranking.top.shape[1])
    out = PhaseScores(phase, ranking, [int(u) for u in hit])
    requests = []
    for u, cands, v in zip(hit, top, vals):
        keep = cands >= 0
        if not np.array_equal(cands[keep], ranking.top[u][ranking.top[u] >= 0]):
            raise RuntimeError("retriever candidates are not deterministic")  # pragma: no cover
        out.retriever.append(v[keep].astype(np.float64))
        requests.append(([titles[i] for i in hists[u][-history_len:]], [titles[i] for i in cands[keep]]))
    batch = getattr(ranker.config, "batch_size", 8)
    chunks = range(0, len(requests), batch)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"scoring {phase}", unit="batch", file=sys.stderr, leave=False)
    for lo in chunks:
        out.llm.extend(ranker.score(requests[lo:lo + batch]))
    return out


def choose_fusion_weight(scores: PhaseScores, data: split.EvalData, grid=FUSION_GRID) -> tuple[float, dict]:
    """The LLM share with the best validation NDCG@10 (ties: the smaller weight), and the whole grid."""
    table = {w: metrics.ndcg_at_k(scores.ranks(data, w), 10) for w in grid}
    best = max(grid, key=lambda w: (round(table[w], 12), -w))
    return float(best), {f"{w:g}": round(v, 6) for w, v in table.items()}


def phase_metrics(scores: PhaseScores, data: split.EvalData, weight: float) -> dict:
    """Metrics over all users and over the true-item-retrieved subset, for retriever alone and fused."""
    ranks = scores.ranks(data, weight)
    hit = np.zeros(len(ranks), dtype=bool)
    hit[scores.users] = True  # the scored users (all retrieved ones unless a sample was drawn)
    return {
        "users": int(len(ranks)),
        "retrieved_users": int((scores.ranking.ranks <= scores.ranking.top.shape[1]).sum()),
        "subset_users": int(hit.sum()),  # users behind the *_subset metrics (scored by the LLM)
        "retriever": metrics.summarize(scores.ranking.ranks),
        "fused": metrics.summarize(ranks),
        "retriever_subset": metrics.summarize(scores.ranking.ranks[hit]) if hit.any() else {},
        "fused_subset": metrics.summarize(ranks[hit]) if hit.any() else {},
        "fusion_weight": weight,
        "letter_wins": scores.letter_wins(),
        "paired_ndcg@10": paired_gain(scores.ranking.ranks, ranks),
    }


def paired_gain(retriever_ranks: np.ndarray, fused_ranks: np.ndarray, k: int = 10) -> dict:
    """NDCG@k of the fused ranking minus the retriever's, per user, with a paired bootstrap over the same users
    (`metrics.bootstrap`): mean difference, 95% interval, one- and two-sided p."""
    found = metrics.bootstrap(metrics.per_user(fused_ranks, "ndcg", k), metrics.per_user(retriever_ranks, "ndcg", k))
    return {name: round(value, 5) for name, value in found.items()}
