"""The fused collaborative retriever: the sequential encoder (`recllm.sasrec`) with the count signals of
`recllm.signals` (transitions, popularity) and the items' text vectors, fused with weights chosen on
validation.

`fit_on_split` fits every signal on a split's train part (`recllm.split.EvalData`) and tunes on its
validation part; `fit_retriever` fits and saves one folder (`recllm fit-retriever`);
`CollaborativeRetriever.load` reads it back. A folder holds `seq.safetensors` + `seq.json` (the encoder),
`transitions.npz`, `content.npy` (optional) and `fusion.json` (weights, popularity, fit metadata); no pickle.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from recllm.errors import ModelError
from recllm.sasrec import REFIT, SeqConfig, SeqEncoder, first_line, train


FUSION_FILE = "fusion.json"
TRANSITIONS_FILE = "transitions.npz"
CONTENT_FILE = "content.npy"
SIGNALS = ("seq", "transition", "content", "popularity")


class CollaborativeRetriever:
    """A fitted retriever folder: sequential encoder + transition counts + popularity (+ content
    vectors), fused with the weights chosen on validation.

    Implements `recllm.retrieve.CollaborativeSignal` (`kind`, `user_vector`) for the Chroma path:
    `item_vectors()` go into the `seq` collection and `user_vector(history)` queries it; the dot
    product equals the `seq` signal exactly, and every item vector has the same norm, so a cosine
    collection ranks exactly as an inner-product one. `signal_scores` + `signals.fuse` give the fused
    score for any set of candidate items.
    """

    kind = "seq"

    def __init__(self, encoder: SeqEncoder, transitions, popularity: np.ndarray, weights: dict[str, float],
                 content: np.ndarray | None = None, meta: dict | None = None):
        self.encoder = encoder
        self.transitions = transitions
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.weights = dict(weights)
        self.content = content
        self.meta = dict(meta or {})
        self.item_ids = encoder.item_ids
        self.index = encoder.index
        _, vecs = encoder.item_vectors()
        norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
        self._max_norm = float(norms.max()) if len(norms) else 1.0
        pad = np.sqrt(np.maximum(self._max_norm**2 - norms**2, 0.0))
        self._item_vecs = np.concatenate([vecs, pad[:, None].astype(np.float32)], axis=1)

    # --- Chroma path
    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """(item ids, (N, d+2) float32), all of norm `max_norm`; dot with `user_vector` = seq score."""
        return list(self.item_ids), self._item_vecs.copy()

    def user_vector(self, history: list[str]) -> np.ndarray | None:
        """(d+2,) query vector for a history of item ids; None when no item of it is known."""
        if not any(i in self.index for i in history):
            return None
        return self.user_vectors([history])[0]

    def user_vectors(self, histories: list[list[str]]) -> np.ndarray:
        u = self.encoder.encode_users(histories)
        return np.concatenate([u, np.zeros((len(u), 1), dtype=np.float32)], axis=1)

    # --- numpy path
    def _idx(self, histories: list[list[str]]) -> list[np.ndarray]:
        return [np.array([self.index[i] for i in h if i in self.index], dtype=np.int64) for h in histories]

    def signal_scores_idx(self, histories: list[np.ndarray], signals=SIGNALS) -> dict[str, np.ndarray]:
        """(B, N) float32 per signal over `item_ids`, histories given as item indices."""
        from recllm.signals import content_user_vectors

        out: dict[str, np.ndarray] = {}
        if "seq" in signals:
            out["seq"] = self.encoder.scores_idx(histories)
        if "transition" in signals:
            out["transition"] = np.log1p(self.transitions.scores(histories))
        if "popularity" in signals:
            out["popularity"] = np.broadcast_to(np.log1p(self.popularity).astype(np.float32),
                                                (len(histories), len(self.item_ids))).copy()
        if "content" in signals and self.content is not None:
            u = content_user_vectors(histories, self.content, **self.meta.get("content_params", {}))
            out["content"] = u @ self.content.T
        return out

    def signal_scores(self, histories: list[list[str]], signals=SIGNALS) -> dict[str, np.ndarray]:
        """(B, N) per signal over `item_ids` for histories of item ids (unknown ids are skipped)."""
        return self.signal_scores_idx(self._idx(histories), signals)

    def scores_idx(self, histories: list[np.ndarray]) -> np.ndarray:
        from recllm.signals import fuse

        used = [n for n, w in self.weights.items() if w]
        return fuse(self.signal_scores_idx(histories, used), self.weights)

    def scores(self, histories: list[list[str]]) -> np.ndarray:
        """(B, N) fused scores over `item_ids`."""
        return self.scores_idx(self._idx(histories))

    def candidate_signals(self, history: list[str], item_ids: list[str],
                          content: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(M,) per signal for any candidate ids (e.g. the union of Chroma hits), ready for `signals.fuse`.

        Items this retriever was not fitted on (cold items) get the user's lowest seq score and zero
        transition/popularity, so only their content score can lift them. `content`: the caller's
        cosine similarities for `item_ids` (e.g. from the text collection); when None the saved text
        vectors are used and cold items get the user's lowest content score.
        """
        full = self.signal_scores([history], signals=tuple(n for n, w in self.weights.items() if w))
        pos = np.array([self.index.get(i, -1) for i in item_ids], dtype=np.int64)
        known = pos >= 0
        out: dict[str, np.ndarray] = {}
        for name, s in full.items():
            row = s[0]
            if name == "content" and content is not None:
                continue
            floor = float(row.min()) if name in ("seq", "content") else 0.0
            col = np.full(len(item_ids), floor, dtype=np.float32)
            col[known] = row[pos[known]]
            out[name] = col
        if content is not None and self.weights.get("content"):
            out["content"] = np.asarray(content, dtype=np.float32)
        return out

    def make_fuse(self, history: list[str]):
        """A `recllm.retrieve.Fuse` (ranked lists per signal, k) -> [(item id, score)] that re-scores the
        union of the lists with this retriever's signals and weights (score fusion, not rank fusion).
        Content similarities come from the list named "content"; items missing from it get its lowest."""
        from recllm.signals import fuse

        def fuse_ranked(ranked: dict[str, list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
            ids = list(dict.fromkeys(i for hits in ranked.values() for i, _ in hits))
            if not ids:
                return []
            content = None
            if ranked.get("content"):
                table = dict(ranked["content"])
                low = min(table.values())
                content = np.array([table.get(i, low) for i in ids], dtype=np.float32)
            scores = fuse(self.candidate_signals(history, ids, content), self.weights)
            order = np.argsort(-scores, kind="stable")[:k]
            return [(ids[i], float(scores[i])) for i in order]

        return fuse_ranked

    def rank(self, history: list[str], k: int = 20, exclude=()) -> list[tuple[str, float]]:
        """Top-k (item id, fused score), best first, never an item of `history` or `exclude`."""
        s = self.scores([history])[0]
        drop = [self.index[i] for i in set(history) | set(exclude) if i in self.index]
        s[drop] = -np.inf
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.item_ids[i], float(s[i])) for i in order if np.isfinite(s[i])]

    def save(self, directory: str | Path) -> Path:
        """Write the folder atomically (`paths.replace_dir`): a killed save never leaves a partial one."""
        from recllm.paths import replace_dir

        def build(tmp: Path) -> None:
            self.encoder.save(tmp)
            self.transitions.save(tmp / TRANSITIONS_FILE)
            if self.content is not None:
                np.save(tmp / CONTENT_FILE, self.content.astype(np.float32), allow_pickle=False)
            meta = dict(self.meta, weights=self.weights, popularity=self.popularity.tolist(), format=1)
            (tmp / FUSION_FILE).write_text(json.dumps(meta, indent=1))

        return replace_dir(Path(directory), build)

    @classmethod
    def load(cls, directory: str | Path) -> "CollaborativeRetriever":
        from recllm.signals import Transitions

        directory = Path(directory)
        if not (directory / FUSION_FILE).is_file():
            raise ModelError(f"{directory}: no fitted retriever here (run `recllm fit-retriever`)")
        encoder = SeqEncoder.load(directory)
        try:
            meta = json.loads((directory / FUSION_FILE).read_text())
            transitions = Transitions.load(directory / TRANSITIONS_FILE)
            content = None
            if (directory / CONTENT_FILE).is_file():
                content = np.load(directory / CONTENT_FILE, allow_pickle=False)
            weights = meta.pop("weights")
            popularity = np.asarray(meta.pop("popularity"), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - missing, truncated or damaged files (BadZipFile too)
            raise ModelError(f"{directory}: cannot load the fitted retriever ({first_line(exc)}): {REFIT}") from None
        return cls(encoder, transitions, popularity, weights, content, meta)


def data_fingerprint(data) -> str:
    """Hash of an EvalData's items, users and train/validation split (never the test items)."""
    import hashlib

    h = hashlib.sha256()
    h.update("\n".join(data.item_ids).encode())
    h.update("\n".join(data.user_ids).encode())
    for seq in data.train:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    h.update(np.asarray(data.valid, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


TRANSITION_GRID = {
    "gaps": (1, 2, 3, 5, 8),
    "gap_decay": (0.5, 0.7, 0.85, 1.0),
    "last": (3, 5, 10, 20),
    "last_decay": (0.5, 0.7, 0.85, 1.0),
    "normalize": (0.0, 0.5, 0.75, 1.0),
    "backward": (0.0, 0.3, 0.6, 1.0),
}
TUNE_USERS = 2000  # validation users used to choose transition settings and fusion weights


def tune_transitions(data, users: np.ndarray, *, start=None, rounds: int = 2):
    """Coordinate search over `TRANSITION_GRID` for the transition settings with the best validation
    NDCG@10 on `users` (indices). Returns (TransitionConfig, value)."""
    from recllm import metrics
    from recllm.signals import TransitionConfig, Transitions, coordinate_search, popularity_tiebreak

    hist = [data.train[u] for u in users]
    targets = data.valid[users]
    tie = popularity_tiebreak(data.train, data.n_items)
    fits: dict[tuple, Transitions] = {}

    def value(cfg: dict) -> float:
        key = (cfg["gaps"], cfg["gap_decay"], cfg["backward"])
        if key not in fits:
            fits.clear()
            fits[key] = Transitions.fit(data.train, data.n_items, TransitionConfig(**cfg))
        trans = fits[key]
        trans.config = TransitionConfig(**cfg)
        return metrics.ndcg_at_k(metrics.ranks_excluding(np.log1p(trans.scores(hist)) + tie, hist, targets), 10)

    cfg = asdict(start or TransitionConfig(gaps=5, gap_decay=0.85, last=20, last_decay=0.7, normalize=0.75,
                                           backward=0.6))
    cfg, best = coordinate_search(cfg, TRANSITION_GRID, value, rounds=rounds, min_gain=1e-6)
    return TransitionConfig(**cfg), best


def fit_on_split(data, *, seed: int = 0, config: SeqConfig | None = None, content: np.ndarray | None = None,
                 transition_config=None, progress: bool = True,
                 content_texts: str | None = None) -> CollaborativeRetriever:
    """Fit every signal on `data.train` (a `split.EvalData`); choose transition settings and fusion
    weights on the validation split (at most `TUNE_USERS` users, a fixed random sample). `content_texts`
    says where the content vectors come from (`split.CONTENT_TEXTS`: `split.item_texts`), kept in the meta."""
    from recllm import metrics
    from recllm.signals import Transitions, choose_weights, popularity

    start, start_cpu = time.monotonic(), time.process_time()
    rng = np.random.default_rng(seed)
    users = np.arange(data.n_users)
    if len(users) > TUNE_USERS:
        users = np.sort(rng.choice(users, TUNE_USERS, replace=False))
    tuned = None
    if transition_config is None:
        transition_config, tuned = tune_transitions(data, users)
    transitions = Transitions.fit(data.train, data.n_items, transition_config)
    encoder = train(data.train, data.item_ids, valid_targets=data.valid, config=config, seed=seed, progress=progress)
    pop = popularity(data.train, data.n_items)
    fitted = CollaborativeRetriever(encoder, transitions, pop, {"seq": 1.0}, content,
                                    {"content_params": {"last": 20, "decay": 0.7}})
    hist = [data.train[u] for u in users]
    signal = fitted.signal_scores_idx(hist)
    for b, h in enumerate(hist):
        signal["seq"][b, h] = -np.inf  # seq always has weight 1: this excludes the history from the fusion

    def valid_ndcg(fused: np.ndarray) -> float:
        return metrics.ndcg_at_k(metrics.rank_of_targets(fused, data.valid[users]), 10)

    weights, best = choose_weights(signal, valid_ndcg, base="seq")
    fitted.weights = weights
    fitted.meta.update(
        data=data.name,
        data_fingerprint=data_fingerprint(data),
        data_stats=data.stats,
        seed=seed,
        tune_users=int(len(users)),
        valid_ndcg10_seq=encoder.info.get("best_valid_ndcg@10"),
        valid_ndcg10_transition=tuned,
        valid_ndcg10_fused=best,
        transition_config=asdict(transition_config),
        fit_seconds=round(time.monotonic() - start, 1),
        fit_cpu_seconds=round(time.process_time() - start_cpu, 1),
        **({"content_texts": content_texts} if content is not None and content_texts else {}),
    )
    return fitted


def check_fitted_on(fitted: CollaborativeRetriever, data) -> None:
    """ModelError unless `fitted` was fitted on exactly this data's train/validation split."""
    want = data_fingerprint(data)
    have = fitted.meta.get("data_fingerprint")
    if have != want:
        raise ModelError(
            f"the fitted retriever was fitted on other data ({fitted.meta.get('data')}, split {have}); "
            f"this data's split is {want}: run `recllm fit-retriever` on it first"
        )


def fit_retriever(catalog=None, interactions=None, out_dir=None, *, seed: int = 0, config: SeqConfig | None = None,
                  content_vectors=None, embedder=None, progress: bool = True, min_count: int | None = None) -> Path:
    """Fit the fused collaborative retriever on the train split of (catalog, interactions) and save it.

    catalog / interactions: paths or loaded objects (None = bundled MovieLens). out_dir: default
    `paths.retrievers_dir() / catalog.name`. content_vectors / embedder: see `split.content_matrix`;
    when no embedding model is available the retriever is fitted without the content signal.
    min_count: the k-core of the split (default `split.MIN_COUNT`; 1 or 2 for short sequences such as conversations).
    Returns the folder (load it with `CollaborativeRetriever.load`).
    """
    from recllm import paths, split
    from recllm.errors import RecllmError

    catalog, interactions = split.load_inputs(catalog, interactions)
    data = split.prepare(catalog, interactions, k=split.MIN_COUNT if min_count is None else min_count)
    try:
        content = split.content_matrix(data, catalog, interactions, vectors=content_vectors, embedder=embedder,
                                       progress=progress)
    except (RecllmError, ImportError) as exc:
        print(f"recllm: fitting without the content signal: {exc}", file=sys.stderr)
        content = None
    fitted = fit_on_split(data, seed=seed, config=config, content=content, progress=progress,
                          content_texts=split.CONTENT_TEXTS if content_vectors is None else None)
    out = Path(out_dir) if out_dir is not None else paths.retrievers_dir() / catalog.name
    fitted.meta["catalog"] = catalog.name
    fitted.save(out)
    return out
