"""What goes into the engine and what comes out: `Limits`, `Request`, `Recommendation`, `Result`, and the
`Engine` protocol that the chat, the app and batch rely on (the engine implements it; tests fake it).

A `Result` holds typed fields (the history used, every ranked candidate, the recommendations with their
explanations); `Result.trace` / `to_dict()` turn them into the JSON trace at the edge. Nothing reads the trace
back as working state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from recllm.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Catalog, Interactions, Resolved
    from recllm.explain import Explanation
    from recllm.rank import Ranked
    from recllm.retrieve import Candidate, Filters

DEFAULT_K = 10  # recommendations per request (CLI, batch, Python API; the chat shows chat.DEFAULT_K)
DEFAULT_EXPLAIN = 3  # top items of a request that get an explanation


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

    def check_text(self, name: str, text: str, limit: int | None = None) -> None:
        """InputError when `text` is longer than `limit` (default `max_query_chars`)."""
        limit = self.max_query_chars if limit is None else limit
        if len(text) > limit:
            raise InputError(f"{name} is {len(text)} characters long; the limit is {limit}")

    def check(self, request: Request) -> None:
        """InputError (one line) for a request past a limit or with a malformed field."""
        k = request.k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise InputError(f"k must be a whole number from 1 to {self.max_k}, not {k!r}")
        if len(request.history) > self.max_history:
            raise InputError(f"history has {len(request.history)} items; the limit is {self.max_history}")
        if request.query is not None:
            self.check_text("text", request.query)
        explain = request.explain
        if explain is not None and (not isinstance(explain, int) or isinstance(explain, bool)
                                    or not 0 <= explain <= k):
            raise InputError(f"explain must be a whole number from 0 to k ({k}), not {explain!r}")


@dataclass
class Request:
    """One recommendation request (a CLI call, a batch row or a chat turn)."""

    user: str | None = None  # a user id in the interactions
    history: list[str] = field(default_factory=list)  # references oldest first (after the user's own): titles,
    #   or "id:<item id>" (a bare number is a title first; see `Catalog.lookup`)
    query: str | None = None  # free text ("a funny space movie for kids")
    k: int = DEFAULT_K
    filters: Filters | None = None
    explain: int | None = None  # how many of the top items get an explanation (None: the engine default)

    def to_dict(self) -> dict:
        filters = None
        if self.filters is not None:
            filters = asdict(self.filters)
            filters["exclude_ids"] = sorted(self.filters.exclude_ids)
        return {"user": self.user, "history": list(self.history), "query": self.query, "k": self.k,
                "filters": filters}


@dataclass
class Recommendation:
    item_id: str
    title: str  # Item.label
    score: float  # on one scale per request (z-scores), higher is better, falls with rank
    rank: int = 0  # 1-based
    reason: Explanation | None = None  # set once the item is explained

    @property
    def explanation(self) -> str:
        """The explanation text ("" while the item is not explained)."""
        return self.reason.text if self.reason is not None else ""

    def to_dict(self, *, full: bool = False) -> dict:
        """`full`: the explanation with its evidence and source (for traces), else only its text."""
        explanation = self.reason.to_dict() if full and self.reason is not None else self.explanation
        return {"item_id": self.item_id, "title": self.title, "score": round(self.score, 6),
                "explanation": explanation, "rank": self.rank}


@dataclass
class Result:
    """One answered request. `ranked` holds every candidate the engine ordered, best first (`rank.Ranked`:
    candidate, LLM score, fused score); `prompt_order` the ids in the order the LLM saw them (letters)."""

    request: Request
    history: list[str]  # item ids used, oldest first
    history_titles: list[str]  # their labels
    ranked: list[Ranked]
    recommendations: list[Recommendation]
    unknown: list[str] = field(default_factory=list)  # references that matched no item
    ambiguous: list[Resolved] = field(default_factory=list)  # references that could be read two ways
    prompt_order: list[str] = field(default_factory=list)
    ranker: dict = field(default_factory=dict)  # model, adapter, prompt sha256, fusion weight (or why none)
    retriever: str = ""
    catalog: dict = field(default_factory=dict)  # name, fingerprint
    timings: dict = field(default_factory=dict)

    def recommendation(self, item_id: str) -> Recommendation | None:
        return next((r for r in self.recommendations if r.item_id == item_id), None)

    def candidate_rows(self) -> list[dict]:
        from recllm.rank import ranking_trace

        return ranking_trace(self.ranked, self.prompt_order)

    @property
    def trace(self) -> dict:
        """Everything that produced this result, as JSON-ready data (built fresh on each access)."""
        return {
            "request": self.request.to_dict(),
            "history": [{"item_id": h, "title": t} for h, t in zip(self.history, self.history_titles)],
            "unknown": list(self.unknown),
            "ambiguous": [a.to_dict() for a in self.ambiguous],
            "candidates": self.candidate_rows(),
            "recommendations": [r.to_dict(full=True) for r in self.recommendations],
            "ranker": dict(self.ranker),
            "retriever": self.retriever,
            "catalog": dict(self.catalog),
            "timings": dict(self.timings),
        }

    def to_dict(self, trace: bool = True) -> dict:
        out: dict[str, Any] = {"recommendations": [r.to_dict() for r in self.recommendations]}
        if trace:
            out["trace"] = self.trace
        return out


class Engine(Protocol):
    """What the chat, the app and batch need from the engine (`engine.Recommender`; tests use one fake)."""

    catalog: Catalog
    interactions: Interactions | None
    limits: Limits
    embedder: Any  # embed.Embedder (the chat's intent examples), or None

    def recommend(self, request: Request | None = None, **fields) -> Result: ...

    def recommend_many(self, requests: list[Request]) -> list[Result | Exception]: ...

    def explain_stream(self, result: Result, rank: int, deadline: float | None = None) -> Iterator[str]: ...

    def explain_many(self, asks: list[tuple[Result, int]], deadline: float | None = None,
                     ) -> Iterator[tuple[int, str]]: ...

    def why(self, question: str, result: Result, *, details: bool = False) -> str: ...

    def describe(self) -> dict: ...


__all__ = ["DEFAULT_EXPLAIN", "DEFAULT_K", "Engine", "Limits", "Recommendation", "Request", "Result"]
