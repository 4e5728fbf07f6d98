"""Batch prompting: JSONL rows in, JSONL rows out — ordered, resumable, data-parallel.

One input line is one request (the row contract in DESIGN.md):

    {"id": "r1", "user": "42", "k": 5}
    {"id": "r2", "history": ["Heat", "Ronin (1998)"], "question": "why did you suggest Collateral?"}
    {"id": "r3", "messages": [{"role": "user", "content": "a funny space movie for kids"}]}

One output line per input row, in input order:

    {"id": "r1", "recommendations": [...], "trace": {...}}          + "answer" when the row asks "why ...?"
    {"id": "r4", "error": "unknown user '4242' in ratings.csv ..."}  a row that cannot be served; the run goes on

Durability: each output line is written with one `os.write` of the complete line to a file opened with
O_APPEND, and the file is fsync'ed after every batch. A process killed at any moment (kill -9 included)
leaves whole lines plus at most one torn tail; `resume=True` cuts that tail off and skips every id already
written. Under `torchrun` / `accelerate launch` every process writes `OUT.shard-<rank>`; rank 0 then merges
them in input order into a temp file that replaces OUT in one rename, so OUT is never half-merged.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from json.decoder import scanstring
from pathlib import Path

from recllm.errors import InputError, RecllmError

# Limits on one row; a row over any of them becomes an error row. The line size, history entries, turns and
# message length are `engine.Limits` fields (max_row_bytes, max_ref_chars, max_messages, max_query_chars), read
# with `Limits.from_env()` so RECLLM_MAX_ROW_BYTES etc. apply; these two are fixed:
MAX_ID_CHARS = 200  # the row id
MAX_USER_CHARS = 200  # the user id
DEFAULT_K = 10
DEFAULT_BATCH_SIZE = 16  # rows per recommend_many call
FIELDS = ("id", "user", "history", "messages", "question", "k")
ROLES = ("user", "assistant", "system")
DIST_TIMEOUT = timedelta(hours=24)  # how long a process waits at a barrier for the slowest one

_ID_HEAD = '{"id": '  # every line we write starts with this (json.dumps keeps key order)


# ------------------------------------------------------------------ rows


@dataclass
class Ask:
    """What one row asks for, checked against the limits; becomes an engine `Request`."""

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


def _text(value, name: str, limit: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise InputError(f"{name} is empty")
    if len(text) > limit:
        raise InputError(f"{name} is {len(text)} characters long; the limit is {limit}")
    return text


def _limits():
    """`engine.Limits.from_env()` (imported late: the engine imports this module's callers)."""
    from recllm.engine import Limits

    return Limits.from_env()


def parse_ask(data: dict, limits=None) -> Ask:
    """Check one row object against `limits` (an `engine.Limits`; default `Limits.from_env()`) and turn it into an
    `Ask`; `InputError` says what is wrong."""
    limits = limits or _limits()
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise InputError(f"unknown field {', '.join(map(repr, unknown))} (fields: {', '.join(FIELDS)})")
    ask = Ask()
    if data.get("user") is not None:
        ask.user = _text(data["user"], "user", MAX_USER_CHARS)
    if "history" in data and data["history"] is not None:
        history = data["history"]
        if not isinstance(history, list):
            raise InputError(f"history must be a list of item ids or titles, got {type(history).__name__}")
        if len(history) > limits.max_history:
            raise InputError(f"history has {len(history)} items; the limit is {limits.max_history}")
        ask.history = [_text(ref, f"history[{i}]", limits.max_ref_chars) for i, ref in enumerate(history)]
    if "messages" in data and data["messages"] is not None:
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
        if not 1 <= k <= limits.max_k:
            raise InputError(f"k must be between 1 and {limits.max_k}, got {k}")
        ask.k = k
    if data.get("question") is not None:
        ask.question = _text(data["question"], "question", limits.max_query_chars)
    return ask


def _messages(messages, limits) -> list[dict]:
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
        content = _text(turn["content"], f"messages[{i}].content", limits.max_query_chars)
        checked.append({"role": role, "content": content})
    if not any(turn["role"] == "user" for turn in checked):
        raise InputError("messages has no user turn")
    return checked


def _decode(raw: bytes | str, line: int, limit: int) -> object:
    """The JSON value of one line, or an error string (`limit`: bytes of a line)."""
    if len(raw) > limit:
        return _Bad(f"line {line}: {len(raw)} bytes long; the limit is {limit}")
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        return _Bad(f"line {line}: not UTF-8 text")
    except ValueError as exc:  # json.JSONDecodeError
        return _Bad(f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})")


@dataclass
class _Bad:
    message: str


def _row(index: int, line: int, data: object, seen: dict[str, int], limits=None) -> Row:
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
    limits = _limits()
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
    limits = _limits()
    seen: dict[str, int] = {}
    return [_row(i, i + 1, obj, seen, limits) for i, obj in enumerate(objects)]


# ------------------------------------------------------------------ serving rows

_WHY_PREFIXES = (
    "why did you suggest", "why did you recommend", "why did you pick", "why did you choose",
    "why do you suggest", "why do you recommend", "why would i like", "why would i enjoy",
    "why should i watch", "why was", "why is", "why",
)  # fmt: skip


def question_item(question: str) -> str:
    """The item a "why ...?" question is about: "why did you suggest Heat?" → "Heat"."""
    text = question.strip().rstrip("?!. ").strip()
    lower = text.lower()
    for prefix in _WHY_PREFIXES:
        if lower.startswith(prefix + " "):
            text = text[len(prefix) :].strip()
            break
    for suffix in (" for me", " to me", " recommended", " suggested", " in the list"):
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)].strip()
    text = text.strip("\"'“”‘’ ")
    if not text:
        raise InputError(f"cannot tell which item the question is about: {question!r}")
    return text


def _request(recommender, ask: Ask, explain: int | None):
    """The engine Request of one row (and the question it asks, if any)."""
    from recllm.engine import Request

    question = ask.question
    if ask.messages is None:
        request = Request(user=ask.user, history=list(ask.history), k=ask.k)
    else:
        request, asked = _conversation_request(recommender, ask)
        question = question or asked
    if explain is not None:
        request.explain = min(explain, request.k)
    return request, question


def _conversation_request(recommender, ask: Ask):
    """Replay the user turns of a conversation through a chat session (likes, dislikes, genres, years, the
    free-text ask: each turn refines the one before, the last one is the ask) and take the request it would
    send now. A last turn that asks "why ...?" becomes the row's question."""
    from recllm.chat import ChatSession

    session = ChatSession(recommender, k=ask.k, intent_model=getattr(recommender, "embedder", None))
    session.user = ask.user
    turns = [turn["content"] for turn in ask.messages if turn["role"] == "user"]
    for text in turns:
        try:
            session._plan(text)  # understand the turn and update the session; nothing is recommended
        except RecllmError:
            pass  # the chat would have answered with this error and gone on
    request = session.request()
    request.history = list(ask.history) + [ref for ref in request.history if ref not in ask.history]
    request.explain = None
    asked = turns[-1] if session.parser.parse(turns[-1]).intent == "why" else None
    return request, asked


def _error(row: Row, message: str) -> dict:
    out: dict = {"id": row.id}
    if not row.work and (row.id is None or message.startswith(f"line {row.line}: duplicate")):
        out["line"] = row.line  # the only way to find a row without a usable id
    out["error"] = message
    return out


def serve(recommender, rows: list[Row], *, explain: int | None = None, trace: bool = True) -> list[dict]:
    """Output objects for `rows`, in order; the recommender sees all work rows in one `recommend_many`."""
    work = [row for row in rows if row.work]
    results: dict[int, object] = {}
    questions: dict[int, str | None] = {}
    requests = []
    for row in work:
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
        if not row.work:
            outs.append(_error(row, row.error))
            continue
        result = results[row.index]
        if isinstance(result, BaseException):
            outs.append(_error(row, _message(result)))
            continue
        out = {"id": row.id}
        out.update(result.to_dict(trace=trace))
        if questions.get(row.index):
            out["answer"] = _answer(recommender, questions[row.index], result)
        outs.append(out)
    return outs


def _one(recommender, request):
    try:
        return recommender.recommend_many([request])[0]
    except Exception as exc:  # noqa: BLE001 — a bad row never stops the run
        return exc


def _answer(recommender, question: str, result) -> str:
    try:
        return recommender.why(question_item(question), result)
    except Exception as exc:  # noqa: BLE001 — e.g. the item is not a title: the answer says so
        return _message(exc)


def _message(exc: BaseException) -> str:
    if isinstance(exc, RecllmError):
        return str(exc)
    print(f"recllm batch: internal error on a row:\n{''.join(traceback.format_exception(exc))}", file=sys.stderr)
    return f"internal error ({type(exc).__name__}): {exc}"


def _line(out: dict) -> bytes:
    """One output line: JSON (NaN and infinities become null, as JSON has neither), newline-terminated."""
    try:
        text = json.dumps(out, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(out), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:  # an odd value in a trace: still one line for the id
        text = json.dumps({"id": out.get("id"), "error": f"internal error: the result is not JSON ({exc})"})
    return (text + "\n").encode("utf-8")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def process(recommender, rows: Iterable[dict], *, batch_size: int = DEFAULT_BATCH_SIZE, explain: int | None = None,
            trace: bool = True) -> Iterator[dict]:  # fmt: skip
    """Serve row dicts in batches and yield one output dict per row, in order (no files involved)."""
    parsed = rows_from_dicts(rows)
    for start in range(0, len(parsed), batch_size):
        yield from serve(recommender, parsed[start : start + batch_size], explain=explain, trace=trace)


# ------------------------------------------------------------------ output files


class LineWriter:
    """Appends whole lines to a file it holds an exclusive lock on: one os.write per line (O_APPEND), fsync
    on `sync()`. The lock (flock, released by the kernel when the process dies, kill -9 included) stops a
    second run from writing the same file at the same time."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise InputError(f"{path} is being written by another recllm batch run: wait for it or stop it") from None

    def write(self, line: bytes) -> None:
        written = os.write(self.fd, line)
        while written < len(line):  # short writes only happen on a full disk or a signal
            written += os.write(self.fd, line[written:])

    def truncate(self, size: int) -> None:
        """Cut the file to `size` bytes (0: start over; the end of the last whole line: drop a torn tail)."""
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Written:
    """One complete line found in an output file."""

    id: str | None
    offset: int
    length: int
    error: bool  # an error row


def _parse_written(text: str) -> tuple[str | None, bool] | None:
    """(id, is error row) of one complete line, or None when it is not an output row."""
    if text.startswith(_ID_HEAD + '"'):  # fast path: the lines we write
        try:
            row_id, end = scanstring(text, len(_ID_HEAD) + 1)
            rest = text[end : end + 12]
            if rest.startswith(", "):
                return row_id, rest.startswith((', "error": ', ', "line": '))
            if rest.startswith("}"):
                return row_id, False
        except ValueError:
            pass
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "id" not in data:
        return None
    return (None if data["id"] is None else str(data["id"])), "error" in data


_NOT_A_ROW = "\0not a row"  # id given to a complete line that is not one of our rows


def scan(path: Path) -> tuple[list[Written], int]:
    """The complete lines of an output file and the byte length they cover (beyond it: a torn tail)."""
    found: list[Written] = []
    offset = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return found, 0
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn tail: the write of this line never finished
            try:
                parsed = _parse_written(raw.decode("utf-8"))
            except UnicodeDecodeError:
                parsed = None
            row_id, error = parsed if parsed is not None else (_NOT_A_ROW, True)
            found.append(Written(row_id, offset, len(raw), error))
            offset += len(raw)
    return found, offset


def shard_path(out_path: Path, rank: int) -> Path:
    return out_path.with_name(f"{out_path.name}.shard-{rank}")


def shard_paths(out_path: Path) -> list[Path]:
    """Existing shard files of OUT, by rank."""
    prefix = f"{out_path.name}.shard-"
    found = []
    for path in out_path.parent.glob(f"{out_path.name}.shard-*"):
        suffix = path.name[len(prefix) :]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def _done(out_path: Path, rows: list[Row], *, retry_errors: bool) -> dict[str, tuple[Path, Written]]:
    """id → where its line already is (OUT first, then shards); only ids of work rows count."""
    wanted = {row.id for row in rows if row.work}
    done: dict[str, tuple[Path, Written]] = {}
    for path in [out_path, *shard_paths(out_path)]:
        for written in scan(path)[0]:
            if written.id in wanted and written.id not in done and not (retry_errors and written.error):
                done[written.id] = (path, written)
    return done


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def merge(out_path: Path, rows: list[Row], *, retry_errors: bool = False) -> int:
    """Write OUT in input order from OUT and its shards (temp file + rename), drop the shards.

    Returns the number of error rows in OUT.
    """
    done = _done(out_path, rows, retry_errors=retry_errors)
    missing = [row.id for row in rows if row.work and row.id not in done]
    if missing:
        raise RecllmError(f"cannot merge {out_path}: {len(missing)} rows have no output yet (e.g. {missing[0]!r}); "
                          "run again with --resume")  # fmt: skip
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    handles: dict[Path, object] = {}
    errors = 0
    try:
        with open(tmp, "wb") as f:
            for row in rows:
                if not row.work:
                    f.write(_line(_error(row, row.error)))
                    errors += 1
                    continue
                path, written = done[row.id]
                errors += written.error
                if path not in handles:
                    handles[path] = open(path, "rb")
                source = handles[path]
                source.seek(written.offset)
                f.write(source.read(written.length))
            f.flush()
            os.fsync(f.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    os.replace(tmp, out_path)
    _fsync_dir(out_path.parent)
    for path in shard_paths(out_path):
        path.unlink(missing_ok=True)
    return errors


def _is_prefix(written: list[Written], rows: list[Row], *, retry_errors: bool) -> bool:
    """True when OUT's lines are exactly the first len(written) rows' lines, in order."""
    if len(written) > len(rows):
        return False
    for line, row in zip(written, rows):
        if line.id != row.id or (row.work and retry_errors and line.error):
            return False
    return True


# ------------------------------------------------------------------ processes


class Processes:
    """This process's place in a data-parallel launch (torchrun / accelerate launch), or a single process."""

    def __init__(self):
        self.state = None
        self.num = 1
        self.rank = 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
            self.state = PartialState(cpu=cpu, timeout=DIST_TIMEOUT)
            self.num = self.state.num_processes
            self.rank = self.state.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def close(self) -> None:
        if self.state is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ------------------------------------------------------------------ the run


@dataclass
class BatchStats:
    """What one call of `run_batch` did (for this process)."""

    rows: int = 0  # rows in the input
    skipped: int = 0  # rows whose output was already written (resume)
    served: int = 0  # rows this process sent to the recommender
    errors: int = 0  # error rows in OUT (rank 0; other ranks: error rows they wrote)
    seconds: float = 0.0  # the whole call: reading, building the recommender, serving, merging
    serve_seconds: float = 0.0  # the serving loop of this process only
    processes: int = 1
    rank: int = 0

    @property
    def rows_per_s(self) -> float:
        """Rows this process served per second of its serving loop."""
        return self.served / self.serve_seconds if self.serve_seconds > 0 else 0.0


def run_batch(in_path: str | Path, out_path: str | Path, *, recommender=None,
              recommender_factory: Callable[[], object] | None = None, resume: bool = False,
              batch_size: int = DEFAULT_BATCH_SIZE, explain: int | None = None, trace: bool = True,
              retry_errors: bool = False, progress: bool = True) -> BatchStats:  # fmt: skip
    """Serve every row of IN into OUT (one line per row, input order); see the module docstring.

    Give a built `recommender`, or a `recommender_factory` (called once per process, rank 0 first: under a
    data-parallel launch each process builds its own). `resume` skips rows already written (OUT and any
    shards); `retry_errors` serves error rows again on resume. Progress (rows/s, ETA) goes to stderr.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if recommender is None and recommender_factory is None:
        raise InputError("run_batch needs a recommender or a recommender_factory")
    started = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise InputError(f"the output {out_path} would overwrite the input")
    rows = read_rows(in_path)
    procs = Processes()
    stats = BatchStats(rows=len(rows), processes=procs.num, rank=procs.rank)
    guard = writer = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if procs.main:
            guard = LineWriter(out_path)  # OUT is ours until the run ends (the merge replaces it)
        direct = _direct(guard, rows, resume, retry_errors) if procs.num == 1 else None
        if direct is not None:
            todo, stats.errors = direct
            stats.skipped = len(rows) - len(todo)
            writer = guard
        else:
            writer = LineWriter(shard_path(out_path, procs.rank))
            todo, stats.skipped = _sharded_setup(procs, guard, writer, rows, resume, retry_errors)
        if recommender is None:
            recommender = _build(procs, recommender_factory)
        bar = _bar(progress and procs.main, total=len(todo), procs=procs)
        serving = time.perf_counter()
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for out in serve(recommender, chunk, explain=explain, trace=trace):
                    stats.errors += "error" in out
                    writer.write(_line(out))
                writer.sync()
                stats.served += sum(row.work for row in chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
            stats.serve_seconds = time.perf_counter() - serving
        if writer is not guard:
            writer.close()
            procs.barrier()  # every shard is complete
            if procs.main:
                stats.errors = merge(out_path, rows, retry_errors=retry_errors)
            procs.barrier()
    finally:
        for held in (writer, guard):
            if held is not None:
                held.close()
        procs.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _remove_leftovers(out_path: Path, *, shards: bool) -> None:
    """Temp files of a merge that was killed (OUT itself is intact), and with `shards` the old shards."""
    for path in out_path.parent.glob(f"{out_path.name}.tmp-*"):
        path.unlink(missing_ok=True)
    if shards:
        for path in shard_paths(out_path):
            path.unlink(missing_ok=True)


def _direct(out: LineWriter, rows: list[Row], resume: bool, retry_errors: bool) -> tuple[list[Row], int] | None:
    """One process appending straight to OUT: (rows to serve, error rows kept), or None when it cannot.

    It can on a fresh run, or when OUT holds exactly the lines of the first rows, in order, and no shards
    are left from a data-parallel run; otherwise the rows go through a shard and a merge.
    """
    _remove_leftovers(out.path, shards=not resume)
    if not resume:
        out.truncate(0)
        return rows, 0
    if shard_paths(out.path):
        return None
    written, end = scan(out.path)
    if not _is_prefix(written, rows, retry_errors=retry_errors):
        return None
    out.truncate(end)  # a torn last line, if any
    return rows[len(written) :], sum(line.error for line in written)


def _sharded_setup(procs: Processes, out: LineWriter | None, own: LineWriter, rows: list[Row], resume: bool,
                   retry_errors: bool) -> tuple[list[Row], int]:  # fmt: skip
    """Prepare this process's shard and pick its rows: the same pending list is split on every process."""
    if procs.main:
        _remove_leftovers(out.path, shards=False)
    if resume:
        own.truncate(scan(own.path)[1])  # each process only ever changes its own shard
        done = _done(out_path_of(own.path), rows, retry_errors=retry_errors)
        pending = [row for row in rows if row.work and row.id not in done]
        skipped = sum(row.work for row in rows) - len(pending)
    else:
        own.truncate(0)
        if procs.main:
            out.truncate(0)
            for path in shard_paths(out.path):
                if int(path.name.rsplit("-", 1)[1]) >= procs.num:
                    path.unlink(missing_ok=True)
        pending = [row for row in rows if row.work]
        skipped = 0
    procs.barrier()  # nobody writes before every process has read the same state
    return procs.split(pending), skipped


def out_path_of(shard: Path) -> Path:
    """OUT for OUT.shard-<rank>."""
    return shard.with_name(shard.name.rsplit(".shard-", 1)[0])


def _build(procs: Processes, factory: Callable[[], object]):
    """Build the recommender; rank 0 first, so a missing index is built once, not raced."""
    if procs.state is None:
        return factory()
    with procs.state.main_process_first():
        return factory()


def _bar(enabled: bool, *, total: int, procs: Processes):
    from tqdm.auto import tqdm

    desc = "batch" if procs.num == 1 else f"batch (rank 0 of {procs.num})"
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser, *, engine_options: bool = True) -> None:
    """The `recllm batch` arguments. `engine_options=False` when the caller adds --catalog etc. itself."""
    parser.add_argument("input", type=Path, help="JSONL file, one request per line")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write, one line per row")
    parser.add_argument("--resume", action="store_true", help="keep rows already in OUTPUT, serve the rest")
    parser.add_argument("--retry-errors", action="store_true", help="with --resume, serve error rows again")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows per model call (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    parser.add_argument("--explain", type=int, default=None, metavar="N",
                        help="explain the top N items of each row (default: the recommender's; 0: fastest)")
    parser.add_argument("--no-trace", action="store_true", help="leave the trace out of each output row")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="build the recommender with this function instead (tests, custom setups)")
    if engine_options:
        parser.add_argument("--catalog", metavar="PATH", help="catalog CSV/JSONL or MovieLens folder "
                            "(default: the bundled MovieLens ml-latest-small)")  # fmt: skip
        parser.add_argument("--interactions", metavar="PATH", help="interactions CSV user_id,item_id,timestamp "
                            "(default: the bundled ratings, with the bundled catalog only)")  # fmt: skip
        parser.add_argument("--chroma-url", metavar="URL", help="a Chroma server, http://host:port "
                            "(default: the embedded store under $RECLLM_HOME)")  # fmt: skip
        parser.add_argument("--model", metavar="ID", help="Hugging Face causal LM id or folder (default: SmolLM2)")
        parser.add_argument("--adapter", metavar="PATH", help="LoRA adapter folder or name, or 'none' "
                            "(default: the shipped one for the default model)")  # fmt: skip
        parser.add_argument("--ranker", choices=("llm", "none"), help="'none': retriever order, no LLM")


def recommender_factory(args: argparse.Namespace) -> Callable[[], object]:
    """A no-argument function that builds the recommender the arguments describe."""
    if getattr(args, "factory", None):
        module, _, name = args.factory.partition(":")
        if not name:
            raise InputError(f"--factory must look like module:function, got {args.factory!r}")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"--factory {args.factory}: {exc}") from None

    def build():
        from recllm.engine import Recommender

        options = {
            key: getattr(args, key)
            for key in ("interactions", "chroma_url", "model", "adapter", "ranker")
            if getattr(args, key, None) is not None
        }
        if str(options.get("adapter", "")).lower() == "none":
            options["adapter"] = None  # the base model alone
        return Recommender(getattr(args, "catalog", None), progress=not getattr(args, "quiet", False),
                           **options)  # fmt: skip

    return build


def run(args: argparse.Namespace) -> int:
    """Run `recllm batch` from parsed arguments; prints a summary on stderr, returns the exit status."""
    stats = run_batch(
        args.input,
        args.output,
        recommender_factory=recommender_factory(args),
        resume=args.resume,
        batch_size=args.batch_size,
        explain=args.explain,
        trace=not args.no_trace,
        retry_errors=args.retry_errors,
        progress=not args.quiet,
    )
    if stats.processes > 1:  # every process: how its share went (load balance)
        print(f"recllm batch: rank {stats.rank} of {stats.processes} served {stats.served} rows in "
              f"{stats.serve_seconds:.1f} s ({stats.rows_per_s:.2f} rows/s)", file=sys.stderr)  # fmt: skip
    if stats.rank == 0:
        shards = f" on {stats.processes} processes" if stats.processes > 1 else ""
        print(f"recllm batch: {stats.rows} rows → {args.output} ({stats.skipped} already done, "
              f"{stats.rows - stats.skipped} new{shards}; {stats.errors} error rows) in {stats.seconds:.1f} s",
              file=sys.stderr)  # fmt: skip
        if stats.processes == 1:
            print(f"recllm batch: served {stats.served} rows in {stats.serve_seconds:.1f} s "
                  f"({stats.rows_per_s:.2f} rows/s)", file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m recllm.batch IN -o OUT` (the same as `recllm batch`)."""
    parser = argparse.ArgumentParser(prog="recllm batch", description="Serve a JSONL file of requests.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RecllmError as exc:
        print(f"recllm batch: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
