"""Offline evaluation on the LlamaRec protocol: baselines, the fitted retriever, an LLM ranker on its top 20.

Protocol (see ../shared/DESIGN.md):
- the data split (5-core filter, chronological leave-one-out) is `recllm.split`;
- every system scores ALL items; the user's own history (train, plus the validation item at test) is
  excluded from the ranking, as the product does; ties in score are broken by catalog order;
- NDCG / Recall / MRR at 5, 10, 20 averaged over ALL users (a miss counts 0).

`run_eval` runs baselines and the collaborative retriever in one go and returns a `recllm.report.Report`
(bootstrap intervals over users, paired comparisons with the retriever).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recllm import metrics
from recllm.errors import InputError, RecllmError
from recllm.report import Report
from recllm.report import build as build_report
from recllm.split import CONTENT_TEXTS, MIN_COUNT, EvalData, content_matrix, has_timed_tags, load_inputs, prepare

HISTORY_LEN = 20  # history items shown to the LLM ranker
N_CANDIDATES = 20  # retriever candidates handed to the ranker
SCORE_CHUNK = 1024  # users scored at once (B x N float32 matrix)


# ---------------------------------------------------------------- scoring systems

Scorer = Callable[[list[np.ndarray]], np.ndarray]  # histories (item indices) -> (B, N) scores
# A ranker scores many users at once: [(history ids (newest last, <= 20), candidate ids in retriever order,
# retriever scores)] -> one score sequence per request (higher = better; ties keep retriever order).
Ranker = Callable[[list[tuple[list[str], list[str], list[float]]]], Sequence[Sequence[float]]]
RANK_BATCH = 32  # requests handed to the ranker per call

DEFAULT_SYSTEMS = ("popularity", "transition", "content", "seq", "retriever")
SEEDED = ("seq", "retriever")
CONTENT_PARAMS = {"last": 20, "decay": 0.7}  # content-only baseline: user vector from these history items


def popularity_scorer(data: EvalData) -> Scorer:
    """Most popular in the train split, the same list for everyone."""
    from recllm.signals import popularity

    pop = np.log1p(popularity(data.train, data.n_items)).astype(np.float32)
    return lambda hist: np.broadcast_to(pop, (len(hist), data.n_items)).copy()


def transition_scorer(data: EvalData, *, last: int = 3) -> Scorer:
    """Items that followed the user's last `last` items in training (next-item counts), popularity
    breaking ties."""
    from recllm.signals import TransitionConfig, Transitions, popularity_tiebreak

    trans = Transitions.fit(data.train, data.n_items, TransitionConfig(gaps=1, last=last))
    tie = popularity_tiebreak(data.train, data.n_items)
    return lambda hist: trans.scores(hist) + tie


def content_scorer(item_vectors: np.ndarray, params: dict | None = None) -> Scorer:
    """Cosine between item text vectors and the recency-weighted mean of the history's vectors."""
    from recllm.signals import content_user_vectors

    params = params or CONTENT_PARAMS
    return lambda hist: content_user_vectors(hist, item_vectors, **params) @ item_vectors.T


@dataclass
class Ranking:
    """One system's outcome on one phase: per-user 1-based ranks (inf = miss) and its top lists."""

    ranks: np.ndarray  # (U,)
    top: np.ndarray  # (U, N_CANDIDATES) item indices, best first; -1 where fewer were ranked


def rank_all(scorer: Scorer, data: EvalData, phase: str = "test", *, n_top: int = N_CANDIDATES,
             progress: bool = False, desc: str = "") -> Ranking:
    """Score every user against ALL items with the user's history excluded; ranks of the targets."""
    histories = data.histories(phase)
    targets = data.targets(phase)
    ranks = np.empty(len(histories))
    top = np.full((len(histories), n_top), -1, dtype=np.int64)
    chunks = range(0, len(histories), SCORE_CHUNK)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc or "scoring", unit="chunk", file=sys.stderr, leave=False)
    for lo in chunks:
        hist = histories[lo : lo + SCORE_CHUNK]
        scores = np.array(scorer(hist), dtype=np.float32)  # (B, N), a private copy
        if scores.shape != (len(hist), data.n_items):
            raise ValueError(f"a scorer returned {scores.shape}, expected {(len(hist), data.n_items)}")
        scores[np.isnan(scores)] = -np.inf
        ranks[lo : lo + len(hist)] = metrics.ranks_excluding(scores, hist, targets[lo : lo + len(hist)])
        best = metrics.top_k(scores, n_top)
        finite = np.isfinite(np.take_along_axis(scores, best, axis=1))
        top[lo : lo + len(hist), : best.shape[1]] = np.where(finite, best, -1)
    return Ranking(ranks=ranks, top=top)


def rerank(ranking: Ranking, data: EvalData, ranker: Ranker, phase: str = "test", *, scorer: Scorer | None = None,
           history_len: int = HISTORY_LEN, progress: bool = False) -> np.ndarray:
    """Ranks after `ranker` reorders each user's retrieved candidates (inf where the retriever missed).

    Users whose true item is not among the candidates are misses whatever the ranker does, so they are
    not sent to it. `scorer` (the retriever's) supplies the candidates' retriever scores; without it the
    ranker gets 20, 19, ... (the retriever's order).
    """
    histories = data.histories(phase)
    targets = data.targets(phase)
    ranks = np.full(len(histories), math.inf)
    users = [u for u in range(len(histories)) if int(targets[u]) in set(ranking.top[u].tolist())]
    batches = range(0, len(users), RANK_BATCH)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="ranker", unit="batch", file=sys.stderr)
    for lo in batches:
        chunk = users[lo : lo + RANK_BATCH]
        cands = [[int(i) for i in ranking.top[u] if i >= 0] for u in chunk]
        if scorer is not None:
            full = scorer([histories[u] for u in chunk])
            cand_scores = [[float(full[b, i]) for i in c] for b, c in enumerate(cands)]
        else:
            cand_scores = [[float(len(c) - n) for n in range(len(c))] for c in cands]
        requests = [
            ([data.item_ids[i] for i in histories[u][-history_len:]], [data.item_ids[i] for i in c], sc)
            for u, c, sc in zip(chunk, cands, cand_scores)
        ]
        answers = list(ranker(requests))
        if len(answers) != len(requests):
            raise ValueError(f"the ranker answered {len(answers)} of {len(requests)} requests")
        for u, c, scores in zip(chunk, cands, answers):
            scores = np.asarray(list(scores), dtype=np.float64)
            if scores.shape != (len(c),):
                raise ValueError(f"the ranker returned {scores.shape[0]} scores for {len(c)} candidates")
            order = [c[i] for i in np.argsort(-scores, kind="stable")]
            ranks[u] = metrics.rank_in_list(order, int(targets[u]))
    return ranks


def llm_ranker(ranker, catalog) -> Ranker:
    """Adapt a `recllm.rank.LLMRanker` to the `Ranker` form: titles from `catalog`, its fused score."""
    from recllm.retrieve import Candidate

    from recllm.rank import Line

    if ranker.catalog is None:
        ranker.catalog = catalog  # candidates' genres, when the adapter shows them

    def rank(requests):
        batch = []
        for history, cands, scores in requests:
            lines = [Line.of(catalog.get(i)) for i in history]
            batch.append((lines, [Candidate(i, catalog.get(i).label, float(s)) for i, s in zip(cands, scores)]))
        out = []
        for (_, cands, _), ranked in zip(requests, ranker.rank_many(batch)):
            fused = {r.candidate.item_id: r.fused_score for r in ranked}
            out.append([fused.get(i, -math.inf) for i in cands])
        return out

    return rank


# ---------------------------------------------------------------- one-command evaluation


def run_eval(
    catalog=None,
    interactions=None,
    *,
    systems: Iterable[str] = DEFAULT_SYSTEMS,
    ranker: Ranker | None = None,
    ranker_name: str = "llm",
    retriever=None,
    seeds: Sequence[int] = (0,),
    out_dir: str | Path | None = None,
    content_vectors=None,
    embedder=None,
    config=None,
    phase: str = "test",
    progress: bool = True,
    command: str | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Evaluate baselines and the collaborative retriever (and `ranker` on its top 20) in one run.

    catalog / interactions: paths or loaded objects (None = bundled MovieLens).
    systems: any of popularity, transition, content, seq (the sequential encoder alone), retriever
      (the fused collaborative retriever).
    ranker: a `Ranker` (see above; `llm_ranker(LLMRanker, catalog)` adapts the LLM ranker) run on the
      retriever's top 20; adds the system `retriever+<ranker_name>`. A dict {name: Ranker} adds one system
      per entry (e.g. the untuned model and the tuned adapter side by side in one report).
    retriever: a fitted retriever folder (or loaded `seqrec.CollaborativeRetriever`), or a list of them
      (one per seed), to evaluate; each must have been fitted on this data's train split. None fits one
      per seed (`seeds`), saved under `out_dir/retriever-seed<N>` when `out_dir` is given.
    content_vectors / embedder: text vectors for the content signal (see `content_matrix`).
    config: a `seqrec.SeqConfig` for fitting.
    out_dir: also write report.json, report.md, report.png and ranks.npz there (`recllm.report`).
    command: the command line recorded in the report (default: this process's); notes: lines added to it.
    """
    t0 = time.monotonic()
    systems = list(dict.fromkeys(systems))
    unknown = sorted(set(systems) - set(DEFAULT_SYSTEMS))
    if unknown:
        raise InputError(f"unknown system {', '.join(unknown)} (choose from {', '.join(DEFAULT_SYSTEMS)})")
    if phase not in ("valid", "test"):
        raise InputError("phase must be valid or test")
    catalog, interactions = load_inputs(catalog, interactions)
    data = prepare(catalog, interactions)
    timings = {"load_and_split": round(time.monotonic() - t0, 1)}
    notes = list(notes)
    need_fit = any(s in SEEDED for s in systems) or ranker is not None
    fitted = _load_retrievers(retriever, data, catalog, notes) if need_fit and retriever is not None else []
    if fitted:
        seeds = [int(one.meta.get("seed", 0)) for one in fitted]
    content = None
    if "content" in systems or (need_fit and not fitted):
        if content_vectors is None and fitted and fitted[0].content is not None:
            content = fitted[0].content
        else:
            t = time.monotonic()
            try:
                content = content_matrix(data, catalog, interactions, vectors=content_vectors, embedder=embedder,
                                         progress=progress)
            except (RecllmError, ImportError) as exc:  # no embedding model: run without the content signal, say so
                notes.append(f"content signal skipped: {exc}")
            timings["embed_items"] = round(time.monotonic() - t, 1)
    if need_fit and not fitted:
        from recllm import seqrec

        t = time.monotonic()
        for seed in seeds:
            one = seqrec.fit_on_split(data, seed=seed, config=config, content=content, progress=progress,
                                      content_texts=CONTENT_TEXTS if content_vectors is None else None)
            if out_dir is not None:
                one.meta["path"] = str(one.save(Path(out_dir) / f"retriever-seed{seed}"))
            fitted.append(one)
        timings["fit_retrievers"] = round(time.monotonic() - t, 1)

    ranks: dict[str, list[np.ndarray]] = {}  # system -> per seed, each user's target rank
    top: dict[str, list[Ranking]] = {}
    t = time.monotonic()
    scorers_of = {  # system -> its scorer, or one per fitted retriever (seed)
        "popularity": lambda: popularity_scorer(data),
        "transition": lambda: transition_scorer(data),
        "content": lambda: content_scorer(content) if content is not None else None,
        "seq": lambda: [one.encoder.scores_idx for one in fitted],
        "retriever": lambda: [one.scores_idx for one in fitted],
    }
    for name in [s for s in systems if s != "retriever"] + (["retriever"] if fitted else []):
        scorers = scorers_of[name]()
        if scorers:
            top[name] = [rank_all(sc, data, phase, progress=progress, desc=name)
                         for sc in (scorers if isinstance(scorers, list) else [scorers])]
            ranks[name] = [r.ranks for r in top[name]]
    retrieved = {name: [r.ranks <= N_CANDIDATES for r in rk] for name, rk in top.items()}
    timings["score"] = round(time.monotonic() - t, 1)
    rankers = ranker if isinstance(ranker, dict) else ({ranker_name: ranker} if ranker is not None else {})
    for name, one_ranker in rankers.items():
        t = time.monotonic()
        ranks[f"retriever+{name}"] = [rerank(r, data, one_ranker, phase, scorer=f.scores_idx, progress=progress)
                                      for r, f in zip(top["retriever"], fitted)]
        retrieved[f"retriever+{name}"] = retrieved["retriever"]
        timings[f"rank {name}" if len(rankers) > 1 else "rank"] = round(time.monotonic() - t, 1)
    if "retriever" not in systems:  # fitted only to feed the rankers: not a system of this report
        ranks.pop("retriever", None)
    timings["total"] = round(time.monotonic() - t0, 1)
    report = build_report(
        ranks, retrieved, seeds=list(seeds), user_ids=data.user_ids, command=command,
        data={"name": data.name, **data.stats},
        protocol=dict(PROTOCOL, phase=phase, k_core=MIN_COUNT, history_len_ranker=HISTORY_LEN,
                      candidates=N_CANDIDATES, ks=list(metrics.KS)),
        retrievers=[_fitted_summary(f) for f in fitted], timings=timings, notes=notes,
    )
    if out_dir is not None:
        report.save(out_dir)
    return report


PROTOCOL = {
    "split": "chronological leave-one-out: last = test, second to last = validation, rest = train",
    "ties": "timestamp ties broken by file row order; score ties by catalog order",
    "ranking": "all items; the user's own history (train + validation item at test) excluded",
    "users": "all users; a miss counts 0",
    "repeats": "a repeated (user, item) keeps its first occurrence",
    "history_len_retriever": "the sequential encoder reads the newest max_len items (see retrievers), "
    "the transition signal its newest `last`, content the newest 20; the whole history is excluded",
    "item_text": "MovieLens tags counted from train-side tag events only (recllm.split.train_side_tags)",
}


def _load_retrievers(retriever, data: EvalData, catalog, notes: list[str]) -> list:
    """Fitted retrievers (folders or loaded) checked against this split; a note for content vectors
    embedded before item tags were counted train-side only."""
    from recllm import seqrec

    fitted = []
    for one in retriever if isinstance(retriever, (list, tuple)) else [retriever]:
        if not isinstance(one, seqrec.CollaborativeRetriever):
            path = one
            one = seqrec.CollaborativeRetriever.load(path)
            one.meta["path"] = str(path)
        seqrec.check_fitted_on(one, data)
        if one.content is not None and one.meta.get("content_texts") != CONTENT_TEXTS and has_timed_tags(catalog):
            notes.append(f"{one.meta.get('path') or 'a fitted retriever'}: its content vectors were embedded from item "
                         "texts with tags counted over ALL tag events (an older fit), held-out ones included; its "
                         "figures may carry that small leak")
        fitted.append(one)
    return fitted


def _fitted_summary(fitted) -> dict:
    info = fitted.encoder.info
    return {
        "seed": fitted.meta.get("seed"),
        "weights": fitted.weights,
        "epochs": info.get("epochs"),
        "best_epoch": info.get("best_epoch"),
        "valid_ndcg@10_seq": fitted.meta.get("valid_ndcg10_seq"),
        "valid_ndcg@10_fused": fitted.meta.get("valid_ndcg10_fused"),
        "train_seconds": info.get("train_seconds"),
        "fit_seconds": fitted.meta.get("fit_seconds"),
        "fit_cpu_seconds": fitted.meta.get("fit_cpu_seconds"),
        "train_cpu_seconds": info.get("train_cpu_seconds"),
        "transition_config": fitted.meta.get("transition_config"),
        "seq_config": dict(vars(fitted.encoder.config)),
        "path": fitted.meta.get("path"),
    }
