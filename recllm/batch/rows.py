"""The row format: JSONL lines (or Python dicts) → checked `Row`s.

Only what is specific to the format is checked here: the line's size and JSON, the id, the fields and their
JSON types, the length of each history reference, the structure of `messages`, the question's length.
Request limits (k, how many history items, the query) are the engine's: `Limits.check` reports them, with
one wording, when the row is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from recllm.errors import InputError
from recllm.memory import MAX_USER_CHARS
from recllm.request import DEFAULT_K, Limits

MAX_ID_CHARS = 200  # the row id
FIELDS = ("id", "user", "history", "messages", "question", "k")
ROLES = ("user", "assistant", "system")


@dataclass
class Ask:
    """What one row asks for; becomes an engine `Request`."""

    user: str | None = None
    history: list[str] = field(default_factory=list)
    messages: list[dict] | None = None  # a conversation, replayed through a chat session
    k: int = DEFAULT_K
    question: str | None = None  # "why ...?" about a recommended item


@dataclass
class Row:
    """One input row. `error` is set when the row alone shows it cannot be served (no model needed)."""

    index: int  # position among the rows (blank lines are not rows)
    line: int  # 1-based line number in the input
    id: str | None  # None when the row has no usable id
    ask: Ask | None = None
    error: str | None = None

    @property
    def work(self) -> bool:
        """True when the row needs the recommender."""
        return self.error is None


def _text(value, name: str, limits: Limits, limit: int | None = None) -> str:
    """A non-empty string field (a number is taken as its digits), at most `limit` characters."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise InputError(f"{name} is empty")
    limits.check_text(name, text, limit)
    return text


def parse_ask(data: dict, limits: Limits | None = None) -> Ask:
    """Check one row object's format (`limits`: default `Limits.from_env()`) and turn it into an `Ask`;
    `InputError` says what is wrong."""
    limits = limits or Limits.from_env()
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise InputError(f"unknown field {', '.join(map(repr, unknown))} (fields: {', '.join(FIELDS)})")
    ask = Ask()
    if data.get("user") is not None:
        ask.user = _text(data["user"], "user", limits, MAX_USER_CHARS)
    if data.get("history") is not None:
        history = data["history"]
        if not isinstance(history, list):
            raise InputError(f"history must be a list of item ids or titles, got {type(history).__name__}")
        ask.history = [_text(ref, f"history[{i}]", limits, limits.max_ref_chars) for i, ref in enumerate(history)]
    if data.get("messages") is not None:
        ask.messages = _messages(data["messages"], limits)
    if ask.user is None and not ask.history and ask.messages is None:
        if isinstance(data.get("history"), list):
            raise InputError("history is empty and the row has no user or messages")
        raise InputError("the row needs a user, a history or messages")
    if data.get("k") is not None:
        k = data["k"]
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise InputError(f"k must be a whole number, got {json.dumps(k)}")
        ask.k = k  # its range is the engine's limit
    if data.get("question") is not None:
        ask.question = _text(data["question"], "question", limits)
    return ask


def _messages(messages, limits: Limits) -> list[dict]:
    """A checked conversation: [{"role": "user"|"assistant"|"system", "content": str}], with a user turn."""
    if not isinstance(messages, list):
        raise InputError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if len(messages) > limits.max_messages:
        raise InputError(f"messages has {len(messages)} turns; the limit is {limits.max_messages}")
    checked = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "content" not in turn:
            raise InputError(f"messages[{i}] must be an object with role and content")
        role = turn.get("role", "user")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        checked.append({"role": role, "content": _text(turn["content"], f"messages[{i}].content", limits)})
    if not any(turn["role"] == "user" for turn in checked):
        raise InputError("messages has no user turn")
    return checked


@dataclass
class _Bad:
    message: str


def _decode(raw: bytes | str, line: int, limit: int) -> object:
    """The JSON value of one line, or a `_Bad` saying why not (`limit`: bytes of a line)."""
    if len(raw) > limit:
        return _Bad(f"line {line}: {len(raw)} bytes long; the limit is {limit}")
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        return _Bad(f"line {line}: not UTF-8 text")
    except ValueError as exc:  # json.JSONDecodeError
        return _Bad(f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})")


def _row(index: int, line: int, data: object, seen: dict[str, int], limits: Limits) -> Row:
    """One decoded input object → a Row (an error row when the object alone shows a problem)."""
    if isinstance(data, _Bad):
        return Row(index, line, None, error=data.message)
    if not isinstance(data, dict):
        return Row(index, line, None, error=f"line {line}: a row must be a JSON object, got {type(data).__name__}")
    row_id = data.get("id")
    if row_id is None:
        return Row(index, line, None, error=f"line {line}: the row has no id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return Row(index, line, None, error=f"line {line}: id must be a string, got {type(row_id).__name__}")
    row_id = str(row_id)
    if not row_id.strip() or len(row_id) > MAX_ID_CHARS:
        return Row(index, line, None, error=f"line {line}: id must be 1 to {MAX_ID_CHARS} characters")
    if row_id in seen:
        return Row(index, line, row_id, error=f"line {line}: duplicate id {row_id!r} (first on line {seen[row_id]})")
    seen[row_id] = line
    try:
        return Row(index, line, row_id, ask=parse_ask(data, limits))
    except InputError as exc:
        return Row(index, line, row_id, error=str(exc))


def parse_lines(lines: Iterable[bytes | str]) -> list[Row]:
    """Rows from JSONL lines (blank lines skipped, line numbers kept)."""
    limits = Limits.from_env()
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            raw = raw.rstrip(b"\r\n")
        else:
            raw = raw.removeprefix("\ufeff") if number == 1 else raw
            raw = raw.rstrip("\r\n")
        if not raw.strip():
            continue
        rows.append(_row(len(rows), number, _decode(raw, number, limits.max_row_bytes), seen, limits))
    return rows


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a JSONL file; `InputError` when the file cannot be read at all."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return parse_lines(f)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def rows_from_dicts(objects: Iterable[dict]) -> list[Row]:
    """Rows from Python dicts (the notebook path); the same checks as a file, `line` counts from 1."""
    limits = Limits.from_env()
    seen: dict[str, int] = {}
    return [_row(i, i + 1, obj, seen, limits) for i, obj in enumerate(objects)]
