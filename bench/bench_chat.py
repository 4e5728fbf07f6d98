"""Chat latency and memory on CPU with the default model (bundled MovieLens, packaged SmolLM2-135M-Instruct).

For each of `--turns` chat turns (after one warm-up turn) it measures, from sending the message:
  list      the ranked list (5 items) is on the page
  token     the first streamed token of the first explanation arrives
  full      the turn is complete (5 items, 3 explanations)
and reports the medians, plus the peak RSS of the process that serves the app (model, embedder, Chroma
and Gradio all live in it). `--via app` (default) serves the real Gradio app on 127.0.0.1 and drives it
with gradio_client's streaming API; `--via session` calls `ChatSession.respond_stream` directly.

    python bench/bench_chat.py [--turns 10] [--via app|session] [--json] [--screenshot docs/img/chat.png]

`--screenshot PATH` then opens the served app in Debian's Chromium, holds a short conversation (ask, refine,
why, thumbs down) and saves the page (the README's screenshot).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU figures, even on a machine with a GPU
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import json
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Recommendation turns only (each shows 5 items with 3 explanations); the first one warms up.
TURNS = [
    "I loved Heat and Toy Story",
    "a funny space movie for kids",
    "something like The Matrix but less violent",
    "I loved Pulp Fiction and Fargo",
    "only comedies",
    "something older",
    "more like #2",
    "drop #1",
    "a romantic comedy from the 90s",
    "I enjoyed Alien and Blade Runner",
    "no horror, from the 80s",
    "a documentary about music",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def via_session(recommender, messages):
    from recllm.chat import ChatSession

    session = ChatSession(recommender)
    for message in messages:
        t0 = time.perf_counter()
        t_list = t_token = None
        reply = None
        for reply in session.respond_stream(message):
            now = time.perf_counter() - t0
            if reply.intent == "thinking":
                continue
            if t_list is None and reply.items:
                t_list = now
            if t_token is None and reply.items and reply.items[0].reason:
                t_token = now
        yield message, t_list, t_token, time.perf_counter() - t0, len(reply.items), \
            sum(bool(c.reason) for c in reply.items)


SCREENSHOT_TURNS = ["I loved Heat and Toy Story", "only comedies from the 90s", "why did you suggest #2?"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def screenshot(url: str, path: Path) -> None:
    """A real conversation in Chromium: ask, refine, why, thumbs down on #1; the page saved to `path`."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=600_000)  # turns of the real model on a busy CPU can take long
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1050})
            page.set_default_timeout(600_000)
            page.goto(url)
            for n, message in enumerate(SCREENSHOT_TURNS):
                page.locator("#message textarea").fill(message)
                page.locator("#send").click()
                expect(page.locator("#chat .message-row")).to_have_count(2 * (n + 1))
                page.wait_for_function("() => !document.querySelector('.generating, .pending')")
            page.locator("#down-0").click()
            expect(page.locator("#chat")).to_contain_text("Noted: not")
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()


def via_app(recommender, messages, shot: Path | None = None):
    import app as chat_app
    from gradio_client import Client

    demo = chat_app.build_app(recommender)
    url = chat_app.launch(demo, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        for n_turn, message in enumerate(messages, start=1):
            t0 = time.perf_counter()
            t_list = t_token = None
            out = None
            job = client.submit(message, api_name="/chat")
            for out in job:  # one output per streamed update: (box, chat, status, card 1..5)
                now = time.perf_counter() - t0
                cards = [c for c in out[3:] if c]
                if not out[1] or out[1][-1]["role"] != "assistant" or len(out[1]) < 2 * n_turn:
                    continue  # the new reply is not there yet (old cards stay up meanwhile)
                if t_list is None and cards:
                    t_list = now
                if t_token is None and cards and "\n\n" in cards[0]:  # a reason follows the genres line
                    t_token = now
            full = time.perf_counter() - t0
            out = job.outputs()[-1] if job.outputs() else out
            cards = [c for c in out[3:] if c]
            yield message, t_list, t_token, full, len(cards), sum("\n\n" in c for c in cards)
        if shot is not None:
            try:
                screenshot(url, shot)
                print(f"screenshot saved to {shot}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - the figures above still count
                print(f"screenshot failed: {exc}", file=sys.stderr)
    finally:
        demo.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10, help="measured turns (after one warm-up turn)")
    parser.add_argument("--via", choices=("app", "session"), default="app")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--screenshot", type=Path, metavar="PNG", help="then save a browser screenshot (app only)")
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= len(TURNS) - 1:
        parser.error(f"--turns must be from 1 to {len(TURNS) - 1}")

    import torch

    from recllm.engine import Recommender

    t0 = time.perf_counter()
    recommender = Recommender(progress=False)
    t_index = time.perf_counter() - t0
    recommender.lm  # noqa: B018 - load the default model now
    t_model = time.perf_counter() - t0 - t_index
    if args.screenshot and args.via != "app":
        parser.error("--screenshot needs --via app")
    turns = TURNS[: args.turns + 1]
    run = via_app(recommender, turns, args.screenshot) if args.via == "app" else via_session(recommender, turns)
    rows = []
    for n, row in enumerate(run):
        message, t_list, t_token, full, items, explained = row
        if n == 0:
            print(f"warm-up: {message!r} {full:.2f}s", file=sys.stderr)
            continue
        rows.append({"message": message, "list_s": t_list, "first_token_s": t_token, "full_s": full,
                     "items": items, "explained": explained})
        print(f"{message!r}: list {t_list:.2f}s, first token "
              f"{'-' if t_token is None else f'{t_token:.2f}s'}, full {full:.2f}s ({items} items, {explained} "
              f"explained)", file=sys.stderr)

    def median(key):
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    d = recommender.describe()
    figures = {
        "via": args.via, "turns": len(rows), "model": d["model"], "adapter": d["adapter"], "catalog": d["catalog"],
        "median_list_s": median("list_s"), "median_first_token_s": median("first_token_s"),
        "median_full_turn_s": median("full_s"),
        "full_turns_with_5_items_3_explained": sum(r["items"] == 5 and r["explained"] == 3 for r in rows),
        "peak_rss_mb": round(peak_rss_mb(), 1), "startup_index_s": round(t_index, 1),
        "startup_model_s": round(t_model, 1), "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            if key != "rows":
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
