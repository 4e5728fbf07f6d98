"""The evaluation data split (LlamaRec protocol), shared by fitting (`recllm.seqrec`) and evaluation.

- interactions whose item is not in the catalog (so has no title) are dropped; repeated (user, item)
  pairs keep their first occurrence only, so a held-out item is always new to its user;
- 5-core on users AND items, repeated until nothing changes (`k` / `recllm fit-retriever --min-count`: a lower
  core for short sequences such as conversations; a user always keeps at least 3 items, since two are held out);
- per user, chronological order with ties broken by file row order; last item = test, second to last
  = validation, the rest = train.

`load_inputs` reads a catalog and interactions (paths, loaded objects or None for the bundled MovieLens),
`prepare` turns them into an `EvalData`. `item_texts` / `content_matrix` give the items' text (vectors)
aligned to the split, with MovieLens tags counted from train-side tag events only (see `train_side_tags`).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recllm.errors import CatalogError, InputError

MIN_COUNT = 5  # k of the k-core filter, users and items alike
MIN_USER_ITEMS = 3  # a user needs a train item besides the validation and test ones
CONTENT_TEXTS = "train-side tags"  # recorded in a fitted retriever whose content vectors come from `item_texts`


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


def k_core(sequences: dict[str, list[str]], k: int = MIN_COUNT, *, user_k: int | None = None) -> dict[str, list[str]]:
    """Keep items with at least `k` interactions and users with at least `user_k` (default `k`), repeating until
    nothing changes."""
    user_k = k if user_k is None else user_k
    seqs = {u: list(s) for u, s in sequences.items() if s}
    total = sum(len(s) for s in seqs.values())
    while True:
        item_counts = Counter(i for s in seqs.values() for i in s)
        new: dict[str, list[str]] = {}
        for user, seq in seqs.items():
            kept = [i for i in seq if item_counts[i] >= k]
            if len(kept) >= user_k:
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
    """`k`-core filter chronological `user -> [item ids]` (users: at least `MIN_USER_ITEMS`) and split
    leave-one-out.

    `item_order` fixes item indices (catalog order); items are otherwise numbered by first appearance.
    Repeated items in a user's sequence keep their first occurrence.
    """
    stats = dict(stats or {})
    deduped = {user: list(dict.fromkeys(seq)) for user, seq in sequences.items()}
    stats["repeats_dropped"] = sum(len(s) for s in sequences.values()) - sum(len(s) for s in deduped.values())
    stats["before_filter"] = {
        "users": len(deduped),
        "items": len({i for s in deduped.values() for i in s}),
        "interactions": sum(len(s) for s in deduped.values()),
    }
    if not isinstance(k, int) or k < 1:
        raise InputError(f"the minimum count must be a whole number of at least 1, not {k!r}")
    core = k_core(deduped, k, user_k=max(k, MIN_USER_ITEMS))
    if not core:
        raise CatalogError(f"{name}: no user has {max(k, MIN_USER_ITEMS)} or more interactions after {k}-core "
                           "filtering (a lower --min-count keeps shorter sequences)")
    present = {i for s in core.values() for i in s}
    if item_order is None:
        item_ids = list(dict.fromkeys(i for s in core.values() for i in s))
    else:
        item_ids = [i for i in item_order if i in present]
    index = {item: n for n, item in enumerate(item_ids)}
    users = list(core)
    seqs = [np.fromiter((index[i] for i in core[user]), dtype=np.int64) for user in users]
    stats.update(users=len(users), items=len(item_ids), interactions=int(sum(len(s) for s in seqs)), k_core=k)
    return EvalData(
        name=name,
        item_ids=item_ids,
        user_ids=users,
        train=[s[:-2] for s in seqs],
        valid=np.asarray([s[-2] for s in seqs], dtype=np.int64),
        test=np.asarray([s[-1] for s in seqs], dtype=np.int64),
        stats=stats,
    )


def load_inputs(catalog=None, interactions=None):
    """(Catalog, Interactions) from paths or loaded objects; None = the bundled MovieLens."""
    from recllm.catalog import Catalog, load_catalog, load_interactions

    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    if interactions is None or isinstance(interactions, (str, Path)):
        interactions = load_interactions(interactions)
    return catalog, interactions


def prepare(catalog, interactions, *, k: int = MIN_COUNT) -> EvalData:
    """EvalData from a `Catalog` and `Interactions` (recllm.catalog): the full protocol above."""
    titled = [item_id for item_id, item in catalog.items.items() if getattr(item, "title", "")]
    titled_set = set(titled)
    dropped = 0
    sequences: dict[str, list[str]] = {}
    for user, seq in interactions.sequences().items():  # chronological, ties by row order
        items = [item for item, _ts in seq if item in titled_set]
        dropped += len(seq) - len(items)
        if items:
            sequences[user] = items
    name = getattr(catalog, "name", "data")
    return split_sequences(sequences, titled, name=name, k=k, stats={"untitled_dropped": dropped})


# ---------------------------------------------------------------- item text without held-out information


def train_side_tags(data: EvalData, interactions, tags_csv: str | Path) -> dict[str, tuple[str, ...]]:
    """item id -> its most frequent tags, counted (as `catalog` does) over train-side tag events only.

    MovieLens tags carry a user and a time. A tag event of an evaluated user counts only when it is
    older than that user's validation interaction and is not on one of the user's held-out items
    (validation or test); tags of users outside the split are item side information and count.
    """
    from recllm.catalog import TOP_TAGS, clean_text

    held = {u: (data.item_ids[v], data.item_ids[t]) for u, v, t in zip(data.user_ids, data.valid, data.test)}
    sequences = interactions.sequences()
    cutoff = {u: next(ts for item, ts in sequences[u] if item == held[u][0]) for u in held}
    counts: dict[str, Counter] = {}
    with open(tags_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            user, item = str(row.get("userId", "")).strip(), str(row.get("movieId", "")).strip()
            if user in held and (item in held[user] or float(row.get("timestamp") or 0) >= cutoff[user]):
                continue
            tag = clean_text(row.get("tag"), 60).lower()
            if tag:
                counts.setdefault(item, Counter())[tag] += 1
    return {item: tuple(t for t, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS])
            for item, c in counts.items()}


def _tags_csv(catalog) -> Path | None:
    path = Path(catalog.path) / "tags.csv" if getattr(catalog, "path", None) else None
    return path if path is not None and path.is_file() else None


def has_timed_tags(catalog) -> bool:
    """Whether the catalog's tags come from user tag events (a MovieLens folder's tags.csv)."""
    return _tags_csv(catalog) is not None


def item_texts(data: EvalData, catalog, interactions) -> list[str]:
    """The embedding text of every item of the split (`Item.text`), aligned to `data.item_ids`.

    A MovieLens folder's tags (tags.csv: user, item, tag, time) are recounted by `train_side_tags`, so no
    held-out interaction leaks into an item's text; tags given as a catalog column have no user or time
    and are used as they are.
    """
    tags_csv = _tags_csv(catalog)
    if tags_csv is None:
        return [catalog.get(i).text for i in data.item_ids]
    tags = train_side_tags(data, interactions, tags_csv)
    return [replace(catalog.get(i), tags=tags.get(i, ())).text for i in data.item_ids]


def content_matrix(data: EvalData, catalog=None, interactions=None, *, vectors=None, embedder=None,
                   progress: bool = True) -> np.ndarray:
    """(N, D) float32 text vectors aligned to `data.item_ids`.

    `vectors`: precomputed, as a mapping item id -> vector or a pair (ids, (M, D) array); items it
    lacks get a zero vector. Otherwise `embedder.encode` (default: recllm.embed's packaged model) embeds
    `item_texts(data, catalog, interactions)`.
    """
    if vectors is not None:
        if isinstance(vectors, tuple):
            ids, arr = vectors
            vectors = dict(zip(ids, np.asarray(arr, dtype=np.float32)))
        dim = len(next(iter(vectors.values())))
        out = np.zeros((data.n_items, dim), dtype=np.float32)
        for n, item in enumerate(data.item_ids):
            if item in vectors:
                out[n] = vectors[item]
        return out
    if catalog is None or interactions is None:
        raise InputError("content vectors need the catalog and interactions (item texts) or precomputed vectors")
    if embedder is None:
        from recllm.embed import get_embedder

        embedder = get_embedder()
    return np.asarray(embedder.encode(item_texts(data, catalog, interactions), progress=progress), dtype=np.float32)
