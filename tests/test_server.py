"""Chroma server mode end to end: a real `chroma run` on 127.0.0.1 (free port, tmp path); the catalog is
indexed into it with `--chroma-url`, then recommend, batch (1 and 2 processes) and a chat session run
against it. Every process gets an empty RECLLM_HOME: nothing may fall back to the embedded store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_until_up

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
ROWS = 24  # batch rows


def _env(home: Path) -> dict:
    return dict(os.environ, RECLLM_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                ANONYMIZED_TELEMETRY="False")  # fmt: skip


def _run(cmd: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    """A Chroma server of its own (`chroma run`), stopped after the module's tests."""
    exe = Path(sys.executable).with_name("chroma")
    exe = str(exe) if exe.exists() else shutil.which("chroma")
    assert exe, "the `chroma` command of chromadb is not installed"
    folder = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([exe, "run", "--path", str(folder / "db"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/api/v2/heartbeat", proc, folder / "server.log", timeout=60, name="chroma server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def indexed(chroma_url, small_catalog_files, tmp_path_factory):
    """The small catalog indexed into the server by `recllm index --chroma-url` (the real CLI)."""
    home = tmp_path_factory.mktemp("index-home")
    catalog, _ = small_catalog_files
    done = _run([sys.executable, "-m", "recllm", "index", "--catalog", str(catalog), "--chroma-url", chroma_url, "-q"],
                home)  # fmt: skip
    assert not (home / "chroma").exists(), "indexing went to the embedded store"
    return chroma_url, done


def test_index_lands_on_the_server(indexed, small_catalog_files):
    from recllm.catalog import load_catalog
    from recllm.store import ItemStore

    url, _ = indexed
    catalog = load_catalog(small_catalog_files[0])
    store = ItemStore(chroma_url=url)
    assert store.count(catalog) == len(catalog) == 301
    assert sorted(store.ids(catalog)) == sorted(catalog.items)


def test_two_processes_index_the_same_catalog_at_once(chroma_url, small_catalog_files, tmp_path):
    """Two writers racing on one new collection: both succeed, the collection holds each item once."""
    from recllm.catalog import load_catalog
    from recllm.store import ItemStore

    copy = tmp_path / "race.csv"
    shutil.copy(small_catalog_files[0], copy)
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "recllm", "index", "--catalog", str(copy), "--chroma-url", chroma_url, "-q"]
    procs = [subprocess.Popen(cmd, env=_env(home), stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    catalog = load_catalog(copy)
    store = ItemStore(chroma_url=chroma_url)
    assert store.count(catalog) == len(catalog) and sorted(store.ids(catalog)) == sorted(catalog.items)
    assert store.is_current(catalog, _embedder())


def _embedder():
    from recllm.embed import get_embedder

    return get_embedder()


def test_recommend_cli_against_the_server(indexed, small_catalog_files, tmp_path):
    url, _ = indexed
    catalog, interactions = small_catalog_files
    done = _run([sys.executable, "-m", "recllm", "recommend", "--user", "1", "-k", "5", "--json", "-q", "--catalog",
                 str(catalog), "--interactions", str(interactions), "--chroma-url", url], tmp_path)  # fmt: skip
    rows = json.loads(done.stdout)
    from recllm.catalog import load_catalog

    items = load_catalog(catalog)
    assert len(rows) == 5 and all(row["item_id"] in items for row in rows)
    assert not (tmp_path / "chroma").exists()


def _rows_file(path: Path) -> Path:
    lines = []
    for i in range(ROWS):
        if i % 3 == 0:
            row = {"id": f"u{i}", "user": str(1 + i), "k": 4}
        elif i % 3 == 1:
            row = {"id": f"h{i}", "history": ["Heat", "Toy Story"][: 1 + i % 2], "k": 3, "question": "why #1?"}
        else:
            row = {"id": f"c{i}", "messages": [{"role": "user", "content": "I loved Casino"},
                                               {"role": "user", "content": "something funny"}]}  # fmt: skip
        lines.append(json.dumps(row))
    lines.insert(5, '{"id": "ghost", "user": "nobody"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _stable(path: Path) -> list[dict]:
    """Output rows without timings (the only part that differs between runs)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.get("trace", {}).pop("timings", None)
    return rows


def test_batch_on_one_and_two_processes_sharing_the_server(indexed, small_catalog_files, tmp_path):
    """`recllm batch` against the server: torchrun with 2 processes gives the 1-process output row for row."""
    url, _ = indexed
    catalog, interactions = small_catalog_files
    src = _rows_file(tmp_path / "in.jsonl")
    args = ["--catalog", str(catalog), "--interactions", str(interactions), "--chroma-url", url, "--ranker", "none",
            "--batch-size", "4", "-q"]  # fmt: skip
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _run([sys.executable, "-m", "recllm.batch", str(src), "-o", str(one), *args], tmp_path / "home1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "recllm.batch",
                 str(src), "-o", str(two), *args], tmp_path / "home2")  # fmt: skip
    assert "on 2 processes" in done.stderr
    rows_one, rows_two = _stable(one), _stable(two)
    assert len(rows_one) == ROWS + 1
    assert rows_one == rows_two
    assert rows_one[5] == {"id": "ghost", "error": rows_one[5]["error"]} and "nobody" in rows_one[5]["error"]
    served = [row for row in rows_one if "recommendations" in row]
    assert len(served) == ROWS and all(row["recommendations"] for row in served)
    assert all(row["answer"] for row in served if row["id"].startswith("h"))
    assert not (tmp_path / "home1" / "chroma").exists() and not (tmp_path / "home2" / "chroma").exists()


def test_chat_session_against_the_server(indexed, small_catalog_files, tiny_lm, monkeypatch, tmp_path):
    from recllm.chat import ChatSession
    from recllm.engine import Recommender

    url, _ = indexed
    monkeypatch.setenv("RECLLM_HOME", str(tmp_path / "home"))
    rec = Recommender(*small_catalog_files, chroma_url=url, lm=tiny_lm, explain=0, progress=False)
    assert rec.store.where == url
    chat = ChatSession(rec, explain=1)
    reply = chat.respond("I loved Heat, something less violent please")
    assert reply.intent == "recommend" and reply.items
    assert all(card.item_id in rec.catalog and card.item_id != "6" for card in reply.items)
    assert not set(reply.items[0].genres) & {"Horror", "Thriller", "War", "Crime"}
    why = chat.respond("why the first one?")
    assert why.intent == "why" and reply.items[0].title in why.text
    assert not (tmp_path / "home" / "chroma").exists()
