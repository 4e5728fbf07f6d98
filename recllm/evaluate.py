"""Offline evaluation on the LlamaRec protocol: 5-core filter, leave-one-out split, baselines, reports.

Protocol (see ../shared/DESIGN.md):
- interactions whose item is not in the catalog (so has no title) are dropped; repeated (user, item)
  pairs keep their first occurrence only, so a held-out item is always new to its user;
- 5-core on users AND items, repeated until nothing changes;
- per user, chronological order with ties broken by file row order; last item = test, second to last
  = validation, the rest = train;
- every system scores ALL items; the user's own history (train, plus the validation item at test) is
  excluded from the ranking, as the product does; ties in score are broken by catalog order;
- NDCG / Recall / MRR at 5, 10, 20 averaged over ALL users (a miss counts 0).

`run_eval` runs baselines and the collaborative retriever in one go and returns a `Report`.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recllm import metrics
from recllm.errors import CatalogError, InputError

MIN_COUNT = 5  # k of the k-core filter, users and items alike
HISTORY_LEN = 20  # history items shown to the LLM ranker
N_CANDIDATES = 20  # retriever candidates handed to the ranker
SCORE_CHUNK = 1024  # users scored at once (B x N float32 matrix)


# ---------------------------------------------------------------- data and split


@dataclass
class EvalData:
    """A filtered, split dataset. Items and users are dense indices; `item_ids[i]` is the id of item i."""

    name: str
    item_ids: list[str]  # index -> item id, catalog order
    user_ids: list[str]  # index -> user id, order of first appearance
    train: list[np.ndarray]  # per user: item indices, oldest first (all but the last two)
    valid: np.ndarray  # (U,) validation item per user
    test: np.ndarray  # (U,) test item per user
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def histories(self, phase: str) -> list[np.ndarray]:
        """Model input per user: the train sequence (validation) or train + validation item (test)."""
        if phase == "valid":
            return self.train
        if phase == "test":
            return [np.append(t, v) for t, v in zip(self.train, self.valid)]
        raise ValueError(f"phase must be 'valid' or 'test', not {phase!r}")

    def targets(self, phase: str) -> np.ndarray:
        return self.valid if phase == "valid" else self.test

    def train_sequences_ids(self) -> dict[str, list[str]]:
        """The train split as user -> item ids (what a retriever may be fitted on)."""
        return {u: [self.item_ids[i] for i in seq] for u, seq in zip(self.user_ids, self.train)}


def k_core(sequences: dict[str, list[str]], k: int = MIN_COUNT) -> dict[str, list[str]]:
    """Keep users and items with at least `k` interactions each, repeating until nothing changes."""
    seqs = {u: list(s) for u, s in sequences.items() if s}
    total = sum(len(s) for s in seqs.values())
    while True:
        item_counts = Counter(i for s in seqs.values() for i in s)
        new: dict[str, list[str]] = {}
        for user, seq in seqs.items():
            kept = [i for i in seq if item_counts[i] >= k]
            if len(kept) >= k:
                new[user] = kept
        new_total = sum(len(s) for s in new.values())
        if new_total == total:
            return new
        seqs, total = new, new_total


def split_sequences(
    sequences: dict[str, list[str]],
    item_order: Sequence[str] | None = None,
    *,
    name: str = "data",
    k: int = MIN_COUNT,
    stats: dict | None = None,
) -> EvalData:
    """5-core filter chronological `user -> [item ids]` and split leave-one-out.

    `item_order` fixes item indices (catalog order); items are otherwise numbered by first appearance.
    Repeated items in a user's sequence keep their first occurrence.
    """
    stats = dict(stats or {})
    deduped: dict[str, list[str]] = {}
    repeats = 0
    for user, seq in sequences.items():
        seen: set[str] = set()
        out = []
        for item in seq:
            if item in seen:
                repeats += 1
                continue
            seen.add(item)
            out.append(item)
        deduped[user] = out
    stats["repeats_dropped"] = repeats
    stats["before_filter"] = {
        "users": len(deduped),
        "items": len({i for s in deduped.values() for i in s}),
        "interactions": sum(len(s) for s in deduped.values()),
    }
    core = k_core(deduped, k)
    if not core:
        raise CatalogError(f"{name}: no user has {k} or more interactions after {k}-core filtering")
    present = {i for s in core.values() for i in s}
    if item_order is None:
        item_ids = list(dict.fromkeys(i for s in core.values() for i in s))
    else:
        item_ids = [i for i in item_order if i in present]
    index = {item: n for n, item in enumerate(item_ids)}
    users = list(core)
    train, valid, test = [], [], []
    for user in users:
        seq = np.fromiter((index[i] for i in core[user]), dtype=np.int64)
        train.append(seq[:-2])
        valid.append(seq[-2])
        test.append(seq[-1])
    stats.update(
        users=len(users),
        items=len(item_ids),
        interactions=int(sum(len(core[u]) for u in users)),
        k_core=k,
    )
    return EvalData(
        name=name,
        item_ids=item_ids,
        user_ids=users,
        train=train,
        valid=np.asarray(valid, dtype=np.int64),
        test=np.asarray(test, dtype=np.int64),
        stats=stats,
    )


def prepare(catalog, interactions, *, k: int = MIN_COUNT) -> EvalData:
    """EvalData from a `Catalog` and `Interactions` (recllm.catalog): the full protocol above."""
    titled = [item_id for item_id, item in catalog.items.items() if getattr(item, "title", "")]
    titled_set = set(titled)
    dropped = 0
    sequences: dict[str, list[str]] = {}
    for user, seq in interactions.sequences().items():  # chronological, ties by row order
        items = []
        for item, _ts in seq:
            if item in titled_set:
                items.append(item)
            else:
                dropped += 1
        if items:
            sequences[user] = items
    name = getattr(catalog, "name", "data")
    return split_sequences(sequences, titled, name=name, k=k, stats={"untitled_dropped": dropped})


def load_eval_data(catalog=None, interactions=None) -> EvalData:
    """Load (paths or objects; None = bundled MovieLens) and prepare."""
    from recllm.catalog import Catalog, load_catalog, load_interactions

    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    if interactions is None or isinstance(interactions, (str, Path)):
        interactions = load_interactions(interactions)
    return prepare(catalog, interactions)
