"""What the chat remembers about a person between sessions, and `recllm forget --user ID` removing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recllm import memory
from recllm.chat import ChatSession
from recllm.errors import InputError
from test_chat import build_recommender, ids


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return build_recommender(tmp_path_factory.getbasetemp() / "chat-store")


def test_records_roundtrip_last_thumb_wins_and_torn_lines_are_skipped(tmp_path):
    mem = memory.Memory("cat", folder=tmp_path / "cat")
    mem.add("u1", {"kind": "feedback", "item_id": "a", "up": True})
    mem.add("u1", {"kind": "feedback", "item_id": "b", "up": False})
    mem.add("u1", {"kind": "feedback", "item_id": "a", "up": False})  # changed their mind
    mem.add("u1", {"kind": "message", "role": "user", "content": "x" * (memory.MAX_RECORD_CHARS + 5)})
    mem.add("u2", {"kind": "feedback", "item_id": "c", "up": True})
    with open(mem.path("u1"), "ab") as f:
        f.write(b'{"t": 1, "user": "u1", "kind": "feedb')  # a write cut short by a kill
    assert mem.feedback("u1") == ([], ["b", "a"])
    assert mem.feedback("u2") == (["c"], [])
    assert len(mem.records("u1")[-1]["content"]) == memory.MAX_RECORD_CHARS
    assert "u1" not in mem.path("u1").name  # file names are digests, never the user id
    assert mem.records("nobody") == [] and mem.feedback("nobody") == ([], [])
    for bad in ("", "  ", "u" * (memory.MAX_USER_CHARS + 1)):
        with pytest.raises(InputError):
            mem.add(bad, {"kind": "message"})


def test_forget_removes_one_person_under_every_catalog(tmp_path):
    base = tmp_path / "memory"
    for catalog in ("movies", "books"):
        memory.Memory(catalog, folder=base / catalog).add("7", {"kind": "message", "content": "hi"})
    memory.Memory("movies", folder=base / "movies").add("8", {"kind": "message", "content": "hello"})
    removed = memory.forget("7", base)
    assert len(removed) == 2 and not any(p.exists() for p in removed)
    assert memory.Memory("movies", folder=base / "movies").records("8")  # someone else's stays
    assert memory.forget("7", base) == []


def test_a_returning_user_gets_their_thumbs_back_until_forgotten(rec, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLLM_HOME", str(tmp_path / "home"))
    mem = memory.Memory(rec.catalog.name)
    user, other = rec.interactions.users[0], rec.interactions.users[1]

    first = ChatSession(rec, memory=mem)
    shown = ids(first.use_user(user))
    first.feedback(shown[0], up=False)
    first.feedback(shown[1], up=True)
    first.respond("something funny")
    kinds = [(r["kind"], r.get("role")) for r in mem.records(user)]
    assert ("feedback", None) in kinds and ("message", "user") in kinds and ("message", "assistant") in kinds
    ChatSession(rec, memory=mem).use_user(other)  # another person's records live beside them
    anonymous = ChatSession(rec, memory=mem)
    anonymous.respond("I loved Heat")  # no user id: nothing is kept
    assert sorted(p.name for p in mem.folder.iterdir()) == sorted({mem.path(user).name, mem.path(other).name})

    again = ChatSession(rec, memory=mem)
    reply = again.use_user(user)
    assert again.liked == [shown[1]] and again.disliked == [shown[0]]
    assert shown[0] not in ids(reply) and "remember" in reply.text

    env = {**os.environ, "RECLLM_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "recllm", "forget", "--user", user], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "removed 1 file" in out.stdout, out.stderr
    assert not mem.path(user).exists() and mem.records(other)
    fresh = ChatSession(rec, memory=mem)
    fresh.use_user(user)
    assert fresh.liked == [] and fresh.disliked == []
    again_out = subprocess.run([sys.executable, "-m", "recllm", "forget", "--user", "nobody"], env=env,
                               capture_output=True, text=True, timeout=120)
    assert again_out.returncode == 0 and "Nothing recorded" in again_out.stdout


def test_a_failing_disk_does_not_break_the_chat(rec, tmp_path):
    folder = tmp_path / "ro"
    folder.write_text("a file where the folder should be")  # every write fails
    session = ChatSession(rec, memory=memory.Memory(rec.catalog.name, folder=folder))
    reply = session.use_user(rec.interactions.users[0])
    assert reply.intent == "recommend" and reply.items
    assert json.loads(json.dumps(session.profile()))["user"] == rec.interactions.users[0]
