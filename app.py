"""The recllm chat app: a Gradio UI over `recllm.chat.ChatSession` (it holds no recommendation logic).

    python app.py [--host 127.0.0.1] [--port 7860] [--catalog PATH] [--interactions PATH] [--model M] [--adapter A]

One `ChatSession` per browser tab (a `gr.State`), replies streamed as they are produced, item cards (title,
year, genres, the reason) with thumbs up/down that feed the session at once, a control to start from a
MovieLens user or start fresh, and a line naming the active model and adapter. Listens on 127.0.0.1 unless
told otherwise; a login is required when RECLLM_USER and RECLLM_PASSWORD are set. Gradio analytics are off
and its queue is on. `build_app(recommender)` returns the Blocks for tests and other launchers.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse
import logging
import re
import sys

import gradio as gr

from recllm.chat import DEFAULT_EXPLAIN, DEFAULT_K, ChatSession, Reply
from recllm.errors import InputError, RecllmError
from recllm.memory import Memory
from recllm.options import EngineOptions

log = logging.getLogger("recllm.app")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
ENGINE_CONCURRENCY = 8  # chat turns served at once (RECLLM_CONCURRENCY): their model calls are merged by
# `llm.scheduler` (thumbs and resets never wait for them)
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")  # no web fonts: the app works offline
CSS = """
#cards .card { border-radius: 10px; padding: 6px 10px; }
#cards .card button { min-width: 3em; }
#model-line { font-size: 0.85em; opacity: 0.8; }
"""


def engine_concurrency() -> int:
    """Chat turns served at once: `$RECLLM_CONCURRENCY`, else ENGINE_CONCURRENCY."""
    raw = os.environ.get("RECLLM_CONCURRENCY", "").strip()
    if not raw:
        return ENGINE_CONCURRENCY
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"RECLLM_CONCURRENCY must be a whole number of at least 1, not {raw[:40]!r}")
    return int(raw)


def model_line(recommender) -> str:
    """The status line: which model, adapter, retriever and catalog answer."""
    d = recommender.describe()
    return (f"Model: `{d.get('model') or 'none'}` · adapter: `{d.get('adapter') or 'none'}` · "
            f"retriever: `{d.get('retriever', '-')}` · catalog: `{d.get('catalog')}` ({d.get('items')} items)")


def inert(text: str) -> str:
    """`text` shown as Markdown without links, images or HTML: catalog text is untrusted, and a hostile title
    like `![x](http://tracker/p.png)` or `<img src=...>` must not make the browser fetch anything."""
    return re.sub(r"([\[\]<>])", r"\\\1", text)


def card_markdown(card) -> str:
    year = f" · {card.year}" if card.year else ""
    genres = inert(", ".join(card.genres) or "-")
    reason = f"\n\n{inert(card.reason)}" if card.reason else ""
    liked = " · 👍" if card.liked else ""
    return f"**#{card.rank} {inert(card.name)}**{year}{liked}  \n*{genres}*{reason}"


def build_app(recommender, *, k: int = DEFAULT_K, explain: int = DEFAULT_EXPLAIN, memory: Memory | None = None,
              ) -> gr.Blocks:
    """The chat app over `recommender` (an `engine.Recommender`); launch it with `launch()`.

    `memory`: where sessions started from a user id keep that person's turns and thumbs (None: kept nowhere).
    """

    def session_of(state) -> ChatSession:
        # created on first use, not as the State's default: gr.State deep-copies its default per browser
        if isinstance(state, ChatSession):
            return state
        return ChatSession(recommender, k=k, explain=explain, memory=memory)

    def view(session: ChatSession, reply: Reply | None = None):
        """The page for `reply` (None: the session as it is now); `card_ids` keeps which item each card shows."""
        items = reply.items if reply is not None else session.snapshot()
        cards = []
        for i in range(k):
            if i < len(items):
                cards += [gr.Group(visible=True), card_markdown(items[i])]
            else:
                cards += [gr.Group(visible=False), ""]
        messages = [{**m, "content": inert(m["content"])} for m in session.messages]
        return [messages, session, [card.item_id for card in items[:k]], model_line(recommender), *cards]

    def guarded(stream, session):
        """Replies of `stream`; an unexpected failure becomes a message, never a broken page."""
        try:
            yield from stream
        except Exception:  # noqa: BLE001 - the edge of the app: log it, tell the person
            log.exception("chat turn failed")
            session.messages.append({"role": "assistant", "content": "Sorry, something went wrong on my side."})
            yield None

    def on_message(message, state):
        session = session_of(state)
        if not (message or "").strip():
            yield ["", *view(session)]
            return
        for reply in guarded(session.respond_stream(message), session):
            yield ["", *view(session, reply)]

    def on_user(user_id, state):
        session = session_of(state)
        for reply in guarded(session.use_user_stream(user_id or ""), session):
            yield view(session, reply)

    def on_fresh(state):
        session = session_of(state)
        session.reset()
        return view(session)

    def on_thumb(index: int, up: bool):
        def handler(state, card_ids):
            session = session_of(state)
            if index < len(card_ids or ()):  # the item this card shows, whatever the list is by now
                session.feedback(card_ids[index], up)
            return view(session)

        return handler

    max_message = recommender.limits.max_message_chars
    concurrency = engine_concurrency()
    with gr.Blocks(title="recllm", analytics_enabled=False) as demo:
        state = gr.State(None)
        card_ids = gr.State([])  # item id of each card as drawn: a thumb acts on the item its card shows
        gr.Markdown("## recllm: movie recommendations you can talk to")
        status = gr.Markdown(model_line(recommender), elem_id="model-line")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chat", label="Conversation", height=560, buttons=["copy"],
                                     feedback_options=None, group_consecutive_messages=False,
                                     placeholder="Tell me a movie you like, or what you are in the mood for: "
                                                 "“a funny space movie for kids”.")
                with gr.Row():
                    box = gr.Textbox(show_label=False, placeholder="I loved Heat and Toy Story…", scale=5,
                                     elem_id="message", autofocus=True, max_length=max_message)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    user_box = gr.Textbox(label="MovieLens user id", placeholder="e.g. 42", scale=2,
                                          elem_id="user-id", max_length=40)
                    use_user = gr.Button("Start from this user", scale=1, elem_id="use-user")
                    fresh = gr.Button("Start fresh", scale=1, elem_id="start-fresh")
            with gr.Column(scale=2, elem_id="cards"):
                groups, texts, ups, downs = [], [], [], []
                for i in range(k):
                    with gr.Group(visible=False, elem_id=f"card-{i}", elem_classes="card") as group:
                        texts.append(gr.Markdown(elem_id=f"card-text-{i}"))
                        with gr.Row():
                            ups.append(gr.Button("👍 Like", size="sm", elem_id=f"up-{i}"))
                            downs.append(gr.Button("👎 Not for me", size="sm", elem_id=f"down-{i}"))
                    groups.append(group)
        cards = [c for pair in zip(groups, texts, strict=True) for c in pair]
        outputs = [chatbot, state, card_ids, status, *cards]
        for trigger in (box.submit, send.click):
            trigger(on_message, [box, state], [box, *outputs], api_name="chat" if trigger == box.submit else False,
                    concurrency_limit=concurrency, concurrency_id="engine")
        use_user.click(on_user, [user_box, state], outputs, api_name="use_user",
                       concurrency_limit=concurrency, concurrency_id="engine")
        user_box.submit(on_user, [user_box, state], outputs, api_name=False,
                        concurrency_limit=concurrency, concurrency_id="engine")
        fresh.click(on_fresh, [state], outputs, api_name="start_fresh", concurrency_limit=None)
        for i in range(k):
            ups[i].click(on_thumb(i, True), [state, card_ids], outputs, api_name=f"thumbs_up_{i}",
                         concurrency_limit=None)
            downs[i].click(on_thumb(i, False), [state, card_ids], outputs, api_name=f"thumbs_down_{i}",
                           concurrency_limit=None)
    demo.queue()
    return demo


def auth_from_env() -> tuple[str, str] | None:
    """(user, password) from RECLLM_USER / RECLLM_PASSWORD when both are set."""
    user, password = os.environ.get("RECLLM_USER"), os.environ.get("RECLLM_PASSWORD")
    return (user, password) if user and password else None


def launch(demo: gr.Blocks, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT,
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = True) -> str:
    """Start the server; returns its URL (after printing it when `block`, then serves until interrupted)."""
    demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=True, quiet=quiet,
                show_error=False, footer_links=[], run_history=False, ssr_mode=False,
                theme=gr.themes.Soft(font=SYSTEM_FONTS, font_mono=("ui-monospace", "monospace")), css=CSS)
    url = demo.local_url
    if block:
        print(f"recllm chat app running at {url}" + (" (login required)" if auth else ""), flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="The recllm chat app (Gradio).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST,
                        help=f"address to listen on (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT),
                        help=f"port (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    EngineOptions.add_arguments(parser, explain=False)
    parser.add_argument("--no-memory", action="store_true",
                        help="keep nothing after a session ends (default: a chat started from a user id keeps "
                             "that person's messages and thumbs under <home>/memory; `recllm forget` removes them)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine_concurrency()  # a bad RECLLM_CONCURRENCY is a one-line error before the model loads
        recommender = EngineOptions.from_args(args).build()
        recommender.warm()  # load the model now, so the first person does not wait for it
    except RecllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    memory = None if args.no_memory else Memory(recommender.catalog.name)
    launch(build_app(recommender, memory=memory), host=args.host, port=args.port, auth=auth_from_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
