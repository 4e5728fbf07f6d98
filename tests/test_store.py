"""ItemStore over a real embedded Chroma in tmp dirs: round trip, incremental re-index, resume after a
killed run, filters, collaborative vectors and clear errors for a broken store."""

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recllm.catalog import Catalog, Item, load_catalog
from recllm.errors import CatalogError, StoreError
from recllm.retrieve import Filters
from recllm.store import HASH_KEY, ItemStore, collection_name, item_metadata, where_clause

REPO = Path(__file__).resolve().parents[1]


class FakeEmbedder:
    """Deterministic hash vectors (no model): counts encode calls; can fail after N batches."""

    def __init__(self, model_id="fake-embedder", dim=16, fail_after=None):
        self.model_id, self.dim = model_id, dim
        self.calls = 0
        self.texts = 0
        self.fail_after = fail_after

    def encode(self, texts, batch_size=64, progress=True):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a run
        self.calls += 1
        self.texts += len(texts)
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def vector(self, text):
        seed = int.from_bytes(hashlib.sha256(f"{self.model_id}|{text}".encode()).digest()[:8], "little")
        vec = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return vec / np.linalg.norm(vec)


def make_catalog(n=40, name="toy", **changes):
    genres = ["Action", "Comedy", "Drama", "Sci-Fi"]
    items = []
    for i in range(n):
        item = Item(item_id=f"i{i}", title=f"Film {i}", year=1980 + i % 30,
                    genres=(genres[i % 4],) if i % 10 else (), tags=("tag",), extra={"lang": "en" if i % 2 else "fr"})
        items.append(changes.get(item.item_id, item))
    return Catalog([x for x in items if x is not None], name=name, columns=("item_id", "title", "year", "genres", "lang"))


def test_round_trip(tmp_path):
    catalog, emb = make_catalog(), FakeEmbedder()
    store = ItemStore(home=tmp_path)
    stats = store.index(catalog, emb, batch_size=16, progress=False)
    assert (stats.total, stats.added, stats.embedded, stats.deleted) == (40, 40, 40, 0)
    assert store.count(catalog) == 40
    assert sorted(store.ids(catalog)) == sorted(catalog.items)
    np.testing.assert_allclose(store.vectors(catalog, ["i3", "i1"]), np.stack([emb.vector(catalog.get(i).text) for i in ("i3", "i1")]), atol=1e-6)
    assert store.is_current(catalog, emb)
    assert (tmp_path / "chroma").is_dir()
    # nearest to an item's own vector is the item itself; similarity ~1
    top = store.query(catalog, emb.vector(catalog.get("i7").text), k=3)
    assert top[0][0] == "i7" and top[0][1] == pytest.approx(1.0, abs=1e-4)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    # a second store object on the same folder sees the same data
    assert ItemStore(home=tmp_path).count(catalog) == 40


def test_metadata_for_filters():
    item = Item("7", "Heat", 1995, ("Action", "Crime"), ("pacino",), extra={"lang": "en"})
    meta = item_metadata(item)
    assert meta["year"] == 1995 and meta["genres"] == ["action", "crime"] and meta["lang"] == "en"
    assert "genres" not in item_metadata(Item("8", "Untitled"))  # Chroma refuses empty lists
    assert where_clause(None) is None and where_clause(Filters()) is None
    assert where_clause(Filters(genres=("Drama",))) == {"genres": {"$contains": "drama"}}
    clause = where_clause(Filters(genres=("A", "B"), year_min=1990, year_max=1999))
    assert clause["$and"][0] == {"$or": [{"genres": {"$contains": "a"}}, {"genres": {"$contains": "b"}}]}
    assert collection_name("items", "my catalog!") == "items__my-catalog"


def test_query_filters_and_exclusions(tmp_path):
    catalog, emb = make_catalog(), FakeEmbedder()
    store = ItemStore(home=tmp_path)
    store.index(catalog, emb, progress=False)
    vec = emb.vector("anything")
    everything = store.query(catalog, vec, k=100)
    assert len(everything) == 40
    cases = [
        Filters(genres=("comedy",)),
        Filters(genres=("Comedy", "Drama"), year_min=1985, year_max=1995),
        Filters(exclude_genres=("Action",)),
        Filters(year_min=2000),
        Filters(where={"lang": "fr"}, exclude_ids=frozenset({"i2", "i4"})),
    ]
    for filters in cases:
        expected = [i for i, _ in everything if filters.accepts(catalog.get(i))]
        got = store.query(catalog, vec, k=100, filters=filters)
        assert [i for i, _ in got] == expected, filters
    # excluded ids are over-fetched for: still exactly k results
    first = [i for i, _ in everything[:5]]
    got = store.query(catalog, vec, k=5, exclude_ids=first)
    assert [i for i, _ in got] == [i for i, _ in everything[5:10]]
    with pytest.raises(CatalogError, match="no column nope"):
        store.query(catalog, vec, k=5, filters=Filters(where={"nope": 1}))


def test_unchanged_reindex_does_no_embedding_work(tmp_path):
    catalog = make_catalog(200)
    store = ItemStore(home=tmp_path)
    store.index(catalog, FakeEmbedder(), progress=False)
    again = FakeEmbedder()
    started = time.perf_counter()
    stats = ItemStore(home=tmp_path).index(make_catalog(200), again, progress=False)
    assert again.calls == 0 and stats.embedded == 0 and stats.unchanged == 200
    assert time.perf_counter() - started < 5
    verified = ItemStore(home=tmp_path).index(make_catalog(200), again, progress=False, verify=True)
    assert again.calls == 0 and verified.unchanged == 200  # every stored hash compared: still no work


def test_interrupted_run_is_never_taken_as_current(tmp_path):
    """v1 indexed; a run for v2 dies half-way; back to v1: the half-written v2 items are re-embedded."""
    v1 = make_catalog(40)
    v2 = make_catalog(40, **{f"i{i}": Item(f"i{i}", f"Changed {i}", 2001) for i in range(40)})
    store = ItemStore(home=tmp_path)
    store.index(v1, FakeEmbedder(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        store.index(v2, FakeEmbedder(fail_after=1), batch_size=10, progress=False)
    assert not store.is_current(v1, FakeEmbedder())
    again = FakeEmbedder()
    stats = store.index(v1, again, batch_size=10, progress=False)
    assert stats.updated == 10 and again.texts == 10
    assert store.is_current(v1, FakeEmbedder())


def test_changed_added_and_removed_items(tmp_path):
    store, emb = ItemStore(home=tmp_path), FakeEmbedder()
    store.index(make_catalog(40), emb, progress=False)
    changed = make_catalog(42, **{"i5": Item("i5", "Film 5, director's cut", 1985), "i6": None})
    counting = FakeEmbedder()
    stats = store.index(changed, counting, progress=False)
    assert (stats.added, stats.updated, stats.deleted, stats.embedded) == (2, 1, 1, 3)
    assert counting.texts == 3
    assert sorted(store.ids(changed)) == sorted(changed.items)
    np.testing.assert_allclose(store.vectors(changed, ["i5"])[0], emb.vector(changed.get("i5").text), atol=1e-6)


def test_other_embedder_model_rebuilds(tmp_path):
    catalog, store = make_catalog(), ItemStore(home=tmp_path)
    store.index(catalog, FakeEmbedder(), progress=False)
    other = FakeEmbedder(model_id="other-model", dim=8)
    assert not store.is_current(catalog, other)
    stats = store.index(catalog, other, progress=False)
    assert stats.rebuilt and stats.embedded == 40
    assert store.vectors(catalog, ["i0"]).shape == (1, 8)
    assert store.info(catalog)["recllm_model"] == "other-model"


def test_interrupted_index_resumes_without_loss(tmp_path):
    catalog, store = make_catalog(100), ItemStore(home=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.index(catalog, FakeEmbedder(fail_after=3), batch_size=10, progress=False)
    assert store.count(catalog) == 30
    assert not store.is_current(catalog, FakeEmbedder())  # an unfinished run is never "current"
    resume = FakeEmbedder()
    stats = ItemStore(home=tmp_path).index(catalog, resume, batch_size=10, progress=False)
    assert (stats.unchanged, stats.embedded, resume.texts) == (30, 70, 70)
    ids = store.ids(catalog)
    assert len(ids) == len(set(ids)) == 100 and set(ids) == set(catalog.items)


def _index_cmd(catalog_path, batch_size):
    return [sys.executable, "-m", "recllm", "index", "--catalog", str(catalog_path), "--batch-size", str(batch_size)]


def _run_until(cmd, env, min_done, sig):
    """Start `cmd`, wait until its progress bar shows >= min_done items, then send `sig`."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        chunk = proc.stderr.read() or b""
        seen += chunk
        done = [int(m) for m in re.findall(rb"indexing [^\r\n|]*\|[^|]*\| *(\d+)/\d+ \[", seen)]
        if done and max(done) >= min_done:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    return proc, seen.decode(errors="replace") + (proc.stderr.read() or b"").decode(errors="replace")


_STATE = """
import json, sys
from recllm.catalog import load_catalog
from recllm.store import HASH_KEY, ItemStore
catalog = load_catalog(sys.argv[1])
store = ItemStore()
got = store._collection("items", catalog.name).get(include=["metadatas"]) if store.has(catalog) else {"ids": [], "metadatas": []}
print(json.dumps({"count": store.count(catalog), "ids": got["ids"],
                  "hashes_ok": all(m[HASH_KEY] == catalog.get(i).content_hash for i, m in zip(got["ids"], got["metadatas"])),
                  "current": store.info(catalog).get("recllm_fingerprint") == catalog.fingerprint}))
"""


def _stored_state(catalog_path, env):
    """The store as a fresh process sees it (this process keeps no Chroma state of that folder)."""
    import json

    out = subprocess.run([sys.executable, "-c", _STATE, str(catalog_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_killed_index_run_resumes_exactly(tmp_path, small_catalog_files):
    """kill -9 in the middle of `recllm index`, then rerun: count and ids exact, no work redone."""
    catalog_path = small_catalog_files[0]
    env = dict(os.environ, RECLLM_HOME=str(tmp_path / "home"))
    catalog = load_catalog(catalog_path)
    proc, err = _run_until(_index_cmd(catalog_path, 16), env, 48, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    state = _stored_state(catalog_path, env)  # read by another process: this one never opens that store
    killed_count = state["count"]
    assert 48 <= killed_count < len(catalog), err
    assert len(state["ids"]) == len(set(state["ids"])) == killed_count and state["hashes_ok"]
    assert not state["current"]

    done = subprocess.run(_index_cmd(catalog_path, 16), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(catalog) - killed_count} added, 0 updated, 0 deleted, {killed_count} unchanged" in done.stdout
    store = ItemStore(home=tmp_path / "home")
    ids = store.ids(catalog)
    assert len(ids) == len(set(ids)) == len(catalog) == store.count(catalog)
    assert set(ids) == set(catalog.items)
    assert store.is_current(catalog, FakeEmbedder(model_id="sentence-transformers/all-MiniLM-L6-v2"))
    got = store._collection("items", catalog.name).get(include=["metadatas"])
    assert all(meta[HASH_KEY] == catalog.get(i).content_hash for i, meta in zip(got["ids"], got["metadatas"]))


def test_collaborative_vectors_round_trip(tmp_path):
    catalog, store = make_catalog(), ItemStore(home=tmp_path)
    rng = np.random.default_rng(0)
    ids = list(catalog.items) + ["not-in-catalog"]
    vectors = rng.standard_normal((len(ids), 8)).astype(np.float32)
    assert store.put_vectors(catalog, "seq", ids, vectors, model="sasrec-test") == 40
    user = rng.standard_normal(8).astype(np.float32)
    expected = sorted(zip(ids[:-1], vectors[:-1] @ user), key=lambda p: -p[1])
    got = store.query_vectors(catalog, "seq", user, k=5)
    assert [i for i, _ in got] == [i for i, _ in expected[:5]]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected[:5]], rtol=1e-4, atol=1e-4)
    drama = store.query_vectors(catalog, "seq", user, k=50, filters=Filters(genres=("drama",)))
    assert drama and all("Drama" in catalog.get(i).genres for i, _ in drama)
    assert store.count(catalog) == 0  # the text collection is a different one
    with pytest.raises(StoreError, match="bad vector kind"):
        store.put_vectors(catalog, "items", ids[:1], vectors[:1])


def test_foreign_store_folder_is_a_store_error(tmp_path):
    (tmp_path / "chroma").mkdir()
    (tmp_path / "chroma" / "chroma.sqlite3").write_text("not a database")
    with pytest.raises(StoreError) as info:
        ItemStore(home=tmp_path).count(make_catalog())
    message = str(info.value)
    assert "\n" not in message and "move or delete" in message and str(tmp_path / "chroma") in message


def test_store_path_is_a_file(tmp_path):
    (tmp_path / "chroma").write_text("oops")
    with pytest.raises(StoreError, match="is a file"):
        ItemStore(home=tmp_path).count(make_catalog())


def test_unreachable_server_is_a_store_error():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match="cannot reach the Chroma server") as info:
        ItemStore(chroma_url=f"http://127.0.0.1:{port}").count(make_catalog())
    assert "chroma run" in str(info.value)
    with pytest.raises(StoreError, match="bad --chroma-url"):
        ItemStore(chroma_url="ftp://x").count(make_catalog())


@pytest.mark.server
def test_chroma_server_via_http_client(tmp_path):
    """The same store over `chroma run` (HttpClient): index, incremental re-index, query, vectors."""
    chroma = Path(sys.executable).parent / "chroma"
    if not chroma.exists():
        pytest.skip("the chroma server command is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(chroma), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("chroma run did not start")
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        catalog, emb = make_catalog(), FakeEmbedder()
        store = ItemStore(chroma_url=url)
        assert store.index(catalog, emb, batch_size=16, progress=False).embedded == 40
        again = FakeEmbedder()
        assert ItemStore(chroma_url=url).index(catalog, again, progress=False).unchanged == 40 and again.calls == 0
        top = store.query(catalog, emb.vector(catalog.get("i3").text), k=3, filters=Filters(year_min=1980))
        assert top[0][0] == "i3"
        assert store.vectors(catalog, ["i1"]).shape == (1, 16)
        assert not (tmp_path / "home").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
