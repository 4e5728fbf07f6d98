"""Append-only JSON-lines files: every line goes in whole, with one write on an O_APPEND descriptor.

One `os.write` per line (looping only on the short writes of a full disk or a signal) means writers appending
to one file never interleave bytes, and a process killed at any moment (kill -9 included) leaves whole lines
plus at most one torn last line, which readers skip (chat memory) or cut off (`truncate`, batch resume).
Batch outputs hold the file open, locked, and fsync it after each batch; chat memory appends one record a call.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from recllm.errors import InputError


def encode(record) -> bytes:
    """One line: JSON (NaN and infinities become null, as JSON has neither), UTF-8, newline-terminated.
    A value JSON cannot hold raises TypeError."""
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class AppendFile:
    """A file opened for appending whole lines (created with `mode` when missing).

    `owner` names what writes it ("recllm batch run"): the file is then locked (flock, released by the kernel
    when the process dies, kill -9 included), and a second writer gets an `InputError` instead of mixing its
    lines in."""

    def __init__(self, path: str | Path, *, mode: int = 0o644, owner: str | None = None):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
        if owner is None:
            return
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self.close()
            raise InputError(f"{self.path} is being written by another {owner}: wait for it or stop it") from None

    def write(self, line: bytes) -> None:
        """Append one whole line (see the module docstring)."""
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

    def __enter__(self) -> AppendFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append(path: str | Path, record, *, mode: int = 0o644) -> None:
    """Append `record` as one line to `path` (opened and closed for this one line)."""
    line = encode(record)
    with AppendFile(path, mode=mode) as f:
        f.write(line)
