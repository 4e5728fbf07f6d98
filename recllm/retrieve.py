"""Candidate retrieval: a user's history (and/or a free-text ask) → the top-K catalog items.

Content signal: the user vector is a recency-weighted mean of the stored text embeddings of the newest
`max_history` (20) history items, with weight

    w_k = decay ** k,   k = 0 for the newest item, 1 for the one before, ...   (decay = 0.9)

so the 7th newest item counts about half as much as the newest one (the same weighting as
`signals.content_user_vectors`, which the evaluation uses). The mean is L2-normalised. A `query` text is
embedded and blended in: u = normalise((1 - query_weight) * history + query_weight * query); with no
history the query alone is used (cold start). The store returns the nearest items by cosine, with the
history, `filters.exclude_ids` and the metadata filters applied.

Collaborative signal (optional, see `CollaborativeSignal`): an object with `kind`, `user_vector(history)`
(or `encode_users`) and optionally `make_fuse(history)` (`seqrec.CollaborativeRetriever` as is), whose
item vectors were stored with `ItemStore.put_vectors(catalog, kind, ids, vectors)`. When one is given and
it knows an item of the history, each signal fetches `overfetch * k` candidates from the store (filters
and exclusions applied); every candidate of the union gets both signals' exact scores (content cosine,
collaborative inner product; an item the collaborative model does not know gets the lowest score seen);
and a fuse turns the per-signal lists into the top k: the Retriever's `fuse` if given, else the signal's
`make_fuse(history)`, else reciprocal-rank fusion. `Candidate.signals` keeps every signal's score and rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from recllm.errors import EmptyHistory, InputError


@dataclass
class Filters:
    """Constraints on retrieved items."""

    genres: tuple[str, ...] = ()  # item must have ANY of these (case-insensitive)
    exclude_genres: tuple[str, ...] = ()  # item must have NONE of these
    year_min: int | None = None  # inclusive; items without a year never pass a year bound
    year_max: int | None = None  # inclusive
    exclude_ids: frozenset[str] = frozenset()  # never returned (on top of the history)
    where: dict | None = None  # extra metadata equality filters {column: value}
    exclude_reasons: dict[str, str] = field(default_factory=dict)  # excluded id -> why, for "why not X?" answers
    #   ("disliked": a thumbs down, "rejected": "not that one", "passed": "something else"); filters nothing

    def __post_init__(self):
        if isinstance(self.genres, str):
            self.genres = (self.genres,)
        if isinstance(self.exclude_genres, str):
            self.exclude_genres = (self.exclude_genres,)
        self.genres = tuple(self.genres)
        self.exclude_genres = tuple(self.exclude_genres)
        self.exclude_ids = frozenset(str(i) for i in self.exclude_ids)
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise InputError(f"year range {self.year_min}-{self.year_max} is empty: the first year is after the second")

    def accepts(self, item) -> bool:
        """Whether a catalog `Item` passes these filters (the same rules the store applies)."""
        if item.item_id in self.exclude_ids:
            return False
        if self.genres or self.exclude_genres:
            genres = {g.lower() for g in item.genres}
            if self.genres and genres.isdisjoint(g.lower() for g in self.genres):
                return False
            if not genres.isdisjoint(g.lower() for g in self.exclude_genres):
                return False
        if self.year_min is not None and (item.year is None or item.year < self.year_min):
            return False
        if self.year_max is not None and (item.year is None or item.year > self.year_max):
            return False
        if not self.where:
            return True
        meta = item.metadata()
        return all(meta.get(key) in value if isinstance(value, (list, tuple, set, frozenset)) else meta.get(key) == value
                   for key, value in self.where.items())


@dataclass
class Candidate:
    """One retrieved item."""

    item_id: str
    title: str  # Item.label
    score: float  # retriever score, higher is better
    signals: dict[str, float] = field(default_factory=dict)  # e.g. {"content": .., "content_rank": ..}

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "title": self.title, "score": round(float(self.score), 6),
                "signals": {k: round(float(v), 6) for k, v in self.signals.items()}}


@runtime_checkable
class CollaborativeSignal(Protocol):
    """What the Retriever needs from a collaborative retriever (`seqrec.CollaborativeRetriever` fits):

    - `kind`: store collection kind of its item vectors ("seq" → `seq__<catalog>`; "seq" when absent);
    - `user_vector(history) -> (D,) | None` (None: it knows no item of the history), or else
      `encode_users(histories) -> (B, D)`; score(user, item) = user . item vector;
    - optionally `make_fuse(history) -> Fuse`: its own per-request fusion, used unless the Retriever
      was given a `fuse`.
    """

    def user_vector(self, history: list[str]) -> np.ndarray | None: ...


Ranked = list[tuple[str, float]]  # (item_id, score), best first
Fuse = Callable[[dict[str, Ranked], int], Ranked]  # per-signal lists, k -> fused top-k, best first


def rrf_fuse(ranked: dict[str, Ranked], k: int, c: float = 60.0) -> Ranked:
    """Reciprocal-rank fusion: score(item) = sum over signals of 1 / (c + rank), rank 1 = best."""
    scores: dict[str, float] = {}
    for hits in ranked.values():
        for rank, (item_id, _) in enumerate(hits, start=1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (c + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


@dataclass
class RetrieverConfig:
    """How the user vector is built and candidates are gathered."""

    decay: float = 0.9  # recency: the k-th newest history item (k = 0 newest) weighs decay ** k
    max_history: int = 20  # only the newest items shape the user vector (all are still excluded)
    query_weight: float = 0.5  # share of the query embedding when both history and query are given
    overfetch: int = 3  # with a collaborative signal, each signal fetches overfetch * k before fusion


class Retriever:
    """History and/or query → `Candidate`s from the item store."""

    def __init__(self, catalog, store, embedder, interactions=None, *, collaborative: CollaborativeSignal | None = None,
                 fuse: Fuse | None = None, config: RetrieverConfig | None = None):
        self.catalog = catalog
        self.store = store
        self.embedder = embedder
        self.interactions = interactions
        self.collaborative = collaborative
        self.fuse = fuse  # None: the collaborative signal's own `make_fuse(history)`, else `rrf_fuse`
        self.config = config or RetrieverConfig()

    # ------------------------------------------------------------------ history

    def resolve_history(self, refs) -> tuple[list[str], list[str]]:
        """(item ids, refs that matched nothing); EmptyHistory when no ref resolves."""
        refs = [str(r) for r in refs if str(r).strip()]
        ids, unknown = self.catalog.resolve_many(refs)
        if not ids:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise EmptyHistory(f"none of the history items is in catalog {self.catalog.name}"
                               + (f": {shown}" if shown else " (the history is empty)"))
        return ids, unknown

    def user_history(self, user_id: str) -> list[str]:
        """The user's items in the catalog, oldest first (UnknownUser / EmptyHistory)."""
        if self.interactions is None:
            raise InputError("no interactions loaded: give --interactions PATH or a history instead of a user")
        history = [i for i in self.interactions.history(str(user_id)) if i in self.catalog]
        if not history:
            raise EmptyHistory(f"user {user_id!r} has no items in catalog {self.catalog.name}")
        return history

    def recency_weights(self, n: int) -> np.ndarray:
        """(n,) weights for n items oldest → newest: decay ** age, age 0 for the newest."""
        age = np.arange(n - 1, -1, -1, dtype=np.float64)
        return (self.config.decay ** age).astype(np.float32)

    def history_vector(self, history: list[str]) -> np.ndarray | None:
        """Recency-weighted, L2-normalised mean of the history's text vectors; None if none is usable."""
        recent = [i for i in history if i in self.catalog][-self.config.max_history:]
        if not recent:
            return None
        found = self.store.get_vectors(self.catalog, recent)
        missing = [i for i in recent if i not in found]
        if missing:  # not indexed yet (a changed catalog): embed those few on the fly
            vecs = self.embedder.encode([self.catalog.get(i).text for i in missing], progress=False)
            found.update(zip(missing, vecs))
        matrix = np.stack([found[i] for i in recent])  # (n, D)
        weights = self.recency_weights(len(recent))  # (n,)
        return _unit(weights @ matrix / weights.sum())

    def user_vector(self, history: list[str], query: str | None = None) -> np.ndarray:
        """The content query vector: history vector blended with the query embedding."""
        hist = self.history_vector(history) if history else None
        qvec = None
        if query and query.strip():
            qvec = self.embedder.encode([query.strip()], progress=False)[0]
        if hist is None and qvec is None:
            raise EmptyHistory("nothing to recommend from: no usable history items and no query")
        if hist is None:
            return _unit(qvec)
        if qvec is None:
            return hist
        w = self.config.query_weight
        return _unit((1.0 - w) * hist + w * qvec)

    # ------------------------------------------------------------------ retrieval

    def retrieve(self, *, history: list[str], k: int = 20, filters: Filters | None = None,
                 query: str | None = None) -> list[Candidate]:
        """Top-k candidates, best first; never an item of `history` or `filters.exclude_ids`."""
        if k <= 0:
            return []
        history = [str(i) for i in history]
        exclude = set(history) | set(filters.exclude_ids if filters else ())
        content_vec = self.user_vector(history, query)
        collab_vec = self.collaborative_vector(history) if history else None
        if collab_vec is None:
            hits = self.store.query(self.catalog, content_vec, k, filters, exclude)
            return [self._candidate(item_id, score, {"content": score, "content_rank": rank})
                    for rank, (item_id, score) in enumerate(hits, start=1)]
        return self._fused(history, content_vec, collab_vec, k, filters, exclude)

    def collaborative_vector(self, history: list[str]) -> np.ndarray | None:
        """The collaborative signal's (D,) user vector, or None (no signal, or it knows no history item)."""
        signal = self.collaborative
        if signal is None:
            return None
        if hasattr(signal, "user_vector"):
            vec = signal.user_vector(history)
        else:
            known = getattr(signal, "index", None)
            if known is not None and not any(i in known for i in history):
                return None
            vec = signal.encode_users([history])[0]
        return None if vec is None else np.asarray(vec, dtype=np.float32).reshape(-1)

    def _fused(self, history, content_vec, collab_vec, k, filters, exclude) -> list[Candidate]:
        kind = getattr(self.collaborative, "kind", "seq")
        n = k * max(1, self.config.overfetch)
        content_hits = self.store.query(self.catalog, content_vec, n, filters, exclude)
        collab_hits = self.store.query_vectors(self.catalog, kind, collab_vec, n, filters, exclude)
        ids = list(dict.fromkeys([i for i, _ in content_hits] + [i for i, _ in collab_hits]))
        if not ids:
            return []
        # Every candidate of the union gets both signals' exact scores, so each list handed to the
        # fuse covers the whole union (an item outside the collaborative model gets its lowest score).
        scores = {
            "content": _dots(ids, self.store.get_vectors(self.catalog, ids), content_vec),
            kind: _dots(ids, self.store.get_vectors(self.catalog, ids, kind=kind), collab_vec),
        }
        ranked = {name: sorted(zip(ids, values.tolist()), key=lambda pair: -pair[1]) for name, values in scores.items()}
        tables = {name: {item_id: (rank, score) for rank, (item_id, score) in enumerate(hits, start=1)}
                  for name, hits in ranked.items()}
        fuse = self.fuse
        if fuse is None:
            make = getattr(self.collaborative, "make_fuse", None)
            fuse = make(history) if make is not None else rrf_fuse
        allowed = set(ids)  # a fuse must not bring in items that were filtered or excluded
        out = []
        for item_id, score in fuse(ranked, k):
            if item_id not in allowed:
                continue
            signals: dict[str, float] = {}
            for name, table in tables.items():
                signals[f"{name}_rank"], signals[name] = table[item_id]
            out.append(self._candidate(item_id, score, signals))
        out.sort(key=lambda c: -c.score)
        return out[:k]

    def search(self, text: str, *, k: int = 10, filters: Filters | None = None) -> list[Candidate]:
        """Items nearest to a free-text description (no history)."""
        if not text or not text.strip():
            raise InputError("empty search text")
        return self.retrieve(history=[], k=k, filters=filters, query=text)

    def _candidate(self, item_id: str, score: float, signals: dict) -> Candidate:
        return Candidate(item_id=item_id, title=self.catalog.get(item_id).label, score=float(score),
                         signals={k: float(v) for k, v in signals.items()})


def _dots(ids: list[str], vectors: dict[str, np.ndarray], query: np.ndarray) -> np.ndarray:
    """(C,) query . vector per id; ids without a vector get the lowest score seen (or 0)."""
    values = np.array([float(vectors[i] @ query) if i in vectors else np.nan for i in ids], dtype=np.float64)
    if np.isnan(values).all():
        return np.zeros(len(ids), dtype=np.float32)
    return np.where(np.isnan(values), np.nanmin(values), values).astype(np.float32)


def _unit(vec) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec
