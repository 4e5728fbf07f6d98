"""The Gradio app, served for real on 127.0.0.1: a Chromium session (ask → refine → why → thumbs down), twenty
parallel gradio_client sessions that must never see each other's conversation, another session answered while
one turn is stuck in the engine, and the login.

The app runs in-process (`build_app` + `launch(block=False)`) on a free port over a real `Recommender`
(`conftest.build_recommender`); every server is closed by its fixture.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app.py lives at the top of the repository, outside the package
    sys.path.insert(0, str(ROOT))

import app as chat_app  # noqa: E402
from conftest import HEAT, TOY_STORY, SpyEngine, build_recommender, free_port  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000  # per browser wait: CPU-only CI machines can be slow


@pytest.fixture(scope="module")
def recommender(chat_home):
    return build_recommender(chat_home)  # the same store as the chat tests: the index is built once


@pytest.fixture(scope="module")
def served(recommender):
    """(url, demo) of the app on a free 127.0.0.1 port; closed after the module."""
    demo = chat_app.build_app(recommender)
    url = chat_app.launch(demo, port=free_port(), block=False)
    yield url, demo
    demo.close()


@pytest.mark.server
def test_defaults_are_local_private_and_queued(served):
    url, demo = served
    assert url.startswith("http://127.0.0.1:")
    assert chat_app.DEFAULT_HOST == "127.0.0.1" and chat_app.parse_args([]).host == "127.0.0.1"
    assert demo.analytics_enabled is False and demo.enable_queue


@pytest.mark.browser
@pytest.mark.server
def test_browser_conversation(served, recommender, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: `make browser` (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    url, _ = served
    catalog = recommender.catalog
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            cards, chat = page.locator("#cards"), page.locator("#chat")
            expect(page.locator("#model-line")).to_contain_text("catalog")

            def say(text: str, wait_for: str) -> None:
                page.locator("#message textarea").fill(text)
                page.locator("#send").click()
                expect(chat).to_contain_text(wait_for)

            def card(i: int):  # gradio puts a Group's elem_id on two nested divs
                return page.locator(f"#card-{i}").first

            def card_titles() -> list[str]:
                texts = [page.locator(f"#card-text-{i}").inner_text() for i in range(5) if card(i).is_visible()]
                return [re.match(r"#\d+ (.+?) · \d{4}", t).group(1) for t in texts if t.strip()]

            # ask
            say("I loved Heat and Toy Story", "Here are 5 picks")
            expect(card(4)).to_be_visible()
            first = card_titles()
            assert len(first) == 5 and "Heat" not in first and "Toy Story" not in first
            expect(page.locator("#card-text-0")).to_contain_text("which you liked")  # the reason

            # refine: only comedies -> every card is a comedy
            say("only comedies", "only Comedy")
            expect(page.locator("#card-text-0")).not_to_contain_text(first[0])
            comedies = card_titles()
            for i in range(len(comedies)):
                expect(page.locator(f"#card-text-{i}")).to_contain_text("Comedy")

            # why #2 -> answered from the trace, naming the evidence
            say("why did you suggest #2?", f"{comedies[1]} (")
            answer = chat.locator(".message-row").last.inner_text()
            assert comedies[1] in answer
            assert catalog.get(HEAT).title in answer or catalog.get(TOY_STORY).title in answer

            # thumbs down on the first card -> it disappears from the cards at once
            gone = comedies[0]
            page.locator("#down-0").click()
            expect(chat).to_contain_text(f"Noted: not {gone}")
            expect(cards).not_to_contain_text(gone)
            assert gone not in card_titles() and len(card_titles()) == 4
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


@pytest.mark.server
def test_parallel_sessions_never_mix(served, recommender):
    from gradio_client import Client

    url, _ = served
    popular = [i for i, _ in recommender.interactions.popularity().most_common(80)]
    titles = [recommender.catalog.get(i).title for i in popular if len(recommender.catalog.get(i).title) > 6][:20]
    outcomes: dict[int, object] = {}

    def converse(n: int) -> None:
        try:
            client = Client(url, verbose=False)
            mine = [f'I loved "{titles[n]}"', "what do you know about me?"]
            for message in mine:
                out = client.predict(message, api_name="/chat")
            conversation = out[1]
            said = [_text(m) for m in conversation if m["role"] == "user"]
            profile = _text(conversation[-1])
            outcomes[n] = (said == mine, titles[n] in profile,
                           [t for j, t in enumerate(titles) if j != n and t in profile])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcomes[n] = exc

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(len(titles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(titles) == 20 and len(outcomes) == len(titles)
    for n, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), f"session {n}: {outcome!r}"
        own_messages, own_title, others = outcome
        assert own_messages and own_title and others == [], f"session {n} saw {others}"


@pytest.mark.server
def test_a_slow_turn_does_not_hold_up_other_sessions(recommender):
    """While one session's turn is stuck in the engine, another session's reset and thumbs are answered (they
    are outside the engine's concurrency group), and the slow turn then completes normally."""
    from gradio_client import Client

    gated = SpyEngine(recommender).gate()
    demo = chat_app.build_app(gated)
    url = chat_app.launch(demo, port=free_port(), block=False)
    try:
        job = Client(url, verbose=False).submit("I loved Heat", api_name="/chat")
        assert gated.entered.wait(timeout=120), "the slow turn never reached the engine"
        other = Client(url, verbose=False)
        answered = []

        def cheap_calls() -> None:
            answered.append(other.predict(api_name="/start_fresh"))
            answered.append(other.predict(api_name="/thumbs_up_0"))

        caller = threading.Thread(target=cheap_calls)
        caller.start()
        caller.join(timeout=120)
        assert not caller.is_alive() and len(answered) == 2, "the other session waited for the slow turn"
        assert not job.done()  # the slow turn was in flight all along
        assert _text(answered[0][0][-1]).strip()  # the reset's own reply
        gated.release.set()
        out = job.result(timeout=300)
        assert out[1][-1]["role"] == "assistant" and "Heat" in _text(out[1][0])
    finally:
        gated.release.set()
        demo.close()


class StreamGate(SpyEngine):
    """The spy whose first reason waits until `go_on` is set (the list is on the page by then)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.streaming = threading.Event()  # the turn waits for its first reason
        self.go_on = threading.Event()

    def explain_many(self, asks, deadline=None):
        if not self.go_on.is_set():
            self.streaming.set()
            self.go_on.wait(timeout=300)
        yield from super().explain_many(asks, deadline)


@pytest.mark.server
def test_a_thumb_while_reasons_stream_lands_on_the_card_it_is_on(recommender):
    """Bug: a 👎 while reasons streamed left the dropped card on the page (cards were drawn from the turn's own
    list), and the next thumb on a card acted on `session.shown[index]`, another item. Now the cards show the
    list as it is, and a thumb acts on the item its card shows."""
    from gradio_client import Client

    gate = StreamGate(recommender)
    demo = chat_app.build_app(gate)
    url = chat_app.launch(demo, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        job = client.submit("I loved Heat and Toy Story", api_name="/chat")
        assert gate.streaming.wait(timeout=120), "the reasons never started"
        dropped = _noted(client.predict(api_name="/thumbs_down_0"), r"Noted: not (.+) \(\d{4}\)\. It's off")
        gate.go_on.set()
        final = job.result(timeout=300)
        cards = [text for text in final if isinstance(text, str) and text.startswith("**#")]
        assert len(cards) == 4 and not any(dropped in text for text in cards), cards
        shown = re.match(r"\*\*#1 (.+?)\*\*", cards[0]).group(1)
        liked = _noted(client.predict(api_name="/thumbs_up_0"), r"Noted: you like (.+) \(\d{4}\)\. I'll use")
        assert liked == shown  # the item card #1 shows, not another one
    finally:
        gate.go_on.set()
        demo.close()


def _noted(out, pattern: str) -> str:
    """The title named by the feedback reply that ends the conversation in a thumbs call's outputs."""
    text = _text(out[0][-1])
    match = re.match(pattern, text)
    assert match, text
    return match.group(1)


@pytest.mark.server
def test_login_from_environment(recommender, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("RECLLM_USER", "ana")
    monkeypatch.setenv("RECLLM_PASSWORD", "s3cret-pass")
    auth = chat_app.auth_from_env()
    assert auth == ("ana", "s3cret-pass")
    demo = chat_app.build_app(recommender)
    url = chat_app.launch(demo, port=free_port(), auth=auth, block=False)
    try:
        with pytest.raises(Exception, match="(?i)login|auth|401|403"):
            Client(url, verbose=False)  # no login: the API is closed
        client = Client(url, auth=auth, verbose=False)
        out = client.predict("what do you know about me?", api_name="/chat")
        assert out[1][-1]["role"] == "assistant"
    finally:
        demo.close()


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def test_catalog_text_cannot_put_links_images_or_html_on_the_page():
    from recllm.chat import Card

    hostile = Card("x", 1, "t (1999)", "![pixel](http://tracker.example/p.png) <img src=http://tracker.example/q.png>",
                   1999, ("[Drama](http://e.example)",), reason="see <script>x</script> [here](http://e.example)")
    shown = chat_app.card_markdown(hostile)
    for pattern in (r"(?<!\\)\[", r"(?<!\\)<"):  # every [ and < escaped: no link, image or tag can form
        assert not re.search(pattern, shown), (pattern, shown)
    assert "pixel" in shown and "Drama" in shown and "here" in shown  # the words stay readable
