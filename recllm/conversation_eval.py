"""`recllm eval-conversations`: recommend from real conversations (ReDial format), measured as the literature does.

Protocol (`../shared/data/redial-dev/SOURCE.md`): at every recommender turn that brings up movies not mentioned
before, the whole catalog is ranked from the dialogue so far (messages before the turn, movies written by name);
movies already mentioned are left out and are not targets; Recall@1/10/50 over (turn, movie) pairs; a turn whose
ranking fails counts as a miss (`errors` in the report).

Dialogues are split by a fixed seed (`conversations.split_ids`) into a *tune* half and a *held-out* half. Only
the tune half gives knowledge (mention counts, co-mentions) and chooses weights: for tuning, the signals of
each tune dialogue come from the OTHER tune folds (out-of-fold, so a dialogue never sees its own mentions);
figures are reported on the held-out half with knowledge from the whole tune half ("strict"). Optionally
(`--cross-fit`) also with knowledge from every dialogue outside the held-out dialogue's fold (more data,
the same weights; never its own dialogue).

Systems (each knowledge source alone and together; weights tuned per system on the tune half):
popularity floor; titles only (no knowledge: the title text); + linked knowledge; + conversations; all.
With `fit_retriever` (`--fit-retriever`) also the collaborative retriever of `recllm fit-retriever`, fitted on
conversations as interactions (`seqrec.fit_on_split` on `split.split_sequences` with a `min_count` core) from
the same dialogues as the other knowledge: one fit per tuning fold, one on the tune half for the held-out
figures (and one per fold for cross-fit), so no figure comes from a retriever that saw its dialogue.
With an LLM (`--llm`) also "all knowledge + LLM": the LLM reads the conversation and re-ranks that system's
top 20 (`convllm.llm_row`; its fusion weight chosen on the tune half's out-of-fold turns).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recllm import conversations as cv
from recllm import knowledge as kn
from recllm.convrank import ConversationRanker, Reader, ReaderConfig, target_ranks, tune_weights

KS = (1, 10, 50)
FOLDS = 5
SYSTEMS = {  # name -> signals it may use
    "popularity floor": ("popularity",),
    "titles only (no knowledge)": ("content_title", "query_title"),
    "popularity prior + titles": ("popularity", "content_title", "query_title", "constraint"),
    "linked knowledge (MovieLens)": ("linked", "linked_pop", "content", "query", "constraint"),
    "conversations as interactions": ("comention", "popularity", "content_title", "query_title"),
    "all knowledge": ("popularity", "comention", "linked", "linked_pop", "content", "query", "constraint"),
    "fitted retriever on conversations": ("retriever",),
    "all knowledge + fitted retriever": ("popularity", "comention", "linked", "linked_pop", "content", "query",
                                         "constraint", "retriever"),
}
RETRIEVER_MIN_COUNT = 1  # k-core of the conversation retriever's split: items need 1 mention, users 3 (chosen
# on the tune half's out-of-fold objective: 0.091 at 1 vs 0.080 at 2 for the retriever alone)
PUBLISHED = [  # ReDial test split, already-mentioned movies excluded (SOURCE.md)
    {"system": "GPT-4 zero-shot (He et al., CIKM'23)", "recall@1": 0.050, "recall@10": 0.201, "recall@50": None},
    {"system": "UniCRS, repeats removed (Kostric & Balog, SIGIR'26)", "recall@1": None, "recall@10": 0.180,
     "recall@50": 0.335},
    {"system": "ReFICR, repeats removed (Kostric & Balog, SIGIR'26)", "recall@1": None, "recall@10": 0.213,
     "recall@50": 0.465},
]


class CachedEmbedder:
    """Memoises `encode` per text (queries repeat across systems and folds)."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts, progress: bool = False) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.embedder.encode(todo, progress=progress)))
        return np.stack([self.memo[t] for t in texts])


def item_vectors(catalog, embedder, progress: bool = True) -> np.ndarray:
    """Text vectors of the catalog's items, cached under `<home>/cache/` by a hash of the texts."""
    from recllm import paths

    texts = [item.text for item in catalog]
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = paths.home() / "cache" / f"item-vectors-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    vectors = np.asarray(embedder.encode(texts, progress=progress), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors, allow_pickle=False)
    return vectors


@dataclass
class Sources:
    """What the eval may use: the catalog (title-only), the linked catalog's data (optional), the embedder."""

    catalog: object  # the title-only catalog (years split out of titles)
    embedder: object
    linked_catalog: object = None  # `knowledge.linked_catalog` of it (genres, tags)
    linked_rows: list = field(default_factory=list)  # the other catalog's interactions, on linked ids
    link_report: dict | None = None
    title_vectors: np.ndarray | None = None
    linked_vectors: np.ndarray | None = None


def load_sources(movies, link_to=None, link_interactions=None, *, progress: bool = True, dialogues=()) -> Sources:
    """The catalog of `movies` and, with `link_to` (a catalog path; "movielens": the bundled one), its link."""
    from recllm.catalog import load_catalog, load_interactions
    from recllm.embed import get_embedder

    catalog = cv.redial_catalog(movies)
    embedder = CachedEmbedder(get_embedder())
    src = Sources(catalog, embedder)
    src.title_vectors = item_vectors(catalog, embedder.embedder, progress)
    if link_to:
        bundled = link_to == "movielens"
        other = load_catalog(None if bundled else link_to)
        inter = load_interactions(None if bundled and not link_interactions else link_interactions) \
            if (bundled or link_interactions) else None
        link = kn.link_catalogs(catalog, other, popularity=inter.popularity() if inter is not None else None)
        src.link_report = link.report(catalog, cv.mention_counts(dialogues) if dialogues else None)
        src.linked_catalog = kn.linked_catalog(catalog, other, link)
        src.linked_rows = kn.carry_interactions(link, inter) if inter is not None else []
        src.linked_vectors = item_vectors(src.linked_catalog, embedder.embedder, progress)
    return src


def conversation_retriever(src: Sources, train: list, *, min_count: int = RETRIEVER_MIN_COUNT, seed: int = 0):
    """`recllm fit-retriever` on the `train` dialogues as interactions (`knowledge.conversation_interactions`):
    the same split (`min_count` core) and fit (`seqrec.fit_on_split`), content vectors from the eval's cache."""
    from recllm import seqrec, split

    sequences: dict[str, list[str]] = {}
    for user, item, _, _ in kn.conversation_interactions(train):  # each dialogue's movies in mention order
        sequences.setdefault(user, []).append(item)
    ids = list(src.catalog.items)
    data = split.split_sequences(sequences, ids, name="conversations", k=min_count)
    vectors = src.linked_vectors if src.linked_vectors is not None else src.title_vectors
    content = split.content_matrix(data, vectors=(ids, vectors))
    return seqrec.fit_on_split(data, seed=seed, content=content, progress=False)


def ranker_for(src: Sources, train: list, *, title: bool = False, retriever=None) -> ConversationRanker:
    """The ranker with knowledge from the `train` dialogues (and the link), on linked or title-only text;
    `retriever`: a fitted conversation retriever (`conversation_retriever` of the same dialogues)."""
    rows = kn.conversation_interactions(train)
    comentions = kn.CoOccurrence(kn.sequences_from_rows(rows)) if rows else None
    linked = lpop = None
    if src.linked_rows and not title:
        linked = kn.CoOccurrence(kn.sequences_from_rows(src.linked_rows, min_rating=4.0))
        lpop = Counter(r[1] for r in src.linked_rows)
    catalog = src.catalog if title or src.linked_catalog is None else src.linked_catalog
    vectors = src.title_vectors if title or src.linked_vectors is None else src.linked_vectors
    return ConversationRanker(catalog, popularity=cv.mention_counts(train), comentions=comentions, linked=linked,
                              linked_popularity=lpop, item_vectors=vectors, embedder=src.embedder,
                              retriever=retriever)


def fold_signals(src: Sources, dialogues: list, known: list, folds: int, reader: Reader, *,
                 fit_retriever: bool = False, min_count: int = RETRIEVER_MIN_COUNT):
    """Signals of every eval point of `dialogues`, each fold's from a ranker whose knowledge comes from `known`
    minus that fold (`folds` = 1: all of `known`, which must not contain `dialogues` then); `fit_retriever`:
    with a conversation retriever fitted on that same knowledge."""
    ids = [d.id for d in dialogues]
    fold_of = {d: n % folds for n, d in enumerate(np.random.default_rng(1).permutation(ids))}
    parts, points, errors = [], [], 0
    for f in range(folds):
        chosen = [d for d in dialogues if fold_of[d.id] == f]
        train = [d for d in known if fold_of.get(d.id) != f] if folds > 1 else known
        pts, readings = [], []
        for d in chosen:
            for p in cv.eval_points(d, src.catalog):
                try:
                    readings.append(reader.read(p.context, known=p.mentioned))
                    pts.append(p)
                except Exception:  # noqa: BLE001 - a turn that cannot be read is a miss, counted
                    errors += len(p.targets)
        if not pts:
            continue
        retriever = conversation_retriever(src, train, min_count=min_count) if fit_retriever else None
        sig = ranker_for(src, train, retriever=retriever).signals(readings)
        title = ranker_for(src, train, title=True).signals(readings)
        sig.update({f"{k}_title": v for k, v in title.items() if k in ("content", "query")})
        parts.append(sig)
        points += pts
    signals = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return signals, points, errors


def _positions(ranker: ConversationRanker, points):
    return ([[ranker.pos[i] for i in p.targets] for p in points],
            [[ranker.pos[i] for i in p.mentioned if i in ranker.pos] for p in points])


def recall_row(hits: np.ndarray) -> dict:
    """Recall@1/10/50 of per-pair hits (pairs x KS) with their bootstrap interval, and the number of pairs."""
    from recllm import metrics

    boot = metrics.bootstrap(hits)
    row = {f"recall@{k}": {x: round(float(boot[x][j]), 4) for x in ("mean", "low", "high")}
           for j, k in enumerate(KS)}
    row["pairs"] = int(len(hits))
    return row


def vs(hits: np.ndarray, baseline: np.ndarray) -> dict:
    """The paired bootstrap of the Recall@k differences to `baseline` (same pairs)."""
    from recllm import metrics

    diff = metrics.bootstrap(hits, baseline)
    return {f"recall@{k}": {x: round(float(diff[x][j]), 4) for x in ("mean", "low", "high")}
            for j, k in enumerate(KS)}


@dataclass
class Tuning:
    """The split, the sources and the tune half's out-of-fold signals: what every system's weights come from."""

    dialogues: list
    tune: list
    held: list
    src: Sources
    reader: Reader
    systems: dict  # name -> the signals it may use (those the sources allow)
    signals: dict  # tune half, out-of-fold (`fold_signals` with FOLDS folds)
    points: list  # the tune half's eval points, in the order of `signals`' rows
    probe: ConversationRanker  # a ranker of the catalog ranked (ids, positions, `scores`)
    fit: dict  # fit_retriever / min_count, as `fold_signals` takes them

    def weights(self, names) -> tuple[dict, dict, float]:
        """(the tune signals a system uses, its weights chosen on them, the objective reached)."""
        sub = {k: self.signals[k] for k in names if k in self.signals}
        weights, tuned = tune_weights(self.probe, sub, *_positions(self.probe, self.points))
        return sub, weights, tuned


def prepare(dialogues_path, movies_path, *, link_to=None, link_interactions=None, seed: int = cv.SPLIT_SEED,
            systems=None, progress: bool = True, limit: int | None = None, fit_retriever: bool = False,
            min_count: int = RETRIEVER_MIN_COUNT) -> Tuning:
    """Read and split the dialogues, load the sources, keep the `systems` they allow, and compute the tune
    half's out-of-fold signals (the weights of every system are chosen on them, never on the held-out half)."""
    dialogues = cv.read_dialogues(dialogues_path)[:limit]
    tune, held = cv.split_ids(dialogues, seed=seed)
    src = load_sources(movies_path, link_to, link_interactions, progress=progress, dialogues=dialogues)
    reader = Reader(src.linked_catalog or src.catalog, ReaderConfig(), cv.mention_counts(tune))
    systems = {k: v for k, v in SYSTEMS.items() if systems is None or k in systems}
    if src.linked_catalog is None:
        systems = {k: [s for s in v if s not in ("linked", "linked_pop", "content", "query")] or None
                   for k, v in systems.items() if "linked" not in k}
        systems = {k: v for k, v in systems.items() if v}
    if not fit_retriever:
        systems = {k: v for k, v in systems.items() if "retriever" not in v}
    fit = {"fit_retriever": fit_retriever, "min_count": min_count}
    signals, points, _ = fold_signals(src, tune, tune, FOLDS, reader, **fit)
    return Tuning(dialogues, tune, held, src, reader, systems, signals, points, ranker_for(src, tune), fit)


def evaluate(dialogues_path, movies_path, *, link_to=None, link_interactions=None, seed: int = cv.SPLIT_SEED,
             cross_fit: bool = False, systems=None, progress: bool = True, limit: int | None = None,
             fit_retriever: bool = False, min_count: int = RETRIEVER_MIN_COUNT, llm=None,
             llm_users: int | None = None) -> dict:
    """The whole evaluation; returns the report dict (`write_report` writes it). `llm`: an `rank.LLMRanker` that
    re-ranks the top 20 of "all knowledge" (+ fitted retriever) (`convllm.llm_row`), on at most `llm_users`
    dialogues of each half."""
    started = time.monotonic()
    t = prepare(dialogues_path, movies_path, link_to=link_to, link_interactions=link_interactions, seed=seed,
                systems=systems, progress=progress, limit=limit, fit_retriever=fit_retriever, min_count=min_count)
    dialogues, tune, held, src, probe, fit = t.dialogues, t.tune, t.held, t.src, t.probe, t.fit
    tune_pts = t.points
    held_runs = {"strict": fold_signals(src, held, tune, 1, t.reader, **fit)}
    if cross_fit:
        held_runs["cross-fit"] = fold_signals(src, held, dialogues, FOLDS, t.reader, **fit)
    results: dict = {}
    per_pair: dict[str, np.ndarray] = {}
    for name, names in t.systems.items():
        sub, weights, tuned = t.weights(names)
        results[name] = {"weights": weights, "tune_objective": round(tuned, 4)}
        for run, (sig, pts, errors) in held_runs.items():
            hpos, hexc = _positions(probe, pts)
            ranks = np.concatenate(target_ranks(probe.scores({k: sig[k] for k in sub}, weights), hpos, hexc)
                                   + [np.full(errors, np.inf)])
            hits = np.stack([(ranks <= k).astype(float) for k in KS], axis=1)
            results[name][run] = recall_row(hits)
            results[name][run]["errors"] = int(errors)
            per_pair[f"{name}|{run}"] = hits
    floor = "popularity floor"
    for key, hits in per_pair.items():
        name, run = key.split("|")
        if name != floor and f"{floor}|{run}" in per_pair:
            results[name][run]["vs_floor"] = vs(hits, per_pair[f"{floor}|{run}"])
    if llm is not None:
        from recllm import convllm

        base = next(n for n in ("all knowledge + fitted retriever", "all knowledge") if n in results)
        sig, pts, errors = held_runs["strict"]
        results[f"{base} + LLM"] = convllm.llm_row(t, llm, base, results[base]["weights"], (sig, pts, errors),
                                                   per_pair, users=llm_users, progress=progress)
    return {
        "protocol": {"turns": "recommender turns bringing up movies not mentioned before (consecutive messages "
                              "of one speaker merged)", "ranking": "whole catalog, already-mentioned movies "
                              "excluded", "metric": "Recall@1/10/50 over (turn, movie) pairs; an error is a miss",
                     "interval": "95% percentile bootstrap over (turn, movie) pairs, 1,000 resamples "
                                 "(recllm.metrics.bootstrap)",
                     "split": f"dialogues permuted with seed {seed}; {len(tune)} tune / {len(held)} held-out",
                     "knowledge": "strict: counts and co-mentions from the tune half only; cross-fit: from every "
                                  "dialogue outside the held-out dialogue's fold (5 folds)",
                     "weights": "chosen per system on the tune half with out-of-fold knowledge (5 folds)",
                     **({"retriever": f"recllm fit-retriever on conversations as interactions ({min_count}-core "
                                      "split), fitted on the same dialogues as the other knowledge"}
                        if fit_retriever else {})},
        "data": {"dialogues": str(dialogues_path), "movies": str(movies_path), "n_dialogues": len(dialogues),
                 "tune_points": len(tune_pts), "held_out_points": len(held_runs["strict"][1]),
                 "link": src.link_report},
        "systems": results, "published": PUBLISHED,
        "seconds": round(time.monotonic() - started, 1),
    }


def _cells(r: dict, fmt: str = ".3f") -> list[str]:
    return [f"{r[f'recall@{k}']['mean']:{fmt}} [{r[f'recall@{k}']['low']:{fmt}}, {r[f'recall@{k}']['high']:{fmt}}]"
            for k in KS]


def to_markdown(report: dict) -> str:
    runs = [r for r in ("strict", "cross-fit") if any(r in s for s in report["systems"].values())]
    lines = ["# Conversation evaluation (ReDial dialogues)", "",
             f"{report['data']['n_dialogues']} dialogues; {report['protocol']['split']}; "
             f"{report['data']['held_out_points']} held-out recommender turns.", ""]
    for run in runs:
        lines += [f"## Held-out, knowledge {run}", "",
                  "| system | R@1 | R@10 | R@50 | pairs | errors |", "|---|---|---|---|---|---|"]
        for name, res in report["systems"].items():
            if run in res:
                lines.append(f"| {name} | " + " | ".join(_cells(res[run])) + f" | {res[run]['pairs']} | "
                             f"{res[run]['errors']} |")
        lines.append("")
    for name, res in report["systems"].items():
        if "llm" in res:  # the LLM row (`convllm.llm_row`): on its own held-out dialogues
            r, base = res["strict"], res["base"]
            who = " + ".join(x for x in (res["llm"].get("model"), res["llm"].get("adapter")) if x)
            lines += [f"## {name}", "",
                      f"The LLM ({who}) re-ranks the top {res['llm']['rank_config']['max_candidates']} of {base} at "
                      f"{r['points']} held-out turns of {r['dialogues']} dialogues; fusion weight "
                      f"{res['weights']['llm']:g} (LLM share, chosen on {res['tune_points']} tune-half turns); "
                      f"the user's words shown at {r['query_shown']} of {r['points']} turns; "
                      f"{r['seconds_per_point']:.2f} s per turn.", "",
                      "| system (same pairs) | R@1 | R@10 | R@50 | pairs |", "|---|---|---|---|---|",
                      f"| {name} | " + " | ".join(_cells(r)) + f" | {r['pairs']} |",
                      f"| {base} | " + " | ".join(_cells(r[f'{base} (same pairs)'])) + f" | {r['pairs']} |",
                      "| difference | " + " | ".join(_cells(r["vs_base"], "+.3f")) + " | |",
                      "| (the LLM's order alone, w = 1; not a choice) | " + " | ".join(_cells(r["llm_alone"]))
                      + f" | {r['pairs']} |", ""]
    lines += ["## Published (ReDial test split, mentioned movies excluded)", "", "| system | R@1 | R@10 | R@50 |",
              "|---|---|---|---|"]
    for p in report["published"]:
        lines.append(f"| {p['system']} | " + " | ".join("—" if p[f'recall@{k}'] is None else f"{p[f'recall@{k}']:.3f}"
                                                       for k in KS) + " |")
    lines += ["", "## Weights (chosen on the tune half)", ""]
    for name, res in report["systems"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:g}" for k, v in res["weights"].items() if v))
    if report["data"].get("link"):
        lines += ["", "## Link", "", "```", json.dumps(report["data"]["link"], indent=1), "```"]
    lines += ["", "Protocol: " + "; ".join(f"{k}: {v}" for k, v in report["protocol"].items()), ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["md"].write_text(to_markdown(report))
    return paths
