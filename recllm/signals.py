"""Retrieval signals that need no torch, and their fusion.

Every signal maps a history to one score per item, higher = better, computed item by item (so scoring
a subset of candidates gives the same values as scoring the whole catalog):

- `seq`: the sequential encoder's dot product u . v (recllm.seqrec), a logit;
- `transition`: log1p of how often each item followed the history's last few items in training
  (`Transitions`, a CSR matrix in plain numpy arrays, saved as `.npz` without pickle);
- `content`: cosine between the item's text embedding and the recency-weighted mean of the history's
  text embeddings (`content_user_vectors`);
- `popularity`: log1p of the item's training interaction count.

`fuse(signal_scores, weights)` is a weighted sum of these (a product of experts in log space); the
weights are chosen on the validation split by `choose_weights` (a `coordinate_search`, which also tunes
the transition settings in `recllm.seqrec`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class TransitionConfig:
    gaps: int = 1  # count j after i when j is 1..gaps steps later
    gap_decay: float = 0.5  # weight of a step-g pair: gap_decay ** (g - 1)
    last: int = 3  # how many of the history's last items vote
    last_decay: float = 1.0  # weight of the k-th last item: last_decay ** (k - 1)
    normalize: float = 0.0  # divide each source row by (its total ** normalize): 1 = P(j | i), 0 = counts
    backward: float = 0.0  # weight of reverse pairs (j before i), relative to forward ones


class Transitions:
    """Sparse item -> next-item counts; `scores(histories)` gives a (B, N) float32 matrix."""

    def __init__(self, n_items: int, indptr, indices, data, config: TransitionConfig):
        self.n_items = n_items
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.data = np.asarray(data, dtype=np.float32)
        self.config = config
        rows = np.repeat(np.arange(n_items), np.diff(self.indptr))
        self.row_totals = np.bincount(rows, weights=self.data, minlength=n_items).astype(np.float32)

    @classmethod
    def fit(cls, sequences, n_items: int, config: TransitionConfig | None = None) -> "Transitions":
        """Count transitions in `sequences` (iterables of item indices, oldest first)."""
        config = config or TransitionConfig()
        src, dst, w = [], [], []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            for g in range(1, config.gaps + 1):
                if len(seq) > g:
                    src.append(seq[:-g])
                    dst.append(seq[g:])
                    w.append(np.full(len(seq) - g, config.gap_decay ** (g - 1), dtype=np.float32))
                    if config.backward > 0:
                        src.append(seq[g:])
                        dst.append(seq[:-g])
                        w.append(np.full(len(seq) - g, config.backward * config.gap_decay ** (g - 1), dtype=np.float32))
        if src:
            src_a, dst_a, w_a = np.concatenate(src), np.concatenate(dst), np.concatenate(w)
        else:
            src_a = dst_a = np.zeros(0, dtype=np.int64)
            w_a = np.zeros(0, dtype=np.float32)
        key = src_a * n_items + dst_a
        uniq, inv = np.unique(key, return_inverse=True)
        data = np.bincount(inv, weights=w_a, minlength=len(uniq)).astype(np.float32)
        rows, cols = uniq // n_items, uniq % n_items
        indptr = np.zeros(n_items + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        indptr = np.cumsum(indptr)
        return cls(n_items, indptr, cols, data, config)

    def scores(self, histories) -> np.ndarray:
        """(B, N): sum over the last `config.last` history items of their (weighted) follower counts."""
        c = self.config
        out = np.zeros((len(histories), self.n_items), dtype=np.float32)
        for b, hist in enumerate(histories):
            tail = list(hist)[-c.last :][::-1]  # most recent first
            for k, item in enumerate(tail):
                lo, hi = self.indptr[item], self.indptr[item + 1]
                if lo == hi:
                    continue
                vals = self.data[lo:hi]
                if c.normalize:
                    vals = vals / self.row_totals[item] ** c.normalize
                out[b, self.indices[lo:hi]] += (c.last_decay**k) * vals
        return out

    def save(self, path: Path) -> None:
        np.savez(
            path,
            n_items=np.int64(self.n_items),
            indptr=self.indptr,
            indices=self.indices,
            data=self.data,
            config=np.frombuffer(_json_bytes(asdict(self.config)), dtype=np.uint8),
        )

    @classmethod
    def load(cls, path: Path) -> "Transitions":
        with np.load(path, allow_pickle=False) as z:
            config = TransitionConfig(**json.loads(bytes(z["config"]).decode()))
            return cls(int(z["n_items"]), z["indptr"], z["indices"], z["data"], config)


def popularity(sequences, n_items: int) -> np.ndarray:
    """(N,) interaction counts in `sequences`."""
    counts = np.zeros(n_items, dtype=np.float64)
    for seq in sequences:
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1.0)
    return counts


def popularity_tiebreak(sequences, n_items: int) -> np.ndarray:
    """(N,) float32 in [0, 1e-3]: log popularity scaled so small that it only orders items a count
    signal leaves tied."""
    pop = np.log1p(popularity(sequences, n_items)).astype(np.float32)
    return 1e-3 * pop / max(float(pop.max()), 1.0)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def content_user_vectors(histories, item_vectors: np.ndarray, *, last: int = 20, decay: float = 0.9) -> np.ndarray:
    """(B, D) unit vectors: mean of the last `last` history items' vectors, the k-th newest weighted
    `decay ** k` (k = 0 for the newest). An empty history gives a zero vector."""
    out = np.zeros((len(histories), item_vectors.shape[1]), dtype=np.float32)
    for b, hist in enumerate(histories):
        tail = np.asarray(list(hist)[-last:], dtype=np.int64)
        if len(tail) == 0:
            continue
        w = decay ** np.arange(len(tail) - 1, -1, -1, dtype=np.float64)
        v = (w[:, None] * item_vectors[tail]).sum(0)
        norm = np.linalg.norm(v)
        out[b] = v / norm if norm > 0 else v
    return out


def fuse(signal_scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of signal scores (same shape each, e.g. (B, N) or (N,)).

    A signal named in `weights` but absent from `signal_scores` contributes nothing (e.g. no content
    vectors); a signal with weight 0 is ignored.
    """
    total = None
    for name, w in weights.items():
        if w == 0 or name not in signal_scores:
            continue
        part = np.asarray(signal_scores[name], dtype=np.float32) * np.float32(w)
        total = part if total is None else total + part
    if total is None:
        shape = next(iter(signal_scores.values())).shape if signal_scores else (0,)
        return np.zeros(shape, dtype=np.float32)
    return total


WEIGHT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
               20.0, 30.0, 50.0, 100.0)  # candidate weights relative to the base signal


def choose_weights(
    signal_scores: dict[str, np.ndarray],
    evaluate,
    *,
    base: str = "seq",
    grid=WEIGHT_GRID,
    rounds: int = 2,
) -> tuple[dict[str, float], float]:
    """Coordinate search for fusion weights maximising `evaluate(fused_scores) -> float`.

    `base` keeps weight 1 (the scale is free); each other signal's weight is picked from `grid` in
    turn, `rounds` times over. Returns (weights, best value).
    """
    names = list(signal_scores)
    weights = {n: (1.0 if n == base else 0.0) for n in names}
    if base not in weights:
        weights[names[0]] = 1.0
        base = names[0]
    return coordinate_search(weights, {n: grid for n in names if n != base},
                             lambda w: evaluate(fuse(signal_scores, w)), rounds=rounds)


def coordinate_search(start: dict, grids: dict, value, *, rounds: int = 2,
                      min_gain: float = 1e-9) -> tuple[dict, float]:
    """Coordinate ascent over a grid: each key of `grids` in turn tries every value of its grid, keeping a change
    when `value(settings)` gains more than `min_gain`; at most `rounds` passes, fewer when a pass changes nothing.
    Returns (best settings, best value)."""
    best_cfg, best = dict(start), value(dict(start))
    for _ in range(rounds):
        improved = False
        for key, grid in grids.items():
            for v in grid:
                trial = dict(best_cfg, **{key: v})
                if trial == best_cfg:
                    continue
                val = value(trial)
                if val > best + min_gain:
                    best, best_cfg, improved = val, trial, True
        if not improved:
            break
    return best_cfg, best
