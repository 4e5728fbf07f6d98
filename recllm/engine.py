"""The engine: one request → retrieve → LLM rank → explain → trace. CLI, chat, batch and the app call this.

`Recommender` holds the catalog, the interactions, the item store, the embedder, the retriever and (lazily)
the language model. A `Request` names a user, a history, a free-text query, k and filters; a `Result` holds
the ranked `Recommendation`s and the trace of everything that produced them, so "why X?" is answered from
facts. Every recommended item is a catalog candidate: the LLM only scores letters of the candidates given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from recllm import paths
from recllm.catalog import Catalog, Interactions, load_catalog, load_interactions
from recllm.errors import EmptyHistory, InputError, RecllmError, RequestTimeout
from recllm.retrieve import Candidate, Filters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Request limits, all in one place (documented in the README). Exceeding one gives an `InputError` with a
    one-line message (a request past `timeout_s`: `RequestTimeout`). `Limits.from_env()` reads overrides from
    environment variables named `RECLLM_` + the field name in capitals (`RECLLM_TIMEOUT_S=30`, `RECLLM_MAX_K=20`);
    the engine uses it when no `limits` are given, and batch files are checked with it."""

    max_k: int = 50  # recommendations per request
    max_history: int = 500  # history references per request
    max_query_chars: int = 2000  # characters of free text per request (and of a batch message or question)
    max_message_chars: int = 1000  # characters of one chat message
    max_messages: int = 100  # turns in a batch row's `messages`
    max_ref_chars: int = 300  # characters of one history reference in a batch row
    max_row_bytes: int = 1_000_000  # bytes of one batch input line
    candidates: int = 20  # candidates the LLM ranks (letters (A)..(T))
    timeout_s: float = 60.0  # seconds one recommend or explain call may take (a call for n requests: n times this)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"limit {f.name} must be a number above 0, not {value!r}")
        if self.candidates > 20:
            raise InputError(f"limit candidates must be at most 20 (letters (A)..(T)), not {self.candidates}")

    @classmethod
    def from_env(cls, environ=None) -> Limits:
        """The defaults, with each `RECLLM_<FIELD>` environment variable that is set taking precedence."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f"RECLLM_{f.name.upper()}"
            raw = (environ.get(name) or "").strip()
            if raw:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    kind = "a whole number" if isinstance(f.default, int) else "a number"
                    raise InputError(f"{name} must be {kind}, not {raw!r}") from None
        return cls(**values)


@dataclass
class Request:
    """One recommendation request (a CLI call, a batch row or a chat turn)."""

    user: str | None = None  # a user id in the interactions
    history: list[str] = field(default_factory=list)  # item ids or titles, oldest first (after the user's own)
    query: str | None = None  # free text ("a funny space movie for kids")
    k: int = 10
    filters: Filters | None = None
    explain: int | None = None  # how many of the top items get an explanation (None: the engine default)


@dataclass
class Recommendation:
    item_id: str
    title: str  # Item.label
    score: float  # final (fused) score, higher is better
    explanation: str = ""  # "" for items beyond the explained top n
    rank: int = 0  # 1-based

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "title": self.title, "score": round(self.score, 6),
                "explanation": self.explanation, "rank": self.rank}


@dataclass
class Result:
    recommendations: list[Recommendation]
    trace: dict

    def to_dict(self, trace: bool = True) -> dict:
        out = {"recommendations": [r.to_dict() for r in self.recommendations]}
        if trace:
            out["trace"] = self.trace
        return out


class Recommender:
    """Everything needed to serve requests on one catalog; build once per process and reuse."""

    def __init__(self, catalog: Catalog | str | Path | None = None, interactions: Interactions | str | Path | None = None,
                 *, chroma_url: str | None = None, model: str | None = None, adapter: str | Path | None = "auto",
                 ranker: str = "llm", explain: int = 3, fusion_weight: float | None = None,
                 allow_mismatch: bool = False, progress: bool = True, lm=None, limits: Limits | None = None,
                 collaborative: bool = True):
        from recllm.embed import get_embedder
        from recllm.retrieve import Retriever
        from recllm.store import ItemStore

        if ranker not in ("llm", "none"):
            raise InputError(f"unknown ranker {ranker!r} (choose llm or none)")
        self.catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        if interactions is None and self.catalog.name == "ml-latest-small" and catalog is None:
            interactions = load_interactions()
        self.interactions = (interactions if isinstance(interactions, Interactions) or interactions is None
                             else load_interactions(interactions))
        self.limits = limits or Limits.from_env()
        self.ranker_kind = ranker
        self.explain_n = explain
        self.progress = progress
        self._model_args = (model, adapter, fusion_weight, allow_mismatch)
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
        """The language model, loaded on first use (None with ranker='none')."""
        if self._lm is None and self.ranker_kind == "llm":
            from recllm import llm

            model, adapter, _, allow = self._model_args
            if adapter == "auto":
                adapter = default_adapter(model)
            self._lm = llm.load_model(model, adapter, allow_mismatch=allow)
        return self._lm

    @property
    def ranker(self):
        if self._ranker is None and self.lm is not None:
            from recllm.rank import LLMRanker

            self._ranker = LLMRanker(self.lm, fusion_weight=self._model_args[2])
        return self._ranker

    @property
    def explainer(self):
        if self._explainer is None:
            from recllm.explain import Explainer

            self._explainer = Explainer(self.lm, titles=[i.title for i in self.catalog])
        return self._explainer

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
            "store": self.store.where if hasattr(self.store, "where") else "chroma",
        }

    # ------------------------------------------------------------------ requests

    def _check(self, request: Request) -> None:
        lim = self.limits
        if not isinstance(request.k, int) or isinstance(request.k, bool) or not 1 <= request.k <= lim.max_k:
            raise InputError(f"k must be a whole number from 1 to {lim.max_k}, not {request.k!r}")
        if len(request.history) > lim.max_history:
            raise InputError(f"history has {len(request.history)} items; the limit is {lim.max_history}")
        if request.query is not None and len(request.query) > lim.max_query_chars:
            raise InputError(f"text is {len(request.query)} characters long; the limit is {lim.max_query_chars}")
        if request.explain is not None and not 0 <= request.explain <= request.k:
            raise InputError(f"explain must be from 0 to k ({request.k}), not {request.explain}")

    def _history(self, request: Request) -> tuple[list[str], list[str]]:
        """(history item ids oldest first, references that matched no item)."""
        ids: list[str] = []
        if request.user is not None:
            ids = self.retriever.user_history(str(request.user))
        unknown: list[str] = []
        if request.history:
            extra, unknown = self.catalog.resolve_many(str(h) for h in request.history)
            ids = ids + [i for i in extra if i not in ids]
        if not ids and not (request.query and request.query.strip()):
            shown = ", ".join(repr(u[:60]) for u in unknown[:5])
            raise EmptyHistory("nothing to recommend from: " + (
                f"none of the history items is in catalog {self.catalog.name} ({shown})" if unknown
                else "give a user, some liked titles or a description of what you want"))
        return ids, unknown

    def _retrieve(self, request: Request, history: list[str]) -> list[Candidate]:
        n = max(request.k, self.limits.candidates) if self.ranker_kind == "llm" else request.k
        if history:
            return self.retriever.retrieve(history=history, k=n, filters=request.filters, query=request.query)
        # cold start: the text query into the content index, fused with popularity
        hits = self.retriever.retrieve(history=[], k=3 * n, filters=request.filters, query=request.query)
        if not self._popularity or not hits:
            return hits[:n]
        content = np.array([c.score for c in hits])
        pop = np.log1p(np.array([self._popularity.get(c.item_id, 0) for c in hits], dtype=float))
        fused = _z(content) + 0.5 * _z(pop)  # the text match leads; popularity breaks near-ties
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
                self._check(request)
                t0 = time.perf_counter()
                history, unknown = self._history(request)
                candidates = self._retrieve(request, history)
                prepared.append((request, history, unknown, candidates, time.perf_counter() - t0))
            except RecllmError as exc:
                prepared.append(exc)
        to_rank = [i for i, p in enumerate(prepared)
                   if not isinstance(p, RecllmError) and p[1] and p[3] and self.ranker is not None]
        ranked: dict[int, list] = {}
        t0 = time.perf_counter()
        if to_rank:
            try:
                ranks = self.ranker.rank_many([
                    ([self.catalog.get(h).label for h in prepared[i][1]], prepared[i][3][: self.limits.candidates])
                    for i in to_rank], deadline=deadline)
                ranked = dict(zip(to_rank, ranks))
            except RequestTimeout:
                for i in to_rank:
                    prepared[i] = self._timed_out()
        rank_seconds = (time.perf_counter() - t0) / max(1, len(to_rank))
        results: list[Result | RecllmError] = []
        for i, p in enumerate(prepared):
            if isinstance(p, RecllmError):
                results.append(p)
                continue
            try:
                results.append(self._result(*p, ranked.get(i), rank_seconds, deadline))
            except RecllmError as exc:
                results.append(exc)
        log.debug("recommend_many: %d requests in %.2fs", len(requests), time.perf_counter() - started)
        return results

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"the request ran past its time limit ({self.limits.timeout_s:g} s) and was stopped; "
                              "try again, ask for fewer items, or raise RECLLM_TIMEOUT_S")

    def _result(self, request: Request, history: list[str], unknown: list[str], candidates: list[Candidate],
                retrieve_seconds: float, ranked, rank_seconds: float, deadline: float | None = None) -> Result:
        from recllm.rank import Ranked, ranking_trace

        if ranked is None:  # retriever order (ranker none, or nothing to condition the LLM on)
            ranked = [Ranked(c, float("nan"), c.score) for c in candidates]
        else:  # candidates past the LLM's 20 keep retriever order after the ranked ones
            ranked = list(ranked) + [Ranked(c, float("nan"), -math.inf) for c in candidates[len(ranked):]]
        rows = ranking_trace(ranked, candidates)
        recs = [Recommendation(r.candidate.item_id, r.candidate.title,
                               float(r.fused_score) if math.isfinite(r.fused_score) else float(r.candidate.score),
                               rank=n)
                for n, r in enumerate(ranked[: request.k], start=1)]
        trace = {
            "request": {"user": request.user, "history": list(request.history), "query": request.query,
                        "k": request.k, "filters": _filters_dict(request.filters)},
            "history": [{"item_id": h, "title": self.catalog.get(h).label} for h in history],
            "unknown": unknown,
            "candidates": rows,
            "recommendations": [r.to_dict() for r in recs],
            "ranker": self.ranker.describe() if self.ranker is not None and ranked and history else
                      {"model": None, "reason": "retriever order" + ("" if history else " (no history)")},
            "retriever": self.describe()["retriever"],
            "catalog": {"name": self.catalog.name, "fingerprint": self.catalog.fingerprint},
            "timings": {"retrieve_s": round(retrieve_seconds, 4),
                        "rank_s": round(rank_seconds, 4) if ranked and history and self.ranker else 0.0},
        }
        result = Result(recs, trace)
        n = self.explain_n if request.explain is None else request.explain
        t0 = time.perf_counter()
        for rank in range(1, min(n, len(recs)) + 1):
            for _ in self.explain_stream(result, rank, deadline=deadline):
                pass
        trace["timings"]["explain_s"] = round(time.perf_counter() - t0, 4)
        return result

    # ------------------------------------------------------------------ explanations and why

    def evidence(self, item_id: str, history: list[str]):
        from recllm.explain import evidence

        items = [self.catalog.get(h) for h in history]
        vectors = self.store.get_vectors(self.catalog, history + [item_id])
        if all(i in vectors for i in history + [item_id]):
            hist_vecs = np.stack([vectors[h] for h in history]) if history else None
            return evidence(self.catalog.get(item_id), items, hist_vecs, vectors[item_id])
        return evidence(self.catalog.get(item_id), items, None, None)

    def explain_stream(self, result: Result, rank: int, deadline: float | None = None) -> Iterator[str]:
        """Stream the explanation of the recommendation at `rank` (1-based) piece by piece; when done, the
        validated text is stored in the result and its trace (a rejected draft is replaced by the fallback).
        Generation stops between tokens at `deadline` (`time.monotonic()`; default: `limits.timeout_s` from
        now) and the fallback is used."""
        from recllm.explain import Explanation

        if deadline is None:
            deadline = time.monotonic() + self.limits.timeout_s

        rec = result.recommendations[rank - 1]
        history = [h["item_id"] for h in result.trace["history"]]
        ev = self.evidence(rec.item_id, history)
        final = None
        for piece in self.explainer.stream(self.catalog.get(rec.item_id), ev, deadline=deadline):
            if isinstance(piece, Explanation):
                final = piece
            else:
                yield piece
        rec.explanation = final.text
        result.trace["recommendations"][rank - 1]["explanation"] = final.to_dict()
        if final.source == "fallback" and final.draft is not None:
            yield "\n" + final.text  # the streamed draft was rejected; the grounded fallback replaces it

    def why(self, item: str, result: Result) -> str:
        """Answer "why (not) ITEM?" from the trace of `result` (ITEM: id, title, or "#n" for the n-th shown)."""
        from recllm.explain import why_from_trace

        item = str(item).strip()
        if item.startswith("#") and item[1:].isdigit():
            n = int(item[1:])
            if not 1 <= n <= len(result.recommendations):
                raise InputError(f"there is no #{n}: {len(result.recommendations)} items were recommended")
            item_id = result.recommendations[n - 1].item_id
        else:
            item_id = self.catalog.resolve(item)
            if item_id is None:
                raise InputError(f"{item[:80]!r} is not a title in catalog {self.catalog.name}")
        rec = next((r for r in result.recommendations if r.item_id == item_id), None)
        if rec is not None and not rec.explanation:
            for _ in self.explain_stream(result, rec.rank):
                pass
        return why_from_trace(item_id, self.catalog.get(item_id).label, result.trace)

    def chat(self, **options):
        """A new `ChatSession` on this engine (its state is its own; the engine is shared)."""
        from recllm.chat import ChatSession

        return ChatSession(self, **options)

    def search(self, text: str, k: int = 10, filters: Filters | None = None) -> list[Candidate]:
        if len(text) > self.limits.max_query_chars:
            raise InputError(f"text is {len(text)} characters long; the limit is {self.limits.max_query_chars}")
        return self.retriever.search(text, k=k, filters=filters)


def _z(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return np.zeros_like(x) if std < 1e-12 else (x - x.mean()) / std


def _filters_dict(filters: Filters | None) -> dict | None:
    if filters is None:
        return None
    out = asdict(filters)
    out["exclude_ids"] = sorted(filters.exclude_ids)
    return out


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
