"""Ranking the whole catalog from a conversation so far, with the knowledge sources of `recllm.knowledge`.

`read(context)` turns the dialogue so far into a `Reading`: the movies mentioned (who brought each up, whether
the seeker said they did not like it: "I didn't like X" never becomes a liked item), the genre / era
constraints and the seeker's latest words; titles are read by the chat's own parser (`chat.parse`), movies the
recommender brought up count as shown. `ConversationRanker.signals(readings)` scores every catalog item per
signal, each standardised per request:

| signal | source | knowledge option |
|---|---|---|
| `popularity` | dialogues mentioning the movie (training side) | `popularity` |
| `comention` | movies mentioned in the same training conversations as the history (`CoOccurrence`) | `conversations` |
| `linked` | movies co-rated with the history in the linked catalog's interactions | `linked` |
| `linked_pop` | the linked catalog's rating counts | `linked` |
| `content` | text vectors: the history's items and the seeker's words vs each item's text (genres, tags when linked) | always |
| `constraint` | +1 inside the conversation's genres / era, -1 outside (needs linked genres / years) | always |
| `retriever` | the retriever `recllm fit-retriever` fits on conversations as interactions | `retriever` |

`score = sum(weight * signal)`; weights are chosen on tuning dialogues (`tune_weights`), never on what is reported.
With no usable title and no ask, the popularity prior inside the constraints still answers (never an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recllm.catalog import Catalog
from recllm.knowledge import CoOccurrence

SIGNALS = ("popularity", "comention", "linked", "linked_pop", "content", "query", "constraint", "retriever")
DEFAULT_WEIGHTS = {"popularity": 1.0, "comention": 1.0, "linked": 0.5, "linked_pop": 0.2, "content": 0.3,
                   "query": 0.3, "constraint": 0.2, "retriever": 0.5}
GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@dataclass
class ReaderConfig:
    seeker_weight: float = 1.0  # a movie the seeker named
    shown_weight: float = 0.6  # a movie the recommender brought up (shown)
    disliked_weight: float = 0.1  # a movie the seeker said they did not like
    decay: float = 0.85  # the k-th newest mention weighs decay ** k
    query_turns: int = 2  # the seeker's latest turns read as the ask


@dataclass
class Reading:
    history: list[tuple[str, float]]  # (item id, weight), oldest first
    mentioned: list[str]  # every movie brought up so far (excluded from the ranking)
    disliked: list[str] = field(default_factory=list)
    genres: tuple[str, ...] = ()  # wanted (any of)
    exclude_genres: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None
    query: str = ""  # the seeker's latest words


class Reader:
    """Reads a conversation (a list of `conversations.Turn`) with the chat's message parser."""

    def __init__(self, catalog: Catalog, config: ReaderConfig | None = None, popularity: dict | None = None):
        from recllm.chat.parse import MessageParser
        from recllm.titles import TitleSpotter

        self.catalog = catalog
        self.config = config or ReaderConfig()
        self.parser = MessageParser(catalog, TitleSpotter(catalog, popularity))
        self._cache: dict[str, object] = {}

    def _parse(self, text: str, shown: list[str]):
        key = text + "\0" + ",".join(shown[-10:])
        if key not in self._cache:
            self._cache[key] = self.parser.parse(text, shown=shown[-10:])
        return self._cache[key]

    def read(self, context, known: list[str] | None = None) -> Reading:
        """`known`: movie ids already known to be mentioned (e.g. ReDial's @ids), added to what the parser finds."""
        c = self.config
        order: list[str] = []
        source: dict[str, str] = {}
        disliked: list[str] = []
        genres: list[str] = []
        exclude: list[str] = []
        year_min = year_max = None
        seeker_texts: list[str] = []
        for turn in context:
            found = list(turn.mentions)
            if turn.role == "user":
                seeker_texts.append(turn.text)
                parsed = self._parse(turn.text, [i for i in order if source.get(i) == "assistant"])
                found += parsed.liked + parsed.anchors + parsed.disliked + [r.item_id for r in parsed.reject if r.item_id]
                for item_id in parsed.disliked + [r.item_id for r in parsed.reject if r.item_id]:
                    if item_id not in disliked:
                        disliked.append(item_id)
                for item_id in parsed.liked + parsed.anchors:  # a later "I loved it" takes a dislike back
                    if item_id in disliked:
                        disliked.remove(item_id)
                genres += [g for g in (parsed.only_genres or ()) + (parsed.want_genres or ()) if g not in genres]
                exclude += [g for g in parsed.exclude_genres if g not in exclude]
                if parsed.years_set:
                    year_min, year_max = parsed.year_min, parsed.year_max
            for item_id in found:
                if item_id in self.catalog and item_id not in source:
                    source[item_id] = turn.role
                    order.append(item_id)
        for item_id in known or ():
            if item_id not in source and item_id in self.catalog:
                source[item_id] = "user"
                order.append(item_id)
        n = len(order)
        history = []
        for k, item_id in enumerate(order):
            w = c.seeker_weight if source[item_id] == "user" else c.shown_weight
            if item_id in disliked:
                w = c.disliked_weight
            history.append((item_id, w * c.decay ** (n - 1 - k)))
        query = " ".join(seeker_texts[-c.query_turns:]) if c.query_turns else ""
        return Reading(history, order, disliked, tuple(genres), tuple(exclude), year_min, year_max, query[-1000:])


class ConversationRanker:
    """Scores every catalog item for a `Reading` with the knowledge it was given (each part optional)."""

    def __init__(self, catalog: Catalog, *, popularity: dict | None = None, comentions: CoOccurrence | None = None,
                 linked: CoOccurrence | None = None, linked_popularity: dict | None = None,
                 item_vectors: np.ndarray | None = None, embedder=None, weights: dict | None = None,
                 retriever=None):
        self.catalog = catalog
        self.ids = list(catalog.items)
        self.pos = {item_id: n for n, item_id in enumerate(self.ids)}
        n = len(self.ids)
        self.popularity = _array(popularity, self.pos, n)
        self.linked_popularity = _array(linked_popularity, self.pos, n)
        self.comentions = comentions
        self.linked = linked
        self.item_vectors = item_vectors
        self.embedder = embedder
        self.retriever = retriever  # a `seqrec.CollaborativeRetriever` (its fused score)
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.years = np.array([i.year or 0 for i in catalog], dtype=np.float32)
        self.genres = [frozenset(g.lower() for g in i.genres) for i in catalog]

    def available(self) -> list[str]:
        """The signals this ranker has knowledge for."""
        have = {"popularity": self.popularity is not None, "comention": self.comentions is not None,
                "linked": self.linked is not None, "linked_pop": self.linked_popularity is not None,
                "content": self.item_vectors is not None, "query": self.item_vectors is not None
                and self.embedder is not None, "constraint": True, "retriever": self.retriever is not None}
        return [s for s in SIGNALS if have[s]]

    def signals(self, readings: list[Reading]) -> dict[str, np.ndarray]:
        """(R, N) per available signal, each standardised per row (zero mean, unit spread; a flat row: zeros)."""
        n, r = len(self.ids), len(readings)
        out: dict[str, np.ndarray] = {}
        names = self.available()
        if "popularity" in names:
            out["popularity"] = np.broadcast_to(np.log1p(self.popularity), (r, n))
        if "linked_pop" in names:
            out["linked_pop"] = np.broadcast_to(np.log1p(self.linked_popularity), (r, n))
        for name, co in (("comention", self.comentions), ("linked", self.linked)):
            if name in names:
                out[name] = np.stack([np.log1p(co.to_catalog(co.scores(x.history), self.pos, n)) for x in readings])
        if "content" in names:
            out["content"] = np.stack([self._content(x) for x in readings])
        if "query" in names:
            texts = [x.query for x in readings]
            todo = [t for t in dict.fromkeys(texts) if t.strip()]
            vecs = dict(zip(todo, self.embedder.encode(todo, progress=False))) if todo else {}
            out["query"] = np.stack([self.item_vectors @ vecs[t] if t in vecs else np.zeros(n, np.float32)
                                     for t in texts])
        out["constraint"] = np.stack([self._constraint(x) for x in readings])
        if "retriever" in names:
            out["retriever"] = self._retrieved(readings)
        return {k: _standardise(np.asarray(v, dtype=np.float32)) for k, v in out.items()}

    def _content(self, reading: Reading) -> np.ndarray:
        rows = [(self.pos[i], w) for i, w in reading.history if i in self.pos and w > 0]
        if not rows:
            return np.zeros(len(self.ids), np.float32)
        idx = np.array([p for p, _ in rows])
        w = np.array([w for _, w in rows], dtype=np.float32)
        u = w @ self.item_vectors[idx]
        norm = float(np.linalg.norm(u))
        return self.item_vectors @ (u / norm) if norm else np.zeros(len(self.ids), np.float32)

    def _retrieved(self, readings: list[Reading]) -> np.ndarray:
        """(R, N) the fitted retriever's fused scores for the mentions so far (dislikes left out), oldest first;
        items it was not fitted on get the row's lowest score; a reading with no item it knows: a flat row."""
        r = self.retriever
        out = np.zeros((len(readings), len(self.ids)), np.float32)
        hist = [[i for i, _ in x.history if i in r.index and i not in x.disliked] for x in readings]
        rows = [n for n, h in enumerate(hist) if h]
        if not rows:
            return out
        scores = np.asarray(r.scores([hist[n] for n in rows]), dtype=np.float32)  # (B, items it knows)
        at = np.array([self.pos.get(i, -1) for i in r.item_ids], dtype=np.int64)
        known = at >= 0
        for b, n in enumerate(rows):
            out[n] = scores[b].min()
            out[n, at[known]] = scores[b, known]
        return out

    def _constraint(self, reading: Reading) -> np.ndarray:
        out = np.zeros(len(self.ids), np.float32)
        want = {g.lower() for g in reading.genres}
        drop = {g.lower() for g in reading.exclude_genres}
        if want or drop:
            out += np.array([(1.0 if want and g & want else 0.0) - (1.0 if g & drop else 0.0) for g in self.genres],
                            dtype=np.float32)
        if reading.year_min is not None or reading.year_max is not None:
            lo = reading.year_min if reading.year_min is not None else -1e9
            hi = reading.year_max if reading.year_max is not None else 1e9
            out += np.where((self.years >= lo) & (self.years <= hi), 1.0, -1.0).astype(np.float32)
        return out

    def scores(self, signals: dict[str, np.ndarray], weights: dict | None = None) -> np.ndarray:
        weights = self.weights if weights is None else weights
        total = None
        for name, w in weights.items():
            if w and name in signals:
                total = w * signals[name] if total is None else total + w * signals[name]
        if total is None:
            total = np.zeros_like(next(iter(signals.values())))
        # popularity breaks ties (an empty chat still gets the most popular items, in its constraints)
        for name in ("popularity", "constraint"):
            if name in signals:
                total = total + 1e-4 * signals[name]
        return total

    def rank(self, readings: list[Reading], k: int = 50, weights: dict | None = None) -> list[list[str]]:
        """The top `k` item ids per reading, already-mentioned movies left out."""
        scores = self.scores(self.signals(readings), weights)
        out = []
        for row, reading in zip(scores, readings):
            row = row.copy()
            row[[self.pos[i] for i in reading.mentioned if i in self.pos]] = -np.inf
            top = np.argsort(-row, kind="stable")[:k]
            out.append([self.ids[i] for i in top if np.isfinite(row[i])])
        return out


def _array(counts: dict | None, pos: dict[str, int], n: int) -> np.ndarray | None:
    if counts is None:
        return None
    out = np.zeros(n, dtype=np.float32)
    for item_id, value in counts.items():
        if item_id in pos:
            out[pos[item_id]] = value
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32)
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return np.where(std > 1e-9, (x - mean) / np.where(std > 1e-9, std, 1.0), 0.0).astype(np.float32)


def target_ranks(scores: np.ndarray, positions: list[list[int]], excluded: list[list[int]]) -> list[np.ndarray]:
    """Per row, the 1-based ranks of its target positions among all items but its excluded ones (ties: the
    target after every item with an equal score, so a flat score never gets credit)."""
    out = []
    for row, targets, skip in zip(scores, positions, excluded):
        row = row.copy()
        row[skip] = -np.inf
        out.append(np.array([float((row >= row[t]).sum()) if np.isfinite(row[t]) else np.inf for t in targets]))
    return out


def tune_weights(ranker: ConversationRanker, signals: dict[str, np.ndarray], positions, excluded, *,
                 grid=GRID, rounds: int = 2, objective=(10, 50)) -> tuple[dict, float]:
    """Coordinate search (`signals.coordinate_search`) of the signal weights maximising mean Recall@k (k in
    `objective`) on tuning points (whose knowledge must not come from their own dialogues: see
    `conversation_eval.fold_signals`). Starts from popularity alone; all weights 0 is never a choice."""
    from recllm.signals import coordinate_search

    names = [s for s in signals if s != "constraint"] + (["constraint"] if "constraint" in signals else [])

    def value(weights: dict) -> float:
        if not any(weights.values()):
            return -np.inf
        ranks = np.concatenate(target_ranks(ranker.scores(signals, weights), positions, excluded))
        return float(np.mean([(ranks <= k).mean() for k in objective]))

    start = {s: 0.0 for s in names}
    start["popularity" if "popularity" in start else names[0]] = 1.0
    return coordinate_search(start, {s: grid for s in names}, value, rounds=rounds, min_gain=1e-6)
