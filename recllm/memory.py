"""What the chat remembers about a person between sessions, and `recllm forget`.

A chat that starts from a user id (the app's "Start from this user") records that person's messages, the
replies and their 👍/👎 in one JSON-lines file, `<home>/memory/<catalog>/<digest of the user id>.jsonl`;
the next session for the same user starts with those likes and dislikes. Anonymous chats are not recorded.

Each record is one whole line appended with `recllm.jsonl` (one `os.write` on an O_APPEND descriptor), so
two sessions of one person never interleave bytes and a process killed mid-write leaves at most one torn
last line, which is skipped on reading. File names are digests, so user ids never appear in paths.
`forget(user)` deletes that person's files under every catalog: this folder is the only place recllm keeps
anything about a person (the Chroma store holds catalog items only, and batch outputs are files the caller
named).

Several app replicas share one memory by pointing `RECLLM_MEMORY` at one folder (a disk they all mount): a chat
started from a user id on one replica finds the thumbs given on another, and `recllm forget` run with the same
`RECLLM_MEMORY` removes them for all. Records are read when a session starts from a user id, so nothing is cached
per process. The one-`write` appends are whole lines on a local file system; a network file system must keep
O_APPEND writes atomic (NFS does not across clients: there, serve each user from one replica at a time).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from recllm import jsonl, paths
from recllm.errors import InputError

MAX_USER_CHARS = 200  # a user id longer than this is refused
MAX_RECORD_CHARS = 20_000  # a message or reply longer than this is stored cut to this length


def root() -> Path:
    """`$RECLLM_MEMORY` when set (one folder every app replica shares), else `<home>/memory`; one folder per
    catalog inside."""
    env = os.environ.get("RECLLM_MEMORY", "").strip()
    return Path(env).expanduser() if env else paths.home() / "memory"


def _user_key(user: object) -> str:
    text = "" if user is None else str(user).strip()
    if not text:
        raise InputError("A user id is needed")
    if len(text) > MAX_USER_CHARS:
        raise InputError(f"User id is {len(text)} characters long; the limit is {MAX_USER_CHARS}")
    return text


def _digest(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:32]


def _safe_name(catalog: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(catalog)).strip("._")
    return name or "catalog"


class Memory:
    """The records of each person chatting over one catalog (see the module docstring)."""

    def __init__(self, catalog: str, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else root() / _safe_name(catalog)

    def path(self, user: object) -> Path:
        return self.folder / f"{_digest(_user_key(user))}.jsonl"

    def add(self, user: object, record: dict) -> None:
        """Append one record (a dict; a timestamp is added) for `user`."""
        user = _user_key(user)
        row = {"t": round(time.time(), 3), "user": user, **record}
        if isinstance(row.get("content"), str):
            row["content"] = row["content"][:MAX_RECORD_CHARS]
        self.folder.mkdir(parents=True, exist_ok=True)
        jsonl.append(self.path(user), row, mode=0o600)

    def records(self, user: object) -> list[dict]:
        """`user`'s records, oldest first (a torn or foreign line is skipped)."""
        user = _user_key(user)
        path = self.path(user)
        if not path.is_file():
            return []
        rows = []
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(row, dict) and row.get("user") == user:
                rows.append(row)
        return rows

    def feedback(self, user: object) -> tuple[list[str], list[str]]:
        """(liked, disliked) item ids from `user`'s thumbs, the last thumb on an item winning, oldest first."""
        last: dict[str, bool] = {}
        for row in self.records(user):
            if row.get("kind") == "feedback" and isinstance(row.get("item_id"), str):
                last.pop(row["item_id"], None)  # re-inserted: order by the latest thumb
                last[row["item_id"]] = bool(row.get("up"))
        return [i for i, up in last.items() if up], [i for i, up in last.items() if not up]


def forget(user: object, base: Path | None = None) -> list[Path]:
    """Delete everything recorded about `user` under every catalog; returns the files removed."""
    name = f"{_digest(_user_key(user))}.jsonl"
    base = Path(base) if base is not None else root()
    removed = []
    for path in sorted(base.glob(f"*/{name}")) if base.is_dir() else []:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
