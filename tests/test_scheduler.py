"""`llm.scheduler`: concurrent calls share model calls, and every caller gets what its call alone gives.

The tiny in-process model (`tiny_lm`, real SmolLM2 tokenizer) decodes; a gate holds the worker inside one
ranking call so that the calls of several threads are surely waiting together when it goes on.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import HEAT, MATRIX, TOY_STORY, SpyEngine, build_recommender
from recllm.llm.scheduler import Scheduler, shared

PROMPTS = ["Hello there, my name is", "A", "The quick brown fox jumps over the lazy dog and then it",
           "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n", "Once upon a time, in a land far away"]


def alone(lm, prompt, n=12, **kwargs):
    return lm.generate(prompt, n, **kwargs)


def texts(rows) -> dict[int, str]:
    out: dict[int, str] = {}
    for row, piece in rows:
        out.setdefault(row, "")
        if piece is not None:
            out[row] += piece
    return out


class Gate:
    """Holds the worker inside its next ranking call until `open()`: calls submitted meanwhile wait together."""

    def __init__(self, lm, monkeypatch):
        self.inside, self.go = threading.Event(), threading.Event()
        real = lm.letter_scores

        def gated(*args, **kwargs):
            if not self.go.is_set():
                self.inside.set()
                self.go.wait(timeout=60)
            return real(*args, **kwargs)

        monkeypatch.setattr(lm, "letter_scores", gated)

    def hold(self, scheduler) -> threading.Thread:
        caller = threading.Thread(target=scheduler.letter_scores, args=(["x"], [1, 2]))
        caller.start()
        assert self.inside.wait(timeout=60)
        return caller

    def open(self) -> None:
        self.go.set()


def wait_for(condition, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def banned_rows(lm, n=12):
    """Per prompt: the first token it generates alone, banned (so the ban changes the text), plus end of text."""
    return [[[lm.tokenizer(alone(lm, p, 1), add_special_tokens=False)["input_ids"][0]],
             [lm.tokenizer.eos_token_id]] for p in PROMPTS]


def test_batched_generation_equals_each_prompt_alone(tiny_lm):
    """Left padding (prompts of 1 to 30 tokens), per-row banned tokens, stop strings, repetition penalty: the
    batched rows are exactly the prompts' texts alone, through `LM.stream_many` and through the scheduler."""
    banned = banned_rows(tiny_lm)
    plain = [alone(tiny_lm, p, 16) for p in PROMPTS]
    stop = (plain[2][4:7], plain[4][6:9])  # each cuts at least one row short
    want = [alone(tiny_lm, p, 16, banned=b, stop=stop, repetition_penalty=1.3) for p, b in zip(PROMPTS, banned)]
    assert want != [alone(tiny_lm, p, 16, stop=stop, repetition_penalty=1.3) for p in PROMPTS]  # bans matter
    assert any(len(w) < len(p) for w, p in zip(want, plain))  # a stop string cut a row
    kwargs = {"stop": stop, "repetition_penalty": 1.3, "banned": banned}
    assert texts(tiny_lm.stream_many(PROMPTS, 16, **kwargs)) == dict(enumerate(want))
    scheduler = Scheduler(tiny_lm)
    assert texts(scheduler.stream_many(PROMPTS, 16, **kwargs)) == dict(enumerate(want))
    assert [scheduler.generate(p, 16, stop=stop, repetition_penalty=1.3, banned=b)
            for p, b in zip(PROMPTS, banned)] == want


def test_threads_share_model_calls_and_get_what_they_get_alone(tiny_lm, monkeypatch):
    letters = tiny_lm.letter_token_ids(20, prefix="Answer: (")
    score_prompts = [f"{p}\nAnswer: (" for p in PROMPTS]
    want_scores = [tiny_lm.letter_scores([p], letters) for p in score_prompts]
    want_texts = [alone(tiny_lm, p, 12) for p in PROMPTS]
    scheduler = Scheduler(tiny_lm)
    gate = Gate(tiny_lm, monkeypatch)
    held = gate.hold(scheduler)
    got: dict[int, tuple] = {}

    def call(i):
        scores = scheduler.letter_scores([score_prompts[i]], letters)
        got[i] = (scores, "".join(scheduler.stream(PROMPTS[i], 12)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    wait_for(lambda: len(scheduler._scores) == len(PROMPTS))
    gate.open()
    for t in threads + [held]:
        t.join(timeout=120)
    for i in range(len(PROMPTS)):
        scores, text = got[i]
        assert text == want_texts[i]
        np.testing.assert_allclose(scores, want_scores[i], atol=1e-4, rtol=1e-4)  # float32, as LM batches
        assert np.argmax(scores) == np.argmax(want_scores[i])
    assert scheduler.model_calls["score"] == 2  # the gate's call, then all five callers' prompts in one
    assert scheduler.model_calls["prefill"] < len(PROMPTS)  # generations merged (they arrived close together)
    decoded_alone = sum(len(tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in want_texts)
    assert scheduler.model_calls["decode"] < decoded_alone / 2


def test_a_call_arriving_mid_decode_joins_the_running_batch(tiny_lm, monkeypatch):
    """Continuous batching: a call that arrives while a generation decodes joins it at the next step."""
    eos = [[tiny_lm.tokenizer.eos_token_id]]
    long_want = alone(tiny_lm, PROMPTS[0], 40, banned=eos)
    short_want = alone(tiny_lm, PROMPTS[2], 6, banned=eos)
    scheduler = Scheduler(tiny_lm)
    gate = Gate(tiny_lm, monkeypatch)
    long_rows = scheduler.stream_many([PROMPTS[0]], 40, banned=[eos])
    long_text = next(long_rows)[1]  # decoding has started
    held = gate.hold(scheduler)  # the worker stops between two decode steps
    short = {}
    caller = threading.Thread(target=lambda: short.setdefault("text", scheduler.generate(PROMPTS[2], 6, banned=eos)))
    caller.start()
    wait_for(lambda: len(scheduler._waiting) == 1)
    assert len(scheduler._rows) == 1  # the long call is mid-way
    gate.open()
    caller.join(timeout=120)
    held.join(timeout=120)
    for _, piece in long_rows:
        long_text += piece or ""
    assert (long_text, short["text"]) == (long_want, short_want)
    assert scheduler.model_calls["prefill"] == 2 and scheduler.model_calls["decode"] == 39  # no extra steps


def test_calls_are_served_first_come_first_served_within_the_batch_size(tiny_lm, monkeypatch):
    """With room for two rows, two-row calls run one after another in arrival order; a call larger than the
    batch runs when the batch is empty; nobody waits forever."""
    scheduler = Scheduler(tiny_lm, max_rows=2)
    admitted = []  # (prompts of each call joining, rows decoding at that moment)
    prefill = scheduler._prefill

    def spy(calls):
        if calls:
            admitted.append(([c.prompts for c in calls], len(scheduler._rows)))
        prefill(calls)

    monkeypatch.setattr(scheduler, "_prefill", spy)
    gate = Gate(tiny_lm, monkeypatch)
    held = gate.hold(scheduler)
    results: dict[str, dict] = {}
    calls = {"a": PROMPTS[:2], "b": PROMPTS[2:4], "big": PROMPTS[:3], "c": PROMPTS[3:5]}
    threads = []
    for n, (name, prompts) in enumerate(calls.items(), start=1):
        threads.append(threading.Thread(target=lambda name=name, prompts=prompts: results.__setitem__(
            name, texts(scheduler.stream_many(prompts, 8)))))
        threads[-1].start()
        wait_for(lambda n=n: len(scheduler._waiting) == n)  # submitted in this order
    gate.open()
    for t in threads + [held]:
        t.join(timeout=120)
    assert admitted == [([prompts], 0) for prompts in calls.values()]  # in order, each into an empty batch
    for name, prompts in calls.items():  # every call was served, with its texts alone
        assert results[name] == {i: alone(tiny_lm, p, 8) for i, p in enumerate(prompts)}


def test_a_closed_generator_frees_its_rows(tiny_lm):
    eos = [[tiny_lm.tokenizer.eos_token_id]]
    scheduler = Scheduler(tiny_lm)
    rows = scheduler.stream_many(PROMPTS[:3], 200, banned=[eos] * 3)
    next(rows)
    rows.close()
    wait_for(lambda: not scheduler._rows)
    steps = scheduler.model_calls["decode"]
    assert steps < 50
    assert scheduler.generate(PROMPTS[0], 5) == alone(tiny_lm, PROMPTS[0], 5)  # the worker goes on serving


def test_an_error_reaches_the_caller_that_caused_it(tiny_lm, monkeypatch):
    scheduler = Scheduler(tiny_lm)
    gate = Gate(tiny_lm, monkeypatch)
    held = gate.hold(scheduler)
    outcome: dict[str, object] = {}

    def run(name, fn):
        try:
            outcome[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded for the asserts
            outcome[name] = exc

    vocab = len(tiny_lm.tokenizer) + 10
    letters = tiny_lm.letter_token_ids(3, prefix="(")
    jobs = {  # merged with the good calls; each failure is its own caller's
        "bad ban": lambda: scheduler.generate(PROMPTS[0], 6, banned=[[vocab]]),  # no such token: mid-decode
        "bad prompt": lambda: scheduler.generate(None, 6),  # not text: the merged prefill fails
        "good text": lambda: scheduler.generate(PROMPTS[1], 6),
        "bad letters": lambda: scheduler.letter_scores(["Answer: ("], [vocab]),
        "bad score prompt": lambda: scheduler.letter_scores([None], letters),  # the merged scoring fails
        "good scores": lambda: scheduler.letter_scores(["Answer: ("], letters),
    }
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    wait_for(lambda: len(scheduler._scores) + len(scheduler._waiting) == len(jobs))
    gate.open()
    for t in threads + [held]:
        t.join(timeout=120)
    assert isinstance(outcome["bad ban"], IndexError) and isinstance(outcome["bad letters"], IndexError)
    assert isinstance(outcome["bad prompt"], Exception) and isinstance(outcome["bad score prompt"], Exception)
    assert outcome["good text"] == alone(tiny_lm, PROMPTS[1], 6)
    np.testing.assert_allclose(outcome["good scores"], tiny_lm.letter_scores(["Answer: ("], letters), atol=1e-4)


def test_concurrent_recommendations_share_calls_and_equal_sequential_ones(chat_home, tiny_lm, monkeypatch):
    """6 threads calling `Recommender.recommend` (LLM ranking, 2 explanations each) get the sequential results,
    through the one scheduler of the model, in fewer model calls."""
    from recllm.llm.model import LM

    rec = build_recommender(chat_home, ranker="llm", lm=tiny_lm)
    assert isinstance(rec.lm, Scheduler) and rec.lm is shared(tiny_lm) and rec.lm.lm is tiny_lm
    asks = [[HEAT], [TOY_STORY], [MATRIX], [HEAT, TOY_STORY], [TOY_STORY, MATRIX], [MATRIX, HEAT]]

    def summary(result):
        return [(r.item_id, r.explanation, r.reason and r.reason.draft) for r in result.recommendations]

    with monkeypatch.context() as m:  # the reference: the model itself, no scheduler, one call after another
        m.setattr("recllm.llm.scheduler.shared", lambda lm: lm)
        plain = build_recommender(chat_home, ranker="llm", lm=tiny_lm)
        assert plain.lm is tiny_lm
        want = [summary(plain.recommend(history=h, k=4, explain=2)) for h in asks]
    scheduler = rec.lm
    assert not isinstance(scheduler, LM)
    before = dict(scheduler.model_calls)
    gate = Gate(tiny_lm, monkeypatch)
    held = gate.hold(scheduler)
    got: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, summary(
        rec.recommend(history=asks[i], k=4, explain=2)))) for i in range(len(asks))]
    for t in threads:
        t.start()
    wait_for(lambda: len(scheduler._scores) == len(asks))  # all six are ranking: held together
    gate.open()
    for t in threads + [held]:
        t.join(timeout=300)
    assert [got[i] for i in range(len(asks))] == want
    assert sum(bool(draft) for summary_ in want for _, _, draft in summary_) >= 6  # the model's own texts compared
    calls = {k: scheduler.model_calls[k] - before[k] for k in before}
    assert calls["score"] == 2  # the gate's, then the six ranking prompts in one
    assert calls["prefill"] < len(asks)


def test_the_deadline_still_holds_through_the_scheduler(chat_home, tiny_lm, monkeypatch):
    """Explanations whose time runs out while they wait for the model get the fallback, and their rows leave
    the batch at once."""
    rec = build_recommender(chat_home, ranker="llm", lm=tiny_lm)
    result = rec.recommend(history=[HEAT, TOY_STORY], k=3, explain=0)
    scheduler = rec.lm
    gate = Gate(tiny_lm, monkeypatch)
    held = gate.hold(scheduler)
    steps = scheduler.model_calls["decode"]
    done = threading.Event()
    caller = threading.Thread(target=lambda: (list(rec.explain_many([(result, 1), (result, 2)],
                                                                    deadline=time.monotonic() + 0.3)), done.set()))
    caller.start()
    wait_for(lambda: len(scheduler._waiting) == 1)
    time.sleep(0.4)
    gate.open()
    caller.join(timeout=120)
    held.join(timeout=120)
    assert done.is_set()
    for r in result.recommendations[:2]:
        assert r.reason.source == "fallback" and "time limit" in r.reason.rejected
    wait_for(lambda: not scheduler._rows)
    # stopped at the first pieces, not after 48 tokens: a closed call leaves at a step boundary, and on a busy
    # machine the worker may run a step or two before the caller's thread gets to close it (CI once saw 3)
    assert scheduler.model_calls["decode"] - steps <= 6


def test_a_chat_turn_streams_all_its_reasons_in_one_call(chat_home, tiny_lm):
    from recllm.chat import ChatSession

    spy = SpyEngine(build_recommender(chat_home, ranker="llm", lm=tiny_lm))
    session = ChatSession(spy, explain=3)
    replies = list(session.respond_stream("I loved Heat and Toy Story"))
    assert len(spy.explains) == 1 and [rank for _, rank in spy.explains[0]] == [1, 2, 3]
    final = replies[-1]
    assert final.done
    for card, rec in zip(final.items[:3], session.result.recommendations):
        assert card.reason == rec.explanation.strip() and card.reason


@pytest.mark.parametrize("value", ["0", "many", "-3"])
def test_bad_concurrency_setting_is_a_one_line_error(monkeypatch, value):
    import app as chat_app
    from recllm.errors import InputError

    monkeypatch.setenv("RECLLM_CONCURRENCY", value)
    with pytest.raises(InputError, match="RECLLM_CONCURRENCY"):
        chat_app.engine_concurrency()
    monkeypatch.setenv("RECLLM_CONCURRENCY", "3")
    assert chat_app.engine_concurrency() == 3
