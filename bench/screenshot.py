"""The README screenshot: a real browser conversation with the chat app, saved as docs/img/chat.png.

    .venv/bin/python bench/screenshot.py [--out docs/img/chat.png] [--timeout 600] [-- APP OPTIONS]

Starts `app.py` on 127.0.0.1 (a free port; the default model and shipped adapter unless APP OPTIONS say
otherwise, e.g. `-- --adapter none`), opens it in headless Chromium (Debian's /usr/bin/chromium: `make
browser`), asks for recommendations as a person would, waits until the streamed explanations are on the cards,
asks "why #1?", waits for the answer and saves a screenshot of the page. The app is stopped at the end.
The 👍/👎 buttons need an emoji font (Debian: `apt-get install fonts-noto-color-emoji`), else they show as boxes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_load import free_port, stop  # noqa: E402 - bench/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ASK = "I loved Heat and Toy Story"
QUESTION = "why #1?"
EXPLAINED = 3  # cards that get a streamed reason (the app's default)


def start_app(port: int, app_args: list[str], log_path: Path, timeout: float) -> subprocess.Popen:
    """`app.py` on 127.0.0.1:`port`, once it answers (RuntimeError with the log's tail if it does not)."""
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--no-memory", *app_args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"app.py did not start: {log_path.read_text()[-3000:]}") from None
            time.sleep(0.5)


def converse(url: str, out: Path, timeout_ms: int) -> str:
    """Ask, wait for the reasons, ask why #1, screenshot; returns the why answer."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=timeout_ms)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            chat = page.locator("#chat")
            expect(page.locator("#model-line")).to_contain_text("catalog")

            def settle(quiet_s: float = 8.0) -> None:  # the turn is over: nothing changed on the page for a while
                deadline, last, since = time.monotonic() + timeout_ms / 1000, None, time.monotonic()
                while time.monotonic() < deadline:
                    now = page.locator("body").inner_text()
                    if now != last:
                        last, since = now, time.monotonic()
                    elif time.monotonic() - since >= quiet_s:
                        return
                    page.wait_for_timeout(250)
                raise TimeoutError("the page never stopped changing")

            def say(text: str, wait_for: str) -> None:  # a click while a turn streams is ignored: wait it out
                page.locator("#message textarea").fill(text)
                page.locator("#send").click()
                expect(chat).to_contain_text(wait_for)
                settle()

            say(ASK, "Here are")
            for i in range(EXPLAINED):  # a card's text is "#n Title · year / genres / reason" once explained
                page.wait_for_function(
                    "id => { const e = document.querySelector(id); return e && e.innerText.trim().split('\\n')"
                    ".filter(l => l.trim()).length >= 3; }", arg=f"#card-text-{i}", timeout=timeout_ms)
            say(QUESTION, "was recommended at #1")
            answer = chat.locator(".message-row").last.inner_text()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            return answer
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "chat.png")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the app to start and per wait")
    args = parser.parse_args(own)
    if not CHROMIUM.exists():
        print("error: Debian's chromium is not installed: `make browser`", file=sys.stderr)
        return 1
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / "recllm-screenshot-app.log"  # the app's output, for a failed start
    started = time.perf_counter()
    proc = start_app(port, app_args, log_path, args.timeout)
    try:
        answer = converse(f"http://127.0.0.1:{port}/", args.out, int(args.timeout * 1000))
    finally:
        stop(proc, timeout=20)
    print(f"saved {args.out} ({args.out.stat().st_size} bytes) in {time.perf_counter() - started:.0f} s")
    print(f"why answer: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
