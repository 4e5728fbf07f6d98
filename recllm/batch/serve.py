"""Serving rows: checked `Row`s → engine `Request`s → one output object per row, in order.

All work rows of a call go to the engine in one `recommend_many`; a row that breaks that call is isolated by
serving the rows one by one. A "why ...?" question (the `question` field, or a last `messages` turn asking
why) is answered by the engine's `why`, which reads it with the same parser as the chat.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterable, Iterator

from recllm import jsonl
from recllm.batch.rows import Ask, Row, rows_from_dicts
from recllm.errors import RecllmError
from recllm.request import Engine, Request

DEFAULT_BATCH_SIZE = 16  # rows per recommend_many call


def _request(recommender: Engine, ask: Ask, explain: int | None) -> tuple[Request, str | None]:
    """The engine Request of one row (and the question it asks, if any)."""
    question = ask.question
    if ask.messages is None:
        request = Request(user=ask.user, history=list(ask.history), k=ask.k)
    else:
        request, asked = _conversation_request(recommender, ask)
        question = question or asked
    if explain is not None:
        request.explain = min(explain, request.k)
    return request, question


def _conversation_request(recommender: Engine, ask: Ask) -> tuple[Request, str | None]:
    """Replay the user turns of a conversation through a chat session (likes, dislikes, genres, years, the
    free-text ask: each turn refines the one before, the last one is the ask) and take the request it would
    send now. The row's own user and history always stay: a "start over" turn only clears what earlier turns
    added. A last turn that asks "why ...?" becomes the row's question."""
    from recllm.chat import ChatSession

    session = ChatSession(recommender, k=ask.k, intent_model=recommender.embedder)
    session.user = ask.user
    turns = [turn["content"] for turn in ask.messages if turn["role"] == "user"]
    intents = [session.understand(text) for text in turns]  # each turn refines the session; nothing recommended
    request = session.request()
    if ask.user is not None:
        request.user = ask.user
    request.history = list(ask.history) + [ref for ref in request.history if ref not in ask.history]
    request.explain = None
    asked = turns[-1] if intents and intents[-1] == "why" else None
    return request, asked


def error_object(row: Row, message: str) -> dict:
    """The output object of a row that cannot be served."""
    out: dict = {"id": row.id}
    if not row.work and (row.id is None or message.startswith(f"line {row.line}: duplicate")):
        out["line"] = row.line  # the only way to find a row without a usable id
    out["error"] = message
    return out


def serve(recommender: Engine, rows: list[Row], *, explain: int | None = None, trace: bool = True) -> list[dict]:
    """Output objects for `rows`, in order; the recommender sees all work rows in one `recommend_many`."""
    results: dict[int, object] = {}
    questions: dict[int, str | None] = {}
    requests = []
    for row in rows:
        if not row.work:
            continue
        try:
            request, questions[row.index] = _request(recommender, row.ask, explain)
            requests.append((row, request))
        except Exception as exc:  # noqa: BLE001 — a bad row never stops the run
            results[row.index] = exc
    if requests:
        try:
            answers = recommender.recommend_many([req for _, req in requests])
            if len(answers) != len(requests):
                raise RuntimeError(f"recommend_many returned {len(answers)} results for {len(requests)} requests")
        except Exception:  # one row spoiled the whole call: serve the rows one by one to isolate it
            answers = [_one(recommender, req) for _, req in requests]
        for (row, _), answer in zip(requests, answers):
            results[row.index] = answer
    outs = []
    for row in rows:
        result = results.get(row.index) if row.work else None
        if not row.work or isinstance(result, BaseException):
            outs.append(error_object(row, row.error if not row.work else _message(result)))
            continue
        out = {"id": row.id}
        out.update(result.to_dict(trace=trace))
        if questions.get(row.index):
            out["answer"] = _answer(recommender, questions[row.index], result)
        outs.append(out)
    return outs


def _one(recommender: Engine, request: Request):
    try:
        return recommender.recommend_many([request])[0]
    except Exception as exc:  # noqa: BLE001 — a bad row never stops the run
        return exc


def _answer(recommender: Engine, question: str, result) -> str:
    try:
        return recommender.why(question, result)
    except Exception as exc:  # noqa: BLE001 — e.g. the item is not a title: the answer says so
        return _message(exc)


def _message(exc: BaseException) -> str:
    if isinstance(exc, RecllmError):
        return str(exc)
    print(f"recllm batch: internal error on a row:\n{''.join(traceback.format_exception(exc))}", file=sys.stderr)
    return f"internal error ({type(exc).__name__}): {exc}"


def encode(out: dict) -> bytes:
    """One output line (`jsonl.encode`); a result JSON cannot hold still gives one line for the id."""
    try:
        return jsonl.encode(out)
    except TypeError as exc:  # an odd value in a trace
        return jsonl.encode({"id": out.get("id"), "error": f"internal error: the result is not JSON ({exc})"})


def process(recommender: Engine, rows: Iterable[dict], *, batch_size: int = DEFAULT_BATCH_SIZE,
            explain: int | None = None, trace: bool = True) -> Iterator[dict]:  # fmt: skip
    """Serve row dicts in batches and yield one output dict per row, in order (no files involved)."""
    parsed = rows_from_dicts(rows)
    for start in range(0, len(parsed), batch_size):
        yield from serve(recommender, parsed[start : start + batch_size], explain=explain, trace=trace)
