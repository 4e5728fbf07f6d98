"""Scale-out (issue 16): two app processes (`app.py`, each with a data home of its own) share one Chroma server
(`chroma run`) and one memory folder (`RECLLM_MEMORY`). Ten sessions of five turns run at once across both
replicas with no error and no cross-talk; each person's thumbs given on one replica come back when their chat is
started again on the other; `recllm forget` (a third process) removes a person for both.

The replicas rank in retriever order (`--ranker none`) so the test runs in CI; with an LLM server they take
`--llm-url` the same way (README: Scale-out).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_until_up
from test_server import _env, chroma_url, indexed  # noqa: F401 - the Chroma server fixtures

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 10
RESTORED = "I remember your earlier thumbs: 1 liked, 0 not for you."


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(c.get("text", c) if isinstance(c, dict) else c) for c in content)
    return str(content)


@pytest.fixture(scope="module")
def replicas(indexed, small_catalog_files, tmp_path_factory):
    """(urls of two app processes, shared memory folder, their homes): each process has its own RECLLM_HOME."""
    url, _ = indexed
    catalog, interactions = small_catalog_files
    shared = tmp_path_factory.mktemp("shared-memory")
    procs, urls, logs, homes = [], [], [], []
    try:
        for name in ("a", "b"):
            home = tmp_path_factory.mktemp(f"replica-{name}")
            homes.append(home)
            port = free_port()
            log = open(home / "app.log", "wb")
            env = dict(_env(home), RECLLM_MEMORY=str(shared), GRADIO_ANALYTICS_ENABLED="False")
            procs.append(subprocess.Popen(
                [sys.executable, "app.py", "--port", str(port), "--catalog", str(catalog), "--interactions",
                 str(interactions), "--chroma-url", url, "--ranker", "none"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}/")
            logs.append((home / "app.log", log))
        deadline = time.monotonic() + 300  # for all replicas together
        for proc, app_url, (log_path, _) in zip(procs, urls, logs):
            wait_until_up(app_url, proc, log_path, timeout=max(1.0, deadline - time.monotonic()), name="replica")
        yield urls, shared, homes
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, log in logs:
            log.close()


def test_replicas_share_the_store_and_the_memory(replicas, tmp_path):
    from gradio_client import Client

    urls, shared, homes = replicas
    users = [str(u) for u in range(1, SESSIONS + 1)]
    titles = ["Heat", "Toy Story", "The Matrix", "Jumanji", "GoldenEye", "Casino", "Babe", "Sabrina", "Clueless",
              "Braveheart"][:SESSIONS]
    outcomes: dict[int, object] = {}

    def converse(n: int) -> None:  # five turns on replica n % 2
        try:
            client = Client(urls[n % 2], verbose=False)
            client.predict(users[n], api_name="/use_user")
            mine = [f'I loved "{titles[n]}"', "something older", "what do you know about me?"]
            for message in mine:
                out = client.predict(message, api_name="/chat")
            client.predict(api_name="/thumbs_up_0")  # kept in the shared memory
            said = [_text(m) for m in out[1] if m["role"] == "user"]
            replies = [_text(m) for m in out[1] if m["role"] == "assistant"]
            outcomes[n] = (said == mine, replies, titles[n] in replies[-1])
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            outcomes[n] = exc

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(outcomes) == SESSIONS
    for n, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), f"session {n}: {outcome!r}"
        own_messages, replies, own_title = outcome
        assert own_messages, f"session {n} holds another session's messages"
        assert not any("went wrong" in r for r in replies), f"session {n}: {replies}"
        assert own_title, f"session {n} profile: {replies[-1]}"
    assert len(list(shared.glob("*/*.jsonl"))) == SESSIONS  # one memory file per person, in the shared folder
    assert not any(any(home.glob("memory/*/*.jsonl")) for home in homes)  # and nowhere else

    def restart(n: int, replica: int) -> str:  # the same person starts again on a replica: the replies' text
        out = Client(urls[replica], verbose=False).predict(users[n], api_name="/use_user")
        return " ".join(_text(m) for m in out[0] if m["role"] == "assistant")

    for n in range(SESSIONS):  # each continues on the OTHER replica with exactly their own thumb (no cross-talk)
        assert RESTORED in restart(n, 1 - n % 2), f"session {n} did not continue on the other replica"

    env = dict(_env(tmp_path / "forget-home"), RECLLM_MEMORY=str(shared))
    done = subprocess.run([sys.executable, "-m", "recllm", "forget", "--user", users[0]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for replica in (0, 1):
        assert "I remember" not in restart(0, replica), "forgotten, yet remembered"
    assert RESTORED in restart(1, 0) and RESTORED in restart(1, 1)  # someone else's memory stays
