"""The LLM reads the conversation: its ranking requests from a conversation so far, the LLM row of
`recllm eval-conversations --llm`, and ranking examples from dialogues for `recllm train`.

A request (`llm_request`) is what `rank.LLMRanker.score` takes: the liked history (the movies mentioned so far
that the seeker did not say they disliked, oldest first), the top candidates of a knowledge ranking (in that
order; `band` = place) and the seeker's latest turns (`Reading.query`, shown by the rank_chat template when the
model knows it).

Eval (`llm_row`): the LLM re-ranks the top `max_candidates` (20) of a system per held-out point (strict run);
`fused = rank.fuse(llm, system scores of those candidates, w)`, items below keep their order. w comes from
`fusion.FUSION_GRID`, chosen on the tune half's out-of-fold points (mean Recall@1 and @10, the cutoffs a top-20
re-ranking moves; ties: the smaller w), never on held-out points. `users` caps the dialogues scored in each half
(a fixed seed), for speed; the row's figures and its comparisons are on those held-out dialogues only.

Training (`dialogue_examples`): one example per (tune point, target in the top 20), candidates from the
"all knowledge" ranking with out-of-fold knowledge, shuffled so the answer's letter is uniform.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from recllm import conversation_eval as ce
from recllm import conversations as cv
from recllm.convrank import Reading, target_ranks
from recllm.errors import InputError
from recllm.rank import Line, fuse

OBJECTIVE = (1, 10)  # the Recall@k cutoffs the fusion weight is chosen on
SAMPLE_SEED = 0  # which dialogues `users` keeps


def llm_request(reading: Reading, catalog, candidates) -> tuple[list[Line], list[Line], str]:
    """(history Lines, candidate Lines, query) for one point: `candidates` are item ids in ranking order."""
    history = [Line.of(catalog.get(i)) for i, _ in reading.history if i not in reading.disliked and i in catalog]
    lines = [Line.of(catalog.get(i), band=n + 1) for n, i in enumerate(candidates)]
    return history, lines, reading.query


def top_ids(probe, row: np.ndarray, point: cv.Point, k: int) -> list[str]:
    """The `k` best catalog items of a score row, the point's mentioned movies left out (stable order)."""
    row = row.copy()
    row[[probe.pos[i] for i in point.mentioned if i in probe.pos]] = -np.inf
    top = np.argsort(-row, kind="stable")[:k]
    return [probe.ids[i] for i in top if np.isfinite(row[i])]


def sample(points: list, users: int | None, seed: int = SAMPLE_SEED) -> list[int]:
    """Indices of the points of at most `users` dialogues (drawn with a fixed seed), in their order."""
    ids = list(dict.fromkeys(p.dialogue for p in points))
    if users is not None and users < len(ids):
        keep = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:users]}
        return [n for n, p in enumerate(points) if p.dialogue in keep]
    return list(range(len(points)))


class Scored:
    """The LLM's scores of the top-k of a system for some points (one batched `ranker.score`)."""

    def __init__(self, ranker, t: ce.Tuning, points: list, scores: np.ndarray, progress: bool = False):
        k = ranker.config.max_candidates
        self.points, self.scores = points, scores
        self.tops = [top_ids(t.probe, row, p, k) for row, p in zip(scores, points)]
        requests = [llm_request(t.reader.read(p.context, known=p.mentioned), t.probe.catalog, top)
                    for p, top in zip(points, self.tops)]
        self.shown = sum(ranker.reads_query(q) for _, _, q in requests)
        started = time.monotonic()
        self.llm = []
        step = 64  # chunks, so a long run shows progress
        for start in range(0, len(requests), step):
            self.llm += ranker.score(requests[start:start + step])
            if progress:
                print(f"LLM: {min(start + step, len(requests))}/{len(requests)} points", file=sys.stderr, flush=True)
        self.seconds = time.monotonic() - started

    def ranks(self, probe, weight: float) -> np.ndarray:
        """Every target's 1-based rank after fusing the top-k (pessimistic on ties, as `target_ranks`)."""
        pos = [[probe.pos[i] for i in p.targets] for p in self.points]
        exc = [[probe.pos[i] for i in p.mentioned if i in probe.pos] for p in self.points]
        out = []
        for row, p, ranks, top, llm in zip(self.scores, self.points, target_ranks(self.scores, pos, exc),
                                           self.tops, self.llm):
            if top:
                fused = fuse(llm, row[[probe.pos[i] for i in top]], weight)
                at = {item: float((fused >= fused[n]).sum()) for n, item in enumerate(top)}
                ranks = np.array([at.get(item, max(r, len(top) + 1)) for item, r in zip(p.targets, ranks)])
            out.append(ranks)
        return np.concatenate(out) if out else np.zeros(0)


def _hits(ranks: np.ndarray) -> np.ndarray:
    return np.stack([(ranks <= k).astype(float) for k in ce.KS], axis=1)


def choose_weight(scored: Scored, probe, grid=None) -> tuple[float, dict]:
    """The fusion weight with the best mean Recall@OBJECTIVE (ties: the smaller weight) and the whole grid."""
    from recllm.fusion import FUSION_GRID

    grid = FUSION_GRID if grid is None else grid
    table = {w: float(np.mean([(scored.ranks(probe, w) <= k).mean() for k in OBJECTIVE])) for w in grid}
    best = max(grid, key=lambda w: (round(table[w], 12), -w))
    return best, {str(w): round(v, 4) for w, v in table.items()}


def llm_row(t: ce.Tuning, ranker, base: str, weights: dict, held_run: tuple, per_pair: dict, *,
            users: int | None = None, progress: bool = False) -> dict:
    """The report row of `base` + the LLM (see module doc): the fusion weight chosen on the tune half's
    out-of-fold points, then held-out Recall@k (strict) with its bootstrap, vs the floor and vs `base` on the
    same pairs."""
    if ranker.catalog is None:
        ranker.catalog = t.probe.catalog
    names = t.systems[base]
    probe = t.probe
    keep = sample(t.points, users)
    tune_scores = probe.scores({k: t.signals[k] for k in names if k in t.signals}, weights)[keep]
    tuned = Scored(ranker, t, [t.points[n] for n in keep], tune_scores, progress)
    weight, grid = choose_weight(tuned, probe)

    sig, pts, errors = held_run
    held_scores = probe.scores({k: sig[k] for k in names if k in sig}, weights)
    keep = sample(pts, users)
    # the chosen points' pairs in the full run's per-pair arrays (targets in point order, errors last)
    starts = np.cumsum([0] + [len(p.targets) for p in pts])
    pairs = np.concatenate([np.arange(starts[n], starts[n + 1]) for n in keep]) if keep else np.zeros(0, int)
    chosen = {pts[n].dialogue for n in keep}
    if users is None:
        extra = errors
    else:  # the chosen dialogues' unreadable turns (misses) are the points `fold_signals` left out
        have = {(p.dialogue, p.turn) for p in pts}
        extra = sum(len(p.targets) for d in t.held if d.id in chosen for p in cv.eval_points(d, t.src.catalog)
                    if (p.dialogue, p.turn) not in have)
    held = Scored(ranker, t, [pts[n] for n in keep], held_scores[keep], progress)
    hits = _hits(np.concatenate([held.ranks(probe, weight), np.full(extra, np.inf)]))

    def same(name: str) -> np.ndarray:  # another system's hits on the same pairs (the chosen dialogues' misses)
        full = per_pair[f"{name}|strict"]
        return np.concatenate([full[pairs], np.zeros((extra, len(ce.KS)))])

    row = {"weights": {**weights, "llm": weight}, "llm": ranker.describe(), "base": base,
           "fusion_grid_tune": grid, "tune_points": len(tuned.points),
           "strict": {**ce.recall_row(hits), "errors": int(extra), "points": len(held.points),
                      "dialogues": len(chosen), "query_shown": int(held.shown),
                      "seconds_per_point": round(held.seconds / max(1, len(held.points)), 3),
                      f"{base} (same pairs)": ce.recall_row(same(base)), "vs_base": ce.vs(hits, same(base)),
                      # for reading only (never chosen on): the LLM's own order of the top 20 (w = 1)
                      "llm_alone": ce.recall_row(_hits(np.concatenate([held.ranks(probe, 1.0),
                                                                        np.full(extra, np.inf)])))}}
    if "popularity floor|strict" in per_pair:
        row["strict"]["vs_floor"] = ce.vs(hits, same("popularity floor"))
    return row


def dialogue_examples(dialogues_path, movies_path, build_prompt, *, link_to=None, link_interactions=None,
                      n_candidates: int = 20, max_examples: int = 0, seed: int = 0,
                      progress: bool = True) -> tuple[list[tuple[str, int, int]], dict]:
    """Ranking examples `(prompt, target letter index, n candidates)` (as `llm.train_letter_lora` takes them)
    from the TUNE half of the dialogues only (`conversations.split_ids`, the split eval-conversations reports
    on the other half of): per eval point, the top `n_candidates` of "all knowledge" (knowledge from the other
    tune folds, weights as eval-conversations chooses them), shuffled by a seeded rng; one example per target
    in them. `build_prompt(history Lines, candidate Lines, query)`: e.g. an `LLMRanker`'s. `max_examples` > 0:
    a seeded sample of that many. Returns (examples, stats)."""
    started = time.monotonic()
    t = ce.prepare(dialogues_path, movies_path, link_to=link_to, link_interactions=link_interactions,
                   systems=["all knowledge"], progress=progress)
    _, weights, _ = t.weights(t.systems["all knowledge"])
    scores = t.probe.scores({k: t.signals[k] for k in t.systems["all knowledge"] if k in t.signals}, weights)
    rng = np.random.default_rng(seed)
    examples, pairs, found = [], 0, 0
    for row, point in zip(scores, t.points):
        top = top_ids(t.probe, row, point, n_candidates)
        pairs += len(point.targets)
        inside = [i for i in point.targets if i in top]
        if not inside:
            continue
        found += len(inside)
        order = rng.permutation(len(top))
        shuffled = [top[n] for n in order]
        history, lines, query = llm_request(t.reader.read(point.context, known=point.mentioned), t.probe.catalog,
                                            top)
        prompt = build_prompt(history, [lines[n] for n in order], query)
        examples += [(prompt, shuffled.index(i), len(top)) for i in inside]
    if max_examples and len(examples) > max_examples:
        examples = [examples[n] for n in sorted(rng.choice(len(examples), max_examples, replace=False))]
    stats = {"dialogues": len(t.tune), "points": len(t.points), "pairs": pairs,
             f"target_in_top{n_candidates}": round(found / pairs, 4) if pairs else 0.0,
             "examples": len(examples), "weights": weights, "seconds": round(time.monotonic() - started, 1)}
    if not examples:
        raise InputError(f"{dialogues_path}: no dialogue examples (no tune-half target in the top {n_candidates})")
    return examples, stats
