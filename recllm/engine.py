"""The engine: one request → retrieve → LLM rank → explain → trace. CLI, chat, batch and the app call this.

`Recommender` holds the catalog, the interactions, the item store, the embedder, the retriever and (lazily)
the language model. A `Request` names a user, a history, a free-text query, k and filters; a `Result` holds
the ranked `Recommendation`s and the trace of everything that produced them, so "why X?" is answered from
facts. Every recommended item is a catalog candidate: the LLM only scores letters of the candidates given.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from recllm import paths
from recllm.catalog import Catalog, Interactions, default_interactions, load_catalog
from recllm.errors import EmptyHistory, InputError, RecllmError, RequestTimeout
from recllm.request import DEFAULT_EXPLAIN, Engine, Limits, Recommendation, Request, Result
from recllm.retrieve import Candidate, Filters

__all__ = ["Engine", "Limits", "Recommendation", "Recommender", "Request", "Result", "default_adapter"]

log = logging.getLogger(__name__)


class Recommender:
    """Everything needed to serve requests on one catalog; build once per process and reuse."""

    def __init__(self, catalog: Catalog | str | Path | None = None, interactions: Interactions | str | Path | None = None,
                 *, chroma_url: str | None = None, model: str | None = None, adapter: str | Path | None = "auto",
                 ranker: str = "llm", explain: int = DEFAULT_EXPLAIN, fusion_weight: float | None = None,
                 allow_mismatch: bool = False, progress: bool = True, lm=None, limits: Limits | None = None,
                 collaborative: bool = True):
        from recllm.embed import get_embedder
        from recllm.retrieve import Retriever
        from recllm.store import ItemStore

        if ranker not in ("llm", "none"):
            raise InputError(f"unknown ranker {ranker!r} (choose llm or none)")
        self.catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        if not isinstance(interactions, Interactions):
            interactions = default_interactions(catalog, interactions)
        self.interactions = interactions
        self.limits = limits or Limits.from_env()
        self.ranker_kind = ranker
        self.explain_n = explain
        self.progress = progress
        self._model_args = (model, adapter_choice(adapter), fusion_weight, allow_mismatch)
        self._lm = lm
        self._ranker = None
        self._explainer = None
        self.store = ItemStore(chroma_url=chroma_url)
        self.embedder = get_embedder()
        self.ensure_index()
        self.collaborative = self._load_collaborative() if collaborative else None
        self.retriever = Retriever(self.catalog, self.store, self.embedder, self.interactions,
                                   collaborative=self.collaborative)
        self._popularity = self.interactions.popularity() if self.interactions is not None else {}

    # ------------------------------------------------------------------ set-up

    def ensure_index(self) -> None:
        """Index the catalog when the store lacks it or it changed (embeds only new/changed items)."""
        if not self.store.is_current(self.catalog, self.embedder):
            what = "changed or unfinished" if self.store.has(self.catalog) else "not indexed yet"
            print(f"note: catalog {self.catalog.name} is {what}: indexing it first", file=sys.stderr)
            self.store.index(self.catalog, self.embedder, progress=self.progress)

    def _load_collaborative(self):
        """The fitted collaborative retriever of this catalog (`recllm fit-retriever`), if there is one."""
        try:
            from recllm.collab import load_collaborative
        except ImportError:
            return None
        return load_collaborative(self.catalog, self.store, self.interactions)

    @property
    def lm(self):
        """The language model, loaded on first use (None with ranker='none'). An in-process model is served
        through its `llm.scheduler.Scheduler`: calls of concurrent requests share model calls."""
        if self._lm is None and self.ranker_kind == "llm":
            from recllm import llm

            model, adapter, _, allow = self._model_args
            if adapter == "auto":
                adapter = default_adapter(model)
            self._lm = llm.load_model(model, adapter, allow_mismatch=allow)
        if self._lm is not None:
            from recllm.llm.scheduler import shared

            self._lm = shared(self._lm)  # the one scheduler of this model (a RemoteLM stays as it is)
        return self._lm

    @property
    def ranker(self):
        if self._ranker is None and self.lm is not None:
            from recllm.rank import LLMRanker

            self._ranker = LLMRanker(self.lm, fusion_weight=self._model_args[2], catalog=self.catalog)
        return self._ranker

    @property
    def explainer(self):
        """Phrases explanations with the language model (the plain sentence only with ranker='none')."""
        if self._explainer is None:
            from recllm.explain import Explainer

            self._explainer = Explainer(self.lm, titles=self.plain_explainer.matcher)
        return self._explainer

    @cached_property
    def plain_explainer(self):
        """The evidence sentence without a model (requests with no history to phrase from)."""
        from recllm.explain import Explainer

        return Explainer(None, titles=[i.title for i in self.catalog])

    def warm(self) -> None:
        """Load the model (and build the ranker) now instead of at the first request."""
        _ = self.ranker, self.explainer

    def describe(self) -> dict:
        lm = self._lm
        return {
            "catalog": self.catalog.name, "items": len(self.catalog),
            "model": lm.model_id if lm is not None else (None if self.ranker_kind == "none" else "not loaded yet"),
            "adapter": lm.adapter_id if lm is not None else None,
            "retriever": "content+" + self.collaborative.kind if self.collaborative is not None else "content",
            "store": self.store.where,
        }

    # ------------------------------------------------------------------ requests

    def _history(self, request: Request) -> _History:
        """The item ids to recommend from, oldest first, and how the references were read."""
        ids: list[str] = []
        if request.user is not None:
            ids = self.retriever.user_history(str(request.user))
        unknown: list[str] = []
        ambiguous: list = []
        if request.history:
            extra, unknown, ambiguous = self.catalog.lookup_many(str(h) for h in request.history)
            ids = ids + [i for i in extra if i not in ids]
        if not ids and not (request.query and request.query.strip()):
            # Nothing to go on but the request's filters (a chat turn or batch conversation with no usable
            # title and no ask: they always send filters): `_retrieve` answers with the most popular items
            # inside them. A request with nothing at all, or whose titles all failed, stays an error: from the
            # Python API or the CLI that is almost always a history that did not get through, and a silent
            # popular list would hide it.
            if unknown or request.filters is None or not self.popularity:
                shown = ", ".join(repr(u[:60]) for u in unknown[:5])
                raise EmptyHistory("nothing to recommend from: " + (
                    f"none of the history items is in catalog {self.catalog.name} ({shown})" if unknown
                    else "give a user, some liked titles or a description of what you want"))
        return _History(ids, unknown, ambiguous)

    @property
    def popularity(self) -> dict[str, float]:
        """What "popular" means for requests with nothing to go on: item id -> count. The interactions'
        counts unless `use_popularity` set other ones."""
        return self._popularity

    def use_popularity(self, counts: dict[str, float] | None = None, *, column: str | None = None) -> None:
        """Set the popularity prior: `counts` (item id -> count, e.g. `conversations.mention_counts` of some
        dialogues) or a numeric catalog `column` (`knowledge.column_counts`, e.g. "votes"); neither: back to
        the interactions' counts. InputError when the column holds no numbers."""
        if column is not None:
            from recllm.knowledge import column_counts

            counts = column_counts(self.catalog, column)
            if not counts:
                raise InputError(f"catalog {self.catalog.name} has no numeric column {column!r} to count popularity")
        elif counts is None:
            counts = self.interactions.popularity() if self.interactions is not None else {}
        self._popularity = {str(k): float(v) for k, v in counts.items() if str(k) in self.catalog}

    def _retrieve(self, request: Request, history: list[str]) -> list[Candidate]:
        from recllm.rank import zscore

        n = max(request.k, self.limits.candidates) if self.ranker_kind == "llm" else request.k
        if history:
            return self.retriever.retrieve(history=history, k=n, filters=request.filters, query=request.query)
        if not (request.query and request.query.strip()):  # nothing but filters: the popularity prior
            from recllm.knowledge import popularity_prior

            top = popularity_prior(self.catalog, self.popularity, request.filters, k=n)
            return [Candidate(i, self.catalog.get(i).label, score, {"popularity": score}) for i, score in top]
        # cold start: the text query into the content index, fused with popularity
        hits = self.retriever.retrieve(history=[], k=3 * n, filters=request.filters, query=request.query)
        if not self._popularity or not hits:
            return hits[:n]
        content = np.array([c.score for c in hits])
        pop = np.log1p(np.array([self._popularity.get(c.item_id, 0) for c in hits], dtype=float))
        fused = zscore(content) + 0.5 * zscore(pop)  # the text match leads; popularity breaks near-ties
        order = sorted(range(len(hits)), key=lambda i: (-fused[i], i))[:n]
        return [replace(hits[i], score=float(fused[i]), signals={**hits[i].signals, "popularity": float(pop[i])})
                for i in order]

    def recommend(self, request: Request | None = None, **fields) -> Result:
        """One request; raises RecllmError subclasses for bad input."""
        result = self.recommend_many([request or Request(**fields)])[0]
        if isinstance(result, RecllmError):
            raise result
        return result

    def recommend_many(self, requests: list[Request]) -> list[Result | RecllmError]:
        """Many requests; LLM scoring is batched across them. A bad request yields its error, not an exception.

        The call may take `limits.timeout_s` per request: ranking stops between model batches after that
        (`RequestTimeout` for the requests not ranked yet) and explanations stop between tokens (the plain
        fallback sentence is used)."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.limits.timeout_s * max(1, len(requests))
        prepared: list = []
        for request in requests:
            try:
                self.limits.check(request)
                t0 = time.perf_counter()
                history = self._history(request)
                candidates = self._retrieve(request, history.ids)
                prepared.append(_Prepared(request, history, candidates, time.perf_counter() - t0))
            except RecllmError as exc:
                prepared.append(exc)
        # the LLM ranks only requests with a history to condition on (a cold query keeps retriever order)
        to_rank = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared) and p.history.ids and p.candidates]
        ranked: dict[int, list] = {}
        t0 = time.perf_counter()
        if to_rank and self.ranker is not None:
            try:
                from recllm.rank import Line

                ranks = self.ranker.rank_many([
                    ([Line.of(self.catalog.get(h)) for h in prepared[i].history.ids],
                     prepared[i].candidates[: self.limits.candidates], prepared[i].request.query)
                    for i in to_rank], deadline=deadline)
                ranked = dict(zip(to_rank, ranks))
            except RequestTimeout:
                for i in to_rank:
                    prepared[i] = self._timed_out()
        rank_seconds = (time.perf_counter() - t0) / max(1, len(ranked))
        results: list[Result | RecllmError] = []
        for i, p in enumerate(prepared):
            if isinstance(p, RecllmError):
                results.append(p)
                continue
            try:
                results.append(self._result(p, ranked.get(i), rank_seconds if i in ranked else 0.0))
            except RecllmError as exc:
                results.append(exc)
        self._explain_top(results, deadline)
        log.debug("recommend_many: %d requests in %.2fs", len(requests), time.perf_counter() - started)
        return results

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"the request ran past its time limit ({self.limits.timeout_s:g} s) and was stopped; "
                              "try again, ask for fewer items, or raise RECLLM_TIMEOUT_S")

    def _result(self, p: _Prepared, ranked, rank_seconds: float) -> Result:
        request, candidates = p.request, p.candidates
        prompt_order = [c.item_id for c in candidates[: self.limits.candidates]] if ranked is not None else []
        ranked = order_scores(candidates, ranked)
        recs = [Recommendation(r.candidate.item_id, r.candidate.title, r.fused_score, rank=n)
                for n, r in enumerate(ranked[: request.k], start=1)]
        if ranked and prompt_order:
            ranker = {**self.ranker.describe(), "read_query": self.ranker.reads_query(request.query)}
        else:
            cold = not p.history.ids and not (request.query and request.query.strip())
            ranker = {"model": None, "reason": "the most popular items within the filters (nothing else to go on)"
                      if cold else "retriever order" + ("" if p.history.ids else " (no history)")}
        result = Result(
            request=request, history=list(p.history.ids),
            history_titles=[self.catalog.get(h).label for h in p.history.ids],
            ranked=ranked, recommendations=recs, unknown=p.history.unknown, ambiguous=p.history.ambiguous,
            prompt_order=prompt_order, ranker=ranker, retriever=self.describe()["retriever"],
            catalog={"name": self.catalog.name, "fingerprint": self.catalog.fingerprint},
            timings={"retrieve_s": round(p.retrieve_seconds, 4), "rank_s": round(rank_seconds, 4)})
        return result

    def _explain_top(self, results: list, deadline: float) -> None:
        """Explain the top `explain` items of every result in one batched generation."""
        asks = []
        for result in results:
            if isinstance(result, Result):
                n = self.explain_n if result.request.explain is None else result.request.explain
                asks += [(result, rank) for rank in range(1, min(n, len(result.recommendations)) + 1)]
        t0 = time.perf_counter()
        for _ in self.explain_many(asks, deadline=deadline):
            pass
        seconds = round(time.perf_counter() - t0, 4)
        for result in results:
            if isinstance(result, Result):
                result.timings["explain_s"] = seconds  # the whole batch: explanations are decoded together


    # ------------------------------------------------------------------ explanations and why

    def evidence(self, item_id: str, history: list[str], filters: Filters | None = None):
        """`explain.Evidence` for recommending `item_id` after `history` (content vectors from the store, the
        collaborative fact from the interactions, the constraints of `filters` it meets)."""
        from recllm.explain import constraints_met, evidence

        item = self.catalog.get(item_id)
        items = [self.catalog.get(h) for h in history]
        vectors = self.store.get_vectors(self.catalog, history + [item_id])
        found = all(i in vectors for i in history + [item_id])
        hist_vecs = np.stack([vectors[h] for h in history]) if found and history else None
        return evidence(item, items, hist_vecs, vectors[item_id] if found else None,
                        interactions=self.interactions, meets=constraints_met(item, filters))

    def explain_stream(self, result: Result, rank: int, deadline: float | None = None) -> Iterator[str]:
        """Stream the explanation of the recommendation at `rank` (1-based) piece by piece (see `explain_many`)."""
        for _, piece in self.explain_many([(result, rank)], deadline=deadline):
            yield piece

    def explain_many(self, asks: list[tuple[Result, int]], deadline: float | None = None,
                     ) -> Iterator[tuple[int, str]]:
        """Explain several recommendations (`(result, rank)` pairs, 1-based ranks, of one or many results) in
        ONE batched generation; yields `(i, text piece)` as pieces come. When an item is done its validated
        `Explanation` is the recommendation's `reason`; a rejected draft is replaced by the fallback, streamed
        as a last piece "\n<fallback>". Generation stops between tokens at `deadline` (`time.monotonic()`;
        default: `limits.timeout_s` from now) and the fallback is used. With no history there is no evidence
        to phrase: the plain sentence, and no model is loaded for it."""
        from recllm.explain import Explanation

        if deadline is None:
            deadline = time.monotonic() + self.limits.timeout_s
        recs = [result.recommendations[rank - 1] for result, rank in asks]
        work = [(self.catalog.get(rec.item_id), self.evidence(rec.item_id, result.history, result.request.filters))
                for rec, (result, _) in zip(recs, asks)]
        for model in (False, True):  # the plain sentences first (instant), then one batch for the model
            group = [i for i, (result, _) in enumerate(asks) if bool(result.history) == model]
            if not group:
                continue
            explainer = self.explainer if model else self.plain_explainer
            for j, piece in explainer.stream_many([work[i] for i in group], deadline=deadline):
                i = group[j]
                if not isinstance(piece, Explanation):
                    yield i, piece
                    continue
                recs[i].reason = piece
                if piece.source == "fallback" and piece.draft is not None:
                    yield i, "\n" + piece.text  # the streamed draft was rejected; the fallback replaces it

    def why(self, question: str, result: Result, *, details: bool = False) -> str:
        """Answer "why (not) X?" from the facts of `result`. `question`: a question ("why did you suggest
        #2?", "why not Heat?"), read by the chat's own reader (`refs.why_target`), or a bare reference: "#2",
        "the first one", or an item as `Catalog.lookup` reads it (a title, "id:300"). `details` (or a question
        saying "details" / "scores"): add the raw scores. Something that is no catalog item gets an answer
        saying so (`why.not_in_catalog`)."""
        from recllm.refs import REF_RE, WHY_NOT_RE, Ref, is_why, ref_from_match, why_target
        from recllm.why import asks_details, not_in_catalog, why_answer

        text = " ".join(str(question).split())
        self.limits.check_text("question", text)
        shown = [r.item_id for r in result.recommendations]
        if is_why(text) or WHY_NOT_RE.match(text):
            ref = why_target(text, self.catalog, shown)
            if ref is None and not is_why(text):  # "why not X?" naming no catalog item
                return not_in_catalog(WHY_NOT_RE.sub("", text).strip(" ?!.'\"“”"), self.catalog.name)
            if ref is None:
                raise InputError(f"cannot tell which item the question is about: {text[:80]!r}")
        else:
            match = REF_RE.fullmatch(text)
            ref = ref_from_match(match) if match else Ref(item_id=self.catalog.resolve(text))
        item_id = ref.item_id
        if ref.rank is not None:
            n = len(shown) if ref.rank == -1 else ref.rank
            if not 1 <= n <= len(shown):
                raise InputError(f"there is no #{ref.rank}: {len(shown)} items were recommended")
            item_id = shown[n - 1]
        elif ref.focus and shown:
            item_id = shown[0]
        if item_id is None and ref.focus:
            raise InputError("nothing was recommended, so there is nothing to ask about")
        if item_id is None:
            return not_in_catalog(text, self.catalog.name)
        item = self.catalog.get(item_id)
        rec = result.recommendation(item_id)
        evidence = rec.reason.evidence if rec is not None and rec.reason is not None else None
        if rec is not None and evidence is None:  # not explained yet: the same evidence, no generation
            evidence = self.evidence(item_id, result.history, result.request.filters)
        return why_answer(item_id, item.label, result, item=item, evidence=evidence, catalog=self.catalog,
                          details=details or asks_details(text))

    def search(self, text: str, k: int = 10, filters: Filters | None = None) -> list[Candidate]:
        self.limits.check_text("text", text)
        return self.retriever.search(text, k=k, filters=filters)


@dataclass
class _History:
    ids: list[str]  # item ids, oldest first
    unknown: list[str]  # references that matched nothing
    ambiguous: list  # catalog.Resolved: references read one of two ways


@dataclass
class _Prepared:
    request: Request
    history: _History
    candidates: list[Candidate]
    retrieve_seconds: float


def order_scores(candidates: list[Candidate], ranked) -> list:
    """Every candidate as `rank.Ranked`, best first, with ONE score scale per request that falls with rank:
    the LLM-ranked head keeps its fused z-score; the candidates past it (or all of them, in retriever order)
    get the retriever's z-score over the whole list, shifted below the head when there is one."""
    from recllm.rank import Ranked, zscore

    head = list(ranked or [])
    done = {r.candidate.item_id for r in head}
    tail = [c for c in candidates if c.item_id not in done]
    if not tail:
        return head
    z = zscore([c.score for c in tail])
    if head:
        z = z - z[0] + min(r.fused_score for r in head) - 0.01
    return head + [Ranked(c, float("nan"), float(s)) for c, s in zip(tail, z)]


def adapter_choice(value: str | Path | None) -> str | Path | None:
    """The one reading of an adapter option: "auto" (or nothing said) = the shipped adapter of the default
    model; None or "none" = the base model alone; anything else = a folder or a name under adapters/."""
    if isinstance(value, str) and value.strip().lower() in ("none", ""):
        return None
    return value


def default_adapter(model: str | None) -> Path | None:
    """The shipped adapter for the default model (adapters/*/recllm_adapter.json with "default": true)."""
    from recllm import llm

    if model not in (None, "", "default", llm.DEFAULT_MODEL):
        return None
    root = paths.adapters_dir()
    if not root.is_dir():
        return None
    for meta_path in sorted(root.glob(f"*/{llm.ADAPTER_METADATA}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("default") and meta.get("base_model") == llm.DEFAULT_MODEL:
            return meta_path.parent
    return None
