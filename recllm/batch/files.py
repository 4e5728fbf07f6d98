"""Durable output files: OUT appended line by line, shards of a data-parallel run, resume and merge.

Each output line is written whole by one `os.write` on an O_APPEND descriptor (`recllm.jsonl`) and the file
is fsync'ed after every batch, so a process killed at any moment (kill -9 included) leaves whole lines plus at
most one torn tail; `scan` finds the whole lines and where they end, resume cuts the tail off and skips every
id already written. Under `torchrun` / `accelerate launch` every process writes `OUT.shard-<rank>`; rank 0 then
`merge`s them in input order into a temp file that replaces OUT in one rename, so OUT is never half-merged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from json.decoder import scanstring
from pathlib import Path

from recllm.batch.rows import Row
from recllm.batch.serve import encode, error_object
from recllm.errors import RecllmError
from recllm.jsonl import AppendFile

_ID_HEAD = '{"id": '  # every line we write starts with this (json.dumps keeps key order)


def open_output(path: Path) -> AppendFile:
    """OUT or a shard, held for appending whole lines and locked: a second run on it stops with an InputError."""
    return AppendFile(path, owner="recllm batch run")


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


def done_lines(out_path: Path, rows: list[Row], *, retry_errors: bool) -> dict[str, tuple[Path, Written]]:
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
    done = done_lines(out_path, rows, retry_errors=retry_errors)
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
                    f.write(encode(error_object(row, row.error)))
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


def remove_leftovers(out_path: Path, *, shards: bool) -> None:
    """Temp files of a merge that was killed (OUT itself is intact), and with `shards` the old shards."""
    for path in out_path.parent.glob(f"{out_path.name}.tmp-*"):
        path.unlink(missing_ok=True)
    if shards:
        for path in shard_paths(out_path):
            path.unlink(missing_ok=True)


def out_path_of(shard: Path) -> Path:
    """OUT for OUT.shard-<rank>."""
    return shard.with_name(shard.name.rsplit(".shard-", 1)[0])


def direct_todo(out: AppendFile, rows: list[Row], resume: bool, retry_errors: bool) -> tuple[list[Row], int] | None:
    """One process appending straight to OUT: (rows to serve, error rows kept), or None when it cannot.

    It can on a fresh run, or when OUT holds exactly the lines of the first rows, in order, and no shards
    are left from a data-parallel run; otherwise the rows go through a shard and a merge.
    """
    remove_leftovers(out.path, shards=not resume)
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
