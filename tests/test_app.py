"""The Gradio app, served for real on 127.0.0.1: a Chromium session (ask → refine → why → thumbs down), twenty
parallel gradio_client sessions that must never see each other's conversation, another session answered while
one turn is stuck in the engine, and the login.

The app runs in-process (`build_app` + `launch(block=False)`) on a free port over a real `Recommender`
(see `test_chat.build_recommender`); every server is closed by its fixture.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app.py lives at the top of the repository, outside the package
    sys.path.insert(0, str(ROOT))

import app as chat_app  # noqa: E402
from test_chat import HEAT, TOY_STORY, build_recommender  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000  # per browser wait: CPU-only CI machines can be slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recommender(tmp_path_factory):
    # the same folder as test_chat's store when both run: the index is built once
    return build_recommender(tmp_path_factory.getbasetemp() / "chat-store")


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
            expect(page.locator("#card-text-0")).to_contain_text("Because you liked")  # the reason

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


class GatedRecommender:
    """The real recommender whose `recommend` waits at a gate: a chat turn as slow as the test wants."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()  # a turn is inside recommend()
        self.release = threading.Event()  # let it finish

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def recommend(self, request=None, **fields):
        self.entered.set()
        self.release.wait(timeout=300)
        return self.inner.recommend(request, **fields)


@pytest.mark.server
def test_a_slow_turn_does_not_hold_up_other_sessions(recommender):
    """While one session's turn is stuck in the engine, another session's reset and thumbs are answered (they
    are outside the engine's concurrency group), and the slow turn then completes normally."""
    from gradio_client import Client

    gated = GatedRecommender(recommender)
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
