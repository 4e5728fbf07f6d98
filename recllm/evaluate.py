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
    from recllm.signals import TransitionConfig, Transitions, popularity

    trans = Transitions.fit(data.train, data.n_items, TransitionConfig(gaps=1, last=last))
    pop = np.log1p(popularity(data.train, data.n_items)).astype(np.float32)
    tie = 1e-3 * pop / max(float(pop.max()), 1.0)
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
        for b, h in enumerate(hist):
            scores[b, h] = -np.inf  # the user's own history is never recommended
        ranks[lo : lo + len(hist)] = metrics.rank_of_targets(scores, targets[lo : lo + len(hist)])
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

    def rank(requests):
        batch = []
        for history, cands, scores in requests:
            titles = [catalog.get(i).label for i in history]
            batch.append((titles, [Candidate(i, catalog.get(i).label, float(s)) for i, s in zip(cands, scores)]))
        out = []
        for (_, cands, _), ranked in zip(requests, ranker.rank_many(batch)):
            fused = {r.candidate.item_id: r.fused_score for r in ranked}
            out.append([fused.get(i, -math.inf) for i in cands])
        return out

    return rank


# ---------------------------------------------------------------- the report


def curves(ranks: np.ndarray, max_k: int = N_CANDIDATES) -> dict[str, list[float]]:
    """metric@k for k = 1..max_k, for the plot."""
    return {
        name: [fn(ranks, k) for k in range(1, max_k + 1)]
        for name, fn in (("ndcg", metrics.ndcg_at_k), ("recall", metrics.recall_at_k), ("mrr", metrics.mrr_at_k))
    }


def _mean_std(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = rows[0].keys()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in keys}
    return mean, std


def system_result(per_seed_ranks: list[np.ndarray], *, retrieved: list[np.ndarray] | None = None,
                  seeds: list[int] | None = None) -> dict:
    """Metrics over all users (mean and std over seeds) plus, when `retrieved` masks are given, the same
    metrics on the users whose true item the retriever put in its top 20."""
    rows = [metrics.summarize(r) for r in per_seed_ranks]
    mean, std = _mean_std(rows)
    out: dict = {"metrics": mean, "users": int(len(per_seed_ranks[0]))}
    if len(rows) > 1:
        out.update(std=std, per_seed=[dict(seed=s, **r) for s, r in zip(seeds or range(len(rows)), rows)])
    if retrieved is not None:
        sub = [metrics.summarize(r[m]) for r, m in zip(per_seed_ranks, retrieved)]
        sub_mean, sub_std = _mean_std(sub)
        out["retrieved_subset"] = {
            "users": [int(m.sum()) for m in retrieved],
            "metrics": sub_mean,
            **({"std": sub_std} if len(sub) > 1 else {}),
        }
    curve_rows = [curves(r) for r in per_seed_ranks]
    out["curves"] = {k: list(np.mean([c[k] for c in curve_rows], axis=0)) for k in curve_rows[0]}
    return out


@dataclass
class Report:
    """What `recllm eval` prints and writes: per-system metrics, protocol, data, timings."""

    data: dict
    protocol: dict
    systems: dict[str, dict]
    retrievers: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "protocol": self.protocol,
            "systems": self.systems,
            "retrievers": self.retrievers,
            "timings": self.timings,
            "environment": self.environment,
            "notes": self.notes,
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def to_markdown(self) -> str:
        d = self.data
        lines = [
            f"# Evaluation: {d.get('name')} ({self.protocol.get('phase')} split)",
            "",
            f"{d.get('users')} users, {d.get('items')} items, {d.get('interactions')} interactions after "
            f"{self.protocol.get('k_core')}-core filtering. Every user counts; every item is ranked; "
            f"the user's history is excluded from the ranking.",
            "",
            "## All users",
            "",
        ]
        cols = [f"{m}@{k}" for m in metrics.METRICS for k in metrics.KS]
        lines += _md_table(self.systems, cols, lambda r: (r["metrics"], r.get("std")))
        subset = {n: r for n, r in self.systems.items() if "retrieved_subset" in r}
        if subset:
            lines += ["", "## Users whose true item is in the top 20 (the system's own; for retriever+ranker, "
                      "the retriever's)", ""]
            lines += _md_table(
                subset,
                ["users"] + cols,
                lambda r: (dict(r["retrieved_subset"]["metrics"], users=_users(r["retrieved_subset"]["users"])),
                           r["retrieved_subset"].get("std")),
            )
        seeded = {n: r for n, r in self.systems.items() if "per_seed" in r}
        if seeded:
            lines += ["", "## Per seed", "", "| system | seed | ndcg@10 | recall@10 | recall@20 |", "|---|---|---|---|---|"]
            for name, r in seeded.items():
                for row in r["per_seed"]:
                    lines.append(f"| {name} | {row['seed']} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | "
                                 f"{row['recall@20']:.4f} |")
        if self.retrievers:
            lines += ["", "## Fitted retrievers", ""]
            for r in self.retrievers:
                w = ", ".join(f"{k} {v:g}" for k, v in r.get("weights", {}).items())
                lines.append(f"- seed {r.get('seed')}: fusion weights {w}; seq encoder {r.get('epochs')} epochs "
                             f"(best {r.get('best_epoch')}), fit {r.get('fit_seconds')} s wall / "
                             f"{r.get('fit_cpu_seconds')} s CPU; {r.get('path') or ''}")
        if self.timings:
            lines += ["", "## Timings (s)", ""]
            lines += [f"- {k}: {v}" for k, v in self.timings.items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """PNG with NDCG@k, Recall@k and MRR@k curves (k = 1..20) for every system."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        ks = list(range(1, N_CANDIDATES + 1))
        for ax, metric in zip(axes, metrics.METRICS):
            for name, r in self.systems.items():
                ax.plot(ks, r["curves"][metric], marker=".", label=name)
            ax.set_xlabel("k")
            ax.set_title(f"{metric.upper() if metric != 'recall' else 'Recall'}@k")
            ax.set_xticks([1, 5, 10, 15, 20])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{self.data.get('name')}: {self.protocol.get('phase')} split, all users, all items")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md and report.png into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
        paths["json"].write_text(self.to_json() + "\n")
        paths["markdown"].write_text(self.to_markdown())
        self.plot(paths["plot"])
        return paths


def _users(value) -> str:
    if isinstance(value, list):
        return "/".join(str(v) for v in sorted(set(value))) if len(set(value)) > 1 else str(value[0])
    return str(value)


def _md_table(systems: dict, cols: list[str], get) -> list[str]:
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in systems.items():
        vals, std = get(r)
        cells = []
        for c in cols:
            v = vals[c]
            if isinstance(v, str):
                cells.append(v)
            elif std and std.get(c):
                cells.append(f"{v:.4f} ± {std[c]:.4f}")
            else:
                cells.append(f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _environment() -> dict:
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return env


# ---------------------------------------------------------------- one-command evaluation


def content_matrix(data: EvalData, catalog=None, *, vectors=None, embedder=None, progress: bool = True) -> np.ndarray:
    """(N, D) float32 text vectors aligned to `data.item_ids`.

    `vectors`: precomputed, as a mapping item id -> vector or a pair (ids, (M, D) array); items it
    lacks get a zero vector. Otherwise `embedder.encode` (default: recllm.embed's packaged model) embeds
    each catalog item's `text`.
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
    if catalog is None:
        raise InputError("content vectors need the catalog (item texts) or precomputed vectors")
    if embedder is None:
        from recllm.embed import get_embedder

        embedder = get_embedder()
    texts = [catalog.get(i).text for i in data.item_ids]
    return np.asarray(embedder.encode(texts, progress=progress), dtype=np.float32)


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
    out_dir: also write report.json, report.md, report.png there.
    """
    t0 = time.monotonic()
    systems = list(dict.fromkeys(systems))
    unknown = sorted(set(systems) - set(DEFAULT_SYSTEMS))
    if unknown:
        raise InputError(f"unknown system {', '.join(unknown)} (choose from {', '.join(DEFAULT_SYSTEMS)})")
    if phase not in ("valid", "test"):
        raise InputError("phase must be valid or test")
    from recllm.catalog import Catalog, load_catalog, load_interactions

    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    if interactions is None or isinstance(interactions, (str, Path)):
        interactions = load_interactions(interactions)
    data = prepare(catalog, interactions)
    timings = {"load_and_split": round(time.monotonic() - t0, 1)}
    notes: list[str] = []
    need_fit = any(s in SEEDED for s in systems) or ranker is not None

    fitted = []
    if need_fit:
        from recllm import seqrec

        if retriever is not None:
            given = retriever if isinstance(retriever, (list, tuple)) else [retriever]
            for one in given:
                if not isinstance(one, seqrec.CollaborativeRetriever):
                    path = one
                    one = seqrec.CollaborativeRetriever.load(path)
                    one.meta["path"] = str(path)
                seqrec.check_fitted_on(one, data)
                fitted.append(one)
            seeds = [int(one.meta.get("seed", 0)) for one in fitted]
    content = None
    if "content" in systems or (need_fit and retriever is None):
        if content_vectors is None and fitted and fitted[0].content is not None:
            content = fitted[0].content
        else:
            t = time.monotonic()
            try:
                content = content_matrix(data, catalog, vectors=content_vectors, embedder=embedder, progress=progress)
            except Exception as exc:  # no embedding model: run without the content signal, say so
                from recllm.errors import RecllmError

                if not isinstance(exc, (RecllmError, ImportError)):
                    raise
                notes.append(f"content signal skipped: {exc}")
            timings["embed_items"] = round(time.monotonic() - t, 1)
    if need_fit and not fitted:
        from recllm import seqrec

        t = time.monotonic()
        for seed in seeds:
            one = seqrec.fit_on_split(data, seed=seed, config=config, content=content, progress=progress)
            if out_dir is not None:
                one.save(Path(out_dir) / f"retriever-seed{seed}")
                one.meta["path"] = str(Path(out_dir) / f"retriever-seed{seed}")
            fitted.append(one)
        timings["fit_retrievers"] = round(time.monotonic() - t, 1)

    results: dict[str, dict] = {}
    t = time.monotonic()
    baselines = {
        "popularity": lambda: popularity_scorer(data),
        "transition": lambda: transition_scorer(data),
        "content": lambda: content_scorer(content) if content is not None else None,
    }
    for name in systems:
        if name in baselines:
            scorer = baselines[name]()
            if scorer is None:
                continue
            ranking = rank_all(scorer, data, phase, progress=progress, desc=name)
            results[name] = system_result([ranking.ranks], retrieved=[ranking.ranks <= N_CANDIDATES])
    per_seed: dict[str, list[Ranking]] = {"seq": [], "retriever": []}
    for one in fitted:
        if "seq" in systems:
            per_seed["seq"].append(rank_all(one.encoder.scores_idx, data, phase, progress=progress, desc="seq"))
        per_seed["retriever"].append(rank_all(one.scores_idx, data, phase, progress=progress, desc="retriever"))
    for name in ("seq", "retriever"):
        if name in systems and per_seed[name]:
            rk = per_seed[name]
            results[name] = system_result([r.ranks for r in rk], retrieved=[r.ranks <= N_CANDIDATES for r in rk],
                                          seeds=list(seeds))
    timings["score"] = round(time.monotonic() - t, 1)
    rankers = ranker if isinstance(ranker, dict) else ({ranker_name: ranker} if ranker is not None else {})
    for name, one_ranker in rankers.items():
        t = time.monotonic()
        base = per_seed["retriever"]
        reranked = [rerank(r, data, one_ranker, phase, scorer=f.scores_idx, progress=progress)
                    for r, f in zip(base, fitted)]
        results[f"retriever+{name}"] = system_result(
            reranked, retrieved=[r.ranks <= N_CANDIDATES for r in base], seeds=list(seeds)
        )
        timings[f"rank {name}" if len(rankers) > 1 else "rank"] = round(time.monotonic() - t, 1)
    timings["total"] = round(time.monotonic() - t0, 1)
    report = Report(
        data={"name": data.name, **data.stats},
        protocol={
            "phase": phase,
            "k_core": MIN_COUNT,
            "split": "chronological leave-one-out: last = test, second to last = validation, rest = train",
            "ties": "timestamp ties broken by file row order; score ties by catalog order",
            "ranking": "all items; the user's own history (train + validation item at test) excluded",
            "users": "all users; a miss counts 0",
            "repeats": "a repeated (user, item) keeps its first occurrence",
            "history_len_ranker": HISTORY_LEN,
            "history_len_retriever": "the sequential encoder reads the newest max_len items (see retrievers), "
            "the transition signal its newest `last`, content the newest 20; the whole history is excluded",
            "candidates": N_CANDIDATES,
            "ks": list(metrics.KS),
        },
        systems=results,
        retrievers=[_fitted_summary(f) for f in fitted],
        timings=timings,
        environment=_environment(),
        notes=notes,
    )
    if out_dir is not None:
        report.save(out_dir)
    return report


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
