"""Batch prompting: row checks, ordered output, batching, resume after a kill at any byte, data-parallel shards.

Most tests use `FakeRecommender`, a scripted stand-in for `engine.Recommender` (deterministic per request,
records the size of every `recommend_many` call); subprocess tests reach it with `--factory test_batch:fake`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import free_port
from recllm import batch
from recllm.batch import parse_ask, read_rows, run_batch
from recllm.errors import EmptyHistory, InputError, RecllmError, UnknownUser
from recllm.catalog import Catalog, load_catalog
from recllm.request import Limits, Request

MAX_K = Limits().max_k
MAX_TEXT_CHARS = Limits().max_query_chars
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CATALOG = Catalog(list(load_catalog())[:50], name="fake-50")  # Toy Story, Jumanji, ..., Heat (id 6), ...
ITEMS = list(CATALOG.items)


# ---------------------------------------------------------------- a scripted recommender


@dataclass
class FakeResult:
    recommendations: list[dict]
    trace: dict = field(default_factory=dict)

    def to_dict(self, trace: bool = True) -> dict:
        out = {"recommendations": self.recommendations}
        if trace:
            out["trace"] = self.trace
        return out


class FakeRecommender:
    """Recommends by hashing the request; user "ghost" is unknown, user "boom" breaks a call (a bug)."""

    catalog = CATALOG
    interactions = None
    embedder = None
    limits = Limits()

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []  # size of every recommend_many call
        self.served: list[str] = []  # user/history/query of every request served
        self.delay = delay  # seconds per call (for kill tests)

    def _one(self, request):
        try:
            self.limits.check(request)  # as the engine does
        except InputError as exc:
            return exc
        if request.user == "ghost":
            return UnknownUser("unknown user 'ghost' in the interactions")
        history = list(request.history)
        if request.user is None and not history and not request.query:
            return EmptyHistory("no usable history")
        key = json.dumps([request.user, history, request.query, request.k, repr(request.filters)])
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        picks = random.Random(seed).sample([i for i in ITEMS if i not in history], request.k)
        recs = [{"item_id": item, "title": CATALOG.get(item).label, "score": round(1 - n / 100, 3), "explanation": "",
                 "rank": n + 1} for n, item in enumerate(picks)]  # fmt: skip
        return FakeResult(recs, {"request": key})

    def recommend_many(self, requests):
        if any(r.user == "boom" for r in requests) and len(requests) > 1:
            raise RuntimeError("a row broke the batched call")
        self.calls.append(len(requests))
        if self.delay:
            time.sleep(self.delay)
        self.served.extend(json.dumps([r.user, list(r.history), r.query, repr(r.filters)]) for r in requests)
        if os.environ.get("RECLLM_FAKE_LOG"):  # which process served how many rows
            with open(os.environ["RECLLM_FAKE_LOG"], "a") as log:
                log.write(f"{os.environ.get('RANK', '0')} {len(requests)}\n")
        out = []
        for r in requests:
            if r.user == "boom":
                raise ValueError("boom")
            out.append(self._one(r))
        return out

    def why(self, question: str, result) -> str:
        ids = [rec["item_id"] for rec in result.recommendations]
        item = next((i for i in ITEMS if CATALOG.get(i).title in question), None)  # the engine: refs.why_target
        title = CATALOG.get(item).title if item else question
        if item not in ids:
            raise RecllmError(f"{title} is not among the recommendations")
        return f"{title} is number {ids.index(item) + 1}"


def fake():
    """Factory for subprocess runs (`--factory test_batch:fake`); RECLLM_FAKE_DELAY slows each call."""
    return FakeRecommender(delay=float(os.environ.get("RECLLM_FAKE_DELAY", "0")))


def make_rows(n: int, seed: int = 0, bad_every: int = 0) -> list[str]:
    """n JSONL lines, a mix of user / history / messages / question rows (and bad ones)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = rng.randrange(4)
        row: dict = {"id": f"r{i}", "k": rng.randint(1, 8)}
        if kind == 0:
            row["user"] = str(rng.randrange(1000))
        elif kind == 1:
            row["history"] = rng.sample(ITEMS, 3)
        elif kind == 2:
            row["messages"] = [{"role": "user", "content": f"I loved {CATALOG.get(rng.choice(ITEMS)).title}"},
                               {"role": "assistant", "content": "How about ...?"},
                               {"role": "user", "content": rng.choice(["something funny", "from the 90s", "older",
                                                                       "no horror please"])}]  # fmt: skip
        else:
            row["history"] = rng.sample(ITEMS, 2)
            row["question"] = "why did you suggest Toy Story?"
        lines.append(json.dumps(row))
        if bad_every and i % bad_every == bad_every - 1:
            lines.append(BAD[(i // bad_every) % len(BAD)].replace("N", str(i)))
    return lines


BAD = ['{"id": "kN", "k": 0, "user": "1"}', "{not json", '{"user": "1"}', '{"id": "gN", "user": "ghost"}',
       '{"id": "rN", "user": "1"}', '{"id": "eN", "history": []}']  # fmt: skip


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def out_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode().splitlines()]


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize(
    "row, message",
    [
        ({}, "needs a user, a history or messages"),
        ({"history": []}, "history is empty"),
        ({"user": "1", "k": "5"}, "k must be a whole number"),
        ({"user": "1", "k": True}, "k must be a whole number"),
        ({"history": "Heat"}, "history must be a list"),
        ({"history": ["Heat", 3.5]}, "history[1] must be a string"),
        ({"history": ["x" * 301]}, "history[0] is 301 characters long; the limit is 300"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]}, "characters long; the limit"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages has no user turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"user": "1", "question": "y" * (MAX_TEXT_CHARS + 1)}, "question is"),
        ({"user": "1", "colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, message):
    with pytest.raises(InputError) as info:
        parse_ask(row)
    assert message in str(info.value)


def test_good_rows():
    ask = parse_ask({"user": 42, "history": ["Heat", 6], "k": 5.0})
    assert (ask.user, ask.history, ask.k, ask.messages) == ("42", ["Heat", "6"], 5, None)
    convo = [{"role": "user", "content": "something like Heat"}, {"role": "assistant", "content": "Ronin?"},
             {"content": "  older please "}]  # fmt: skip
    assert parse_ask({"messages": convo}).messages[2] == {"role": "user", "content": "older please"}
    assert parse_ask({"history": [], "messages": convo}).history == []
    assert parse_ask({"user": "1", "k": MAX_K + 1}).k == MAX_K + 1  # a limit: the engine's to check


def limit_error(request: Request) -> str:
    """The engine's message for a request past a limit."""
    with pytest.raises(InputError) as info:
        Limits().check(request)
    return str(info.value)


def test_file_level_problems_become_error_rows(tmp_path):
    lines = ['{"id": "a", "user": "1"}', "", "{broken", "[1, 2]", '{"user": "1"}', '{"id": {"x": 1}, "user": "1"}',
             '{"id": "a", "user": "2"}', '{"id": 7, "user": "3"}', "\ufeff"]  # fmt: skip
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "bin", "user": "\xff"}\n')
    rows = read_rows(path)
    assert [(r.line, r.id, r.work) for r in rows] == [
        (1, "a", True), (3, None, False), (4, None, False), (5, None, False), (6, None, False), (7, "a", False),
        (8, "7", True), (9, None, False), (10, None, False)]  # fmt: skip
    errors = [r.error for r in rows if not r.work]
    assert errors[0].startswith("line 3: invalid JSON")
    assert errors[1] == "line 4: a row must be a JSON object, got list"
    assert errors[2] == "line 5: the row has no id"
    assert errors[3] == "line 6: id must be a string, got dict"
    assert errors[4] == "line 7: duplicate id 'a' (first on line 1)"
    assert errors[5].startswith("line 9: invalid JSON")  # a byte-order mark only counts on line 1
    assert errors[6] == "line 10: not UTF-8 text"


# ---------------------------------------------------------------- one process


def test_output_follows_input_and_bad_rows_do_not_stop_the_run(tmp_path):
    lines = make_rows(42, bad_every=7)
    src = write_input(tmp_path / "in.jsonl", lines)
    rec = FakeRecommender()
    stats = run_batch(src, tmp_path / "out.jsonl", recommender=rec, batch_size=8, progress=False)
    out = out_lines(tmp_path / "out.jsonl")
    rows = read_rows(src)
    assert len(out) == len(rows) == stats.rows
    assert [o["id"] for o in out] == [r.id for r in rows]
    for o, line in zip(out, lines):
        row = json.loads(line) if line.startswith('{"') else None
        if "error" in o:
            assert set(o) <= {"id", "line", "error"} and o["error"]
            continue
        assert len(o["recommendations"]) == row["k"] and "trace" in o
        assert ("answer" in o) == ("question" in row)
    errors = {o["id"] or o["line"]: o["error"] for o in out if "error" in o}
    assert list(errors.values()) == [
        limit_error(Request(user="1", k=0)), "line 16: invalid JSON (Expecting property name enclosed in double "
        "quotes at column 2)", "line 24: the row has no id", "unknown user 'ghost' in the interactions",
        "line 40: duplicate id 'r34' (first on line 39)", "history is empty and the row has no user or messages"]
    assert stats.errors == sum("error" in o for o in out)
    assert max(rec.calls) <= 8 and len(rec.calls) < len(rows) / 4  # model calls are batched across rows


def test_messages_rows_replay_the_conversation(tmp_path):
    """Every user turn refines the ask, as in a chat; a last turn asking "why ...?" is answered."""
    rows = [{"id": "c", "k": 3, "messages": [
                {"role": "user", "content": "I loved Heat"}, {"role": "assistant", "content": "Ronin?"},
                {"role": "user", "content": "something like Jumanji but less violent"}]},
            {"id": "w", "history": ["2"], "k": 49, "messages": [{"role": "user", "content": "why Toy Story?"}]},
            {"id": "u", "user": "7", "messages": [{"role": "user", "content": "only comedies"}]}]  # fmt: skip
    src = write_input(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    rec = FakeRecommender()
    run_batch(src, tmp_path / "out.jsonl", recommender=rec, progress=False)
    served = [json.loads(s) for s in rec.served]
    assert served[0][:3] == [None, ["6", "2"], None] and "'Horror', 'Thriller', 'War', 'Crime'" in served[0][3]
    assert served[2][:2] == ["7", []] and "genres=('Comedy',)" in served[2][3]
    out = out_lines(tmp_path / "out.jsonl")
    assert len(out[0]["recommendations"]) == 3 and "answer" not in out[0]
    assert out[1]["answer"].startswith("Toy Story is number ")


def test_answer_comes_from_why(tmp_path):
    rows = [{"id": "q1", "history": ["2"], "k": 49, "question": "why did you suggest Toy Story?"},
            {"id": "q2", "history": ["1"], "k": 3, "question": "Why Toy Story?"}]  # fmt: skip
    src = write_input(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    run_batch(src, tmp_path / "out.jsonl", recommender=FakeRecommender(), progress=False)
    q1, q2 = out_lines(tmp_path / "out.jsonl")
    assert q1["answer"].startswith("Toy Story is number ")
    assert q2["answer"] == "Toy Story is not among the recommendations" and "error" not in q2


def test_a_reset_turn_keeps_the_rows_user(tmp_path):
    """"start over" in a row's messages clears what earlier turns added, never the row's own user."""
    rows = [{"id": "u", "user": "7", "k": 3, "messages": [
        {"role": "user", "content": "I loved Heat"}, {"role": "user", "content": "start over"},
        {"role": "user", "content": "only comedies"}]}]  # fmt: skip
    src = write_input(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    rec = FakeRecommender()
    run_batch(src, tmp_path / "out.jsonl", recommender=rec, progress=False)
    user, history, _, filters = json.loads(rec.served[0])
    assert user == "7" and history == [] and "genres=('Comedy',)" in filters  # Heat is gone, the user stays


def test_questions_go_whole_to_the_recommenders_why(tmp_path):
    """Batch has no "why" parser of its own: the question text goes to `recommender.why`, as in the chat."""
    asked = []

    class Spy(FakeRecommender):
        def why(self, question, result):
            asked.append(question)
            return "because"

    rows = [{"id": "q", "history": ["1"], "k": 3, "question": "why the first one?"},
            {"id": "m", "history": ["1"], "k": 3, "messages": [{"role": "user", "content": "why did you pick #2?"}]}]
    src = write_input(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    run_batch(src, tmp_path / "out.jsonl", recommender=Spy(), progress=False)
    assert asked == ["why the first one?", "why did you pick #2?"]
    assert [o["answer"] for o in out_lines(tmp_path / "out.jsonl")] == ["because", "because"]


def test_a_row_that_breaks_the_batched_call_is_isolated(tmp_path, capsys):
    lines = [json.dumps({"id": f"r{i}", "user": "boom" if i == 2 else str(i)}) for i in range(5)]
    src = write_input(tmp_path / "in.jsonl", lines)
    run_batch(src, tmp_path / "out.jsonl", recommender=FakeRecommender(), batch_size=5, progress=False)
    out = out_lines(tmp_path / "out.jsonl")
    assert [("error" in o) for o in out] == [False, False, True, False, False]
    assert out[2]["error"] == "internal error (ValueError): boom"
    assert "Traceback" in capsys.readouterr().err


def test_no_trace_and_explain_reach_the_request(tmp_path):
    src = write_input(tmp_path / "in.jsonl", ['{"id": "a", "user": "1", "k": 2}'])
    seen = []

    class Spy(FakeRecommender):
        def recommend_many(self, requests):
            seen.extend(requests)
            return super().recommend_many(requests)

    run_batch(src, tmp_path / "out.jsonl", recommender=Spy(), explain=0, trace=False, progress=False)
    assert "trace" not in out_lines(tmp_path / "out.jsonl")[0]
    assert isinstance(seen[0], Request) and seen[0].explain == 0 and seen[0].k == 2


def test_process_serves_dicts_in_order():
    rows = [{"id": "a", "user": "1", "k": 3}, {"id": "b", "history": []}, {"id": "c", "history": ["1"], "k": 2},
            "not a dict"]  # fmt: skip
    out = list(batch.process(FakeRecommender(), rows, batch_size=2, trace=False))
    assert [o.get("id") for o in out] == ["a", "b", "c", None]
    assert len(out[0]["recommendations"]) == 3 and "history is empty" in out[1]["error"]
    assert out[3] == {"id": None, "line": 4, "error": "line 4: a row must be a JSON object, got str"}


def test_rerun_without_resume_starts_over(tmp_path):
    src = write_input(tmp_path / "in.jsonl", make_rows(5))
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "stale"}\n')
    batch.shard_path(out, 3).write_text('{"id": "r1"}\n')
    run_batch(src, out, recommender=FakeRecommender(), progress=False)
    assert [o["id"] for o in out_lines(out)] == [f"r{i}" for i in range(5)]
    assert not batch.shard_paths(out)


def test_refuses_to_overwrite_the_input(tmp_path):
    src = write_input(tmp_path / "in.jsonl", make_rows(2))
    with pytest.raises(InputError, match="overwrite the input"):
        run_batch(src, src, recommender=FakeRecommender())
    with pytest.raises(InputError, match="cannot read"):
        run_batch(tmp_path / "missing.jsonl", tmp_path / "o.jsonl", recommender=FakeRecommender())


def test_command_line(tmp_path, capsys, monkeypatch):
    """`python -m recllm.batch` / `recllm batch`: arguments, summary on stderr, one-line errors with status 1."""
    import argparse

    monkeypatch.syspath_prepend(str(TESTS))
    src = write_input(tmp_path / "in.jsonl", make_rows(6))
    out = tmp_path / "out.jsonl"
    assert batch.main([str(src), "-o", str(out), "--factory", "test_batch:fake", "-q", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert f"recllm batch: 6 rows → {out} (0 already done, 6 new; 0 error rows)" in err
    assert "served 6 rows in" in err and len(out_lines(out)) == 6
    assert batch.main([str(tmp_path / "nope.jsonl"), "-o", str(out), "--factory", "test_batch:fake"]) == 1
    assert capsys.readouterr().err.startswith("recllm batch: cannot read")
    assert batch.main([str(src), "-o", str(out), "--factory", "no_such_module:x"]) == 1
    assert "--factory no_such_module:x: No module named" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    batch.add_arguments(parser)
    args = parser.parse_args([str(src), "-o", str(out), "--adapter", "none", "--ranker", "none", "--resume"])
    built = {}
    monkeypatch.setattr("recllm.engine.Recommender", lambda *given, **kw: built.update(kw, given=given))
    batch.recommender_factory(args)()  # options.EngineOptions: the CLI's flags, built the CLI's way
    assert built["given"] == (None, None) and built["adapter"] == "none" and built["ranker"] == "none"
    assert built["progress"] is True


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An input with bad rows and its uninterrupted output."""
    folder = tmp_path_factory.mktemp("ref")
    src = write_input(folder / "in.jsonl", make_rows(30, seed=3, bad_every=5))
    run_batch(src, folder / "out.jsonl", recommender=FakeRecommender(), batch_size=4, progress=False)
    return src, (folder / "out.jsonl").read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1), batch_size=st.integers(1, 9))
def test_resume_after_a_kill_at_any_byte(tmp_path_factory, reference, cut, batch_size):
    """A kill leaves OUT cut at some byte: resume gives exactly the uninterrupted output, serving only the rest."""
    src, full = reference
    out = tmp_path_factory.mktemp("cut") / "out.jsonl"
    out.write_bytes(full[: int(len(full) * cut)])
    kept = out.read_bytes().count(b"\n")
    rec = FakeRecommender()
    stats = run_batch(src, out, recommender=rec, resume=True, batch_size=batch_size, progress=False)
    assert out.read_bytes() == full
    assert stats.skipped == kept
    work_kept = sum(1 for row in read_rows(src)[:kept] if row.work)
    assert len(rec.served) == sum(1 for row in read_rows(src) if row.work) - work_kept


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resume_from_torn_shards(tmp_path_factory, reference, data):
    """A data-parallel run killed at any moment: OUT absent or stale, shards each cut at any byte."""
    src, full = reference
    folder = tmp_path_factory.mktemp("shards")
    out = folder / "out.jsonl"
    lines = full.decode().splitlines(keepends=True)
    work = [line for line, row in zip(lines, read_rows(src)) if row.work]
    nshards = data.draw(st.integers(1, 3))
    parts: list[list[str]] = [[] for _ in range(nshards)]
    for line in work:
        parts[data.draw(st.integers(0, nshards - 1))].append(line)
    for rank, part in enumerate(parts):
        blob = "".join(part).encode()
        batch.shard_path(out, rank).write_bytes(blob[: int(len(blob) * data.draw(st.floats(0, 1)))])
    if data.draw(st.booleans()):  # a merge killed after its rename but before it removed the shards
        out.write_bytes(full[: int(len(full) * data.draw(st.floats(0, 1)))])
    if data.draw(st.booleans()):  # a merge killed before its rename
        out.with_name(out.name + ".tmp-123").write_bytes(full[:100])
    run_batch(src, out, recommender=FakeRecommender(), resume=True, progress=False)
    assert out.read_bytes() == full
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl"]


def test_resume_with_an_edited_input_keeps_one_line_per_row(tmp_path, reference):
    src, full = reference
    out = tmp_path / "out.jsonl"
    out.write_bytes(full)
    lines = src.read_text().splitlines()
    edited = write_input(tmp_path / "in.jsonl", ['{"id": "new0", "user": "5"}'] + lines + ['{"id": "new1", "k": 2, '
                                                                                           '"user": "6"}'])  # fmt: skip
    rec = FakeRecommender()
    run_batch(edited, out, recommender=rec, resume=True, progress=False)
    assert len(rec.served) == 2
    got = out_lines(out)
    assert [o["id"] for o in got] == [r.id for r in read_rows(edited)]
    before = [json.loads(x) for x in full.decode().splitlines()]
    assert [o for o in got[1:-1] if "line" not in o] == [o for o in before if "line" not in o]  # kept as written


def test_retry_errors(tmp_path):
    src = write_input(tmp_path / "in.jsonl", ['{"id": "a", "user": "1"}', '{"id": "b", "user": "2"}'])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "error": "the store was down"}\n')
    rec = FakeRecommender()
    run_batch(src, out, recommender=rec, resume=True, progress=False)
    assert out_lines(out)[0]["error"] == "the store was down" and len(rec.served) == 1
    rec = FakeRecommender()
    run_batch(src, out, recommender=rec, resume=True, retry_errors=True, progress=False)
    assert [("error" in o) for o in out_lines(out)] == [False, False] and len(rec.served) == 1


# ---------------------------------------------------------------- real processes


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1", **extra)
    return env


def _batch_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recllm.batch", str(src), "-o", str(out), "--factory", "test_batch:fake", "-q",
            *extra]  # fmt: skip


def test_kill_9_at_random_moments_then_resume(tmp_path, reference):
    """Real processes killed with SIGKILL mid-run: never a torn line after resume, exactly one line per row."""
    src, full = reference
    out = tmp_path / "out.jsonl"
    rng = random.Random(7)
    env = _env(RECLLM_FAKE_DELAY="0.03")
    sizes = []
    for attempt in range(5):
        before = out.stat().st_size if out.exists() else 0
        proc = subprocess.Popen(_batch_cmd(src, out, "--batch-size", "1", *(["--resume"] if attempt else [])),
                                env=env, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while (not out.exists() or out.stat().st_size <= before) and time.monotonic() < deadline:
            time.sleep(0.005)  # wait until this run has written something, then kill it at a random moment
        time.sleep(rng.uniform(0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = out.read_bytes()
        for line in data.splitlines(keepends=True)[:-1]:
            json.loads(line)  # every line but a possible torn tail is whole
        sizes.append(len(data))
    assert 0 < sizes[0] < sizes[-1] < len(full)  # the kills landed mid-run and every resume made progress
    done = subprocess.run(_batch_cmd(src, out, "--resume"), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == full


def test_a_second_run_on_the_same_output_is_refused(tmp_path, reference):
    """While a run writes OUT (flock), another run on OUT stops with a clear message; after a kill -9 the
    kernel drops the lock and --resume goes on."""
    src, full = reference
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(_batch_cmd(src, out, "--batch-size", "1"), env=_env(RECLLM_FAKE_DELAY="0.2"),
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (not out.exists() or not out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(InputError, match="is being written by another recllm batch run"):
            run_batch(src, out, recommender=FakeRecommender(), resume=True, progress=False)
        assert out.stat().st_size < len(full)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_batch(src, out, recommender=FakeRecommender(), resume=True, progress=False)
    assert out.read_bytes() == full


@pytest.mark.slow
def test_two_processes_match_one_row_for_row(tmp_path, reference):
    """torchrun --nproc_per_node 2 (PartialState, gloo on CPU): shards merged in input order == one process."""
    src, full = reference
    out = tmp_path / "out.jsonl"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "recllm.batch",
           str(src), "-o", str(out), "--factory", "test_batch:fake", "-q", "--batch-size", "3"]  # fmt: skip
    log = tmp_path / "served.log"
    done = subprocess.run(cmd, env=_env(RECLLM_FAKE_LOG=str(log)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == full
    assert "on 2 processes" in done.stderr
    served = {"0": 0, "1": 0}
    for entry in log.read_text().split("\n")[:-1]:
        rank, n = entry.split()
        served[rank] += int(n)
    work = sum(row.work for row in read_rows(src))
    assert served["0"] + served["1"] == work and abs(served["0"] - served["1"]) <= 1  # split evenly
    assert not batch.shard_paths(out)
    # resume on 2 processes after losing half of one shard and all of OUT
    out.unlink()
    lines = full.decode().splitlines(keepends=True)
    rows = read_rows(src)
    work = [line for line, row in zip(lines, rows) if row.work]
    batch.shard_path(out, 0).write_text("".join(work[: len(work) // 2]))
    batch.shard_path(out, 1).write_text("".join(work[len(work) // 2 : -3]) + work[-3][:10])
    cmd[cmd.index("-q")] = "--resume"
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == full


@pytest.mark.slow
def test_accelerate_launch_splits_rows_too(tmp_path, reference):
    """`accelerate launch --multi_gpu --num_processes 2` (torch elastic underneath) also runs 2 processes on
    CPU (`--cpu` would start only one); the merged output is the 1-process output."""
    src, full = reference
    out = tmp_path / "out.jsonl"
    log = tmp_path / "served.log"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "recllm.batch", str(src), "-o", str(out), "--factory", "test_batch:fake", "-q"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(RECLLM_FAKE_LOG=str(log)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == full
    assert {entry.split()[0] for entry in log.read_text().splitlines()} == {"0", "1"}


# ---------------------------------------------------------------- the real engine (tiny LM, small catalog)


@pytest.fixture(scope="module")
def real_rec(small_catalog_files, indexed_home, tiny_lm):
    """engine.Recommender on the small indexed catalog with the tiny in-process LM (explain=0: fast)."""
    from recllm.engine import Recommender

    old = os.environ.get("RECLLM_HOME")
    os.environ["RECLLM_HOME"] = str(indexed_home)
    try:
        return Recommender(*small_catalog_files, lm=tiny_lm, explain=0, progress=False)
    finally:
        os.environ["RECLLM_HOME"] = old or ""


def test_real_engine_rows(tmp_path, real_rec):
    rows = [{"id": "user", "user": "1", "k": 5},
            {"id": "titles", "history": ["Heat", "Toy Story (1995)"], "k": 3, "question": "why did you suggest #1?"},
            {"id": "chat", "k": 4, "messages": [{"role": "user", "content": "I loved Heat"},
                                                {"role": "assistant", "content": "Try Casino."},
                                                {"role": "user", "content": "something less violent"}]},
            {"id": "ghost", "user": "99999"},
            {"id": "nothing", "history": ["no such film xyz"]},
            {"id": "big", "user": "1", "k": MAX_K + 1}]  # fmt: skip
    src = write_input(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    stats = run_batch(src, tmp_path / "out.jsonl", recommender=real_rec, batch_size=4, progress=False)
    out = {o["id"]: o for o in out_lines(tmp_path / "out.jsonl")}
    assert list(out) == [r["id"] for r in rows] and stats.errors == 3
    for rid, k in (("user", 5), ("titles", 3), ("chat", 4)):
        recs = out[rid]["recommendations"]
        assert [r["rank"] for r in recs] == list(range(1, k + 1))
        assert all(r["item_id"] in real_rec.catalog for r in recs)  # only catalog items, never invented
        assert out[rid]["trace"]["ranker"]["model"] == "tiny-llama-32x2-seed0"
    assert "6" in [h["item_id"] for h in out["chat"]["trace"]["history"]]  # Heat, liked in the conversation
    assert out["chat"]["trace"]["request"]["filters"]["exclude_genres"]  # "less violent"
    assert isinstance(out["titles"]["answer"], str) and out["titles"]["answer"]
    assert out["ghost"]["error"].startswith("unknown user '99999'")
    assert "nothing to recommend from" in out["nothing"]["error"]
    assert out["big"]["error"] == limit_error(Request(user="1", k=MAX_K + 1))


def test_row_questions_are_read_like_the_chat(tmp_path, real_rec):
    """"why the first one?" in a batch row means the row's #1, as in the chat."""
    rows = [{"id": "q", "history": ["Heat", "Toy Story (1995)"], "k": 3, "question": "why the first one?"}]
    (out,) = batch.process(real_rec, rows)
    first = out["recommendations"][0]["title"]
    assert first.split(" (")[0] in out["answer"] and "not a title" not in out["answer"]


def test_limits_are_the_engines_with_its_wording(tmp_path, real_rec):
    """k and history limits are checked once, by the engine: a batch row gets the engine's message."""
    too_many = [str(i) for i in range(1, real_rec.limits.max_history + 2)]
    requests = {"big": Request(user="1", k=MAX_K + 1), "zero": Request(user="1", k=0),
                "long": Request(history=too_many)}  # fmt: skip
    expected = {}
    for rid, request in requests.items():
        with pytest.raises(InputError) as info:
            real_rec.recommend(request)
        expected[rid] = str(info.value)
    rows = [{"id": "big", "user": "1", "k": MAX_K + 1}, {"id": "zero", "user": "1", "k": 0},
            {"id": "long", "history": too_many}]  # fmt: skip
    out = {o["id"]: o["error"] for o in batch.process(real_rec, rows)}
    assert out == expected


def test_batching_does_not_change_answers(tmp_path, real_rec):
    """Rows served 8 at a time give the same lists as rows served one by one."""
    src = write_input(tmp_path / "in.jsonl", [json.dumps({"id": str(u), "user": str(u), "k": 5}) for u in range(1, 9)])
    one = list(batch.process(real_rec, [json.loads(x) for x in src.read_text().splitlines()], batch_size=1))
    run_batch(src, tmp_path / "out.jsonl", recommender=real_rec, batch_size=8, progress=False)
    eight = out_lines(tmp_path / "out.jsonl")
    for a, b in zip(one, eight):
        assert [r["item_id"] for r in a["recommendations"]] == [r["item_id"] for r in b["recommendations"]]
        assert [r["score"] for r in a["recommendations"]] == pytest.approx([r["score"] for r in b["recommendations"]],
                                                                           abs=1e-4)  # fmt: skip


def test_python_api_readme_example(tmp_path, monkeypatch, small_catalog_files, indexed_home, tiny_lm):
    """The README's Python example, on the small catalog and the tiny LM instead of the defaults."""
    import recllm

    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    monkeypatch.chdir(tmp_path)
    Path("requests.jsonl").write_text('{"id": "a", "user": "1", "k": 5}\n{"id": "b", "history": ["Heat"]}\n')
    catalog, interactions = small_catalog_files

    # --- README: Python API ---
    from recllm import Recommender
    from recllm.batch import process, run_batch
    from recllm.chat import ChatSession

    rec = Recommender(catalog, interactions, lm=tiny_lm, explain=1, progress=False)  # README: Recommender()
    result = rec.recommend(user="1", k=5)
    for r in result.recommendations:
        print(r.rank, r.title, r.score, r.explanation)
    print(rec.why("#1", result))
    result = rec.recommend(history=["Heat", "Ronin (1998)"], query="less violent", k=3)
    chat = ChatSession(rec)
    print(chat.respond("something like Heat but from the 90s").text)
    print(chat.respond("why the first one?").text)
    for out in process(rec, [{"id": "a", "user": "1", "k": 3}, {"id": "b", "history": []}]):
        print(out["id"], out.get("error") or [r["title"] for r in out["recommendations"]])
    stats = run_batch("requests.jsonl", "results.jsonl", recommender=rec, resume=True)
    print(f"{stats.served} rows served, {stats.errors} errors")
    # --- end ---

    assert recllm.Recommender is recllm.engine.Recommender
    assert len(result.recommendations) == 3 and result.recommendations[0].item_id in rec.catalog
    assert chat.shown and all(1990 <= card.year <= 1999 for card in chat.shown)
    assert stats.served == 2 and len(Path("results.jsonl").read_text().splitlines()) == 2
