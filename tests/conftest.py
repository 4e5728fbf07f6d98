"""Shared test fixtures: all state under tmp dirs, tiny in-process models with the real SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _models_cache(request, tmp_path_factory):
    """Converted models (the SmolLM2 tokenizer, the dequantized default LLM) persist between test runs in
    pytest's cache folder (`.pytest_cache/d/recllm-models`), unless `$RECLLM_MODELS_CACHE` is set."""
    if os.environ.get("RECLLM_MODELS_CACHE"):
        yield
        return
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("recllm-models") if cache is not None else tmp_path_factory.mktemp("recllm-models")
    os.environ["RECLLM_MODELS_CACHE"] = str(folder)
    yield
    os.environ.pop("RECLLM_MODELS_CACHE", None)


@pytest.fixture(autouse=True)
def _recllm_home(tmp_path, monkeypatch):
    """Every test gets its own empty data home."""
    monkeypatch.setenv("RECLLM_HOME", str(tmp_path / "recllm-home"))
    # CLI runs rank in retriever order unless a test asks for the LLM (`--ranker llm`)
    monkeypatch.setenv("RECLLM_RANKER", "none")


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny random Llama (hidden 32, 2 layers) with the real SmolLM2 tokenizer: `recllm.llm.tiny_lm(0)`."""
    from recllm.llm import tiny_lm as build

    return build(seed=0)


# ---- item store / retriever fixtures (store, retrieve, cli tests) ----

SMALL_ITEMS = 300  # items in the small MovieLens subset the store/retriever/CLI tests index


@pytest.fixture(scope="session")
def embedder():
    """The real packaged all-MiniLM-L6-v2 (loaded once per test session)."""
    from recllm.embed import get_embedder

    return get_embedder()


@pytest.fixture(scope="session")
def small_catalog_files(tmp_path_factory):
    """(catalog CSV, interactions CSV): the first SMALL_ITEMS bundled movies (+ 'Heat', 'The Matrix') and
    the bundled ratings of those movies."""
    import csv

    from recllm.catalog import load_catalog, load_interactions

    full = load_catalog()
    keep = list(full.items)[:SMALL_ITEMS] + ["2571"]  # ids 1.. (Toy Story, Heat, ...) and The Matrix
    folder = tmp_path_factory.mktemp("small-catalog")
    catalog_path = folder / "small.csv"
    with catalog_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "year", "genres", "tags"])
        for item_id in keep:
            item = full.get(item_id)
            writer.writerow([item.item_id, item.title, item.year or "", "|".join(item.genres), "|".join(item.tags)])
    interactions_path = folder / "ratings.csv"
    keep_set = set(keep)
    with interactions_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for user, item, ts, rating in load_interactions().rows:
            if item in keep_set:
                writer.writerow([user, item, int(ts), rating])
    return catalog_path, interactions_path


@pytest.fixture(scope="session")
def indexed_home(tmp_path_factory, small_catalog_files, embedder):
    """A data home whose embedded Chroma holds the small catalog, indexed with the real embedder."""
    from recllm.catalog import load_catalog
    from recllm.store import ItemStore

    home = tmp_path_factory.mktemp("indexed-home")
    ItemStore(home=home).index(load_catalog(small_catalog_files[0]), embedder, progress=False)
    return home


# ---- shared helpers: ports, the small chat catalog, the one engine spy ----


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (servers started by tests bind it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


N_CHAT_ITEMS = 300  # most popular bundled movies in the chat/app test catalog (plus the ones tests name)
HEAT, TOY_STORY, MATRIX, TITANIC = "6", "1", "2571", "1721"


def small_movielens(n: int = N_CHAT_ITEMS):
    """(Catalog, Interactions): the `n` most rated bundled movies (+ the ones tests name) and their ratings."""
    from recllm.catalog import Catalog, Interactions, load_catalog, load_interactions

    full, ratings = load_catalog(), load_interactions()
    keep = [item_id for item_id, _ in ratings.popularity().most_common(n)]
    keep += [i for i in (HEAT, TOY_STORY, MATRIX, TITANIC) if i not in keep]
    wanted = set(keep)
    catalog = Catalog([item for item in full if item.item_id in wanted], name=f"chat-test-{n}",
                      columns=full.columns)
    return catalog, Interactions([row for row in ratings.rows if row[1] in wanted])


def build_recommender(home, **kwargs):
    """A real `Recommender` on `small_movielens()`, its Chroma store under `home` (indexed on first use);
    `ranker="none"` unless given."""
    from recllm.engine import Recommender

    catalog, interactions = small_movielens()
    old = os.environ.get("RECLLM_HOME")
    os.environ["RECLLM_HOME"] = str(home)
    try:
        return Recommender(catalog, interactions, progress=False, **{"ranker": "none", **kwargs})
    finally:
        if old is None:
            os.environ.pop("RECLLM_HOME", None)
        else:
            os.environ["RECLLM_HOME"] = old


@pytest.fixture(scope="session")
def chat_home(tmp_path_factory):
    """One Chroma store for the chat catalog per test run (chat, app and memory tests share it)."""
    return tmp_path_factory.getbasetemp() / "chat-store"


class SpyEngine:
    """The one test double of `request.Engine`: delegates to a real engine and records every request and
    why() question; `fail[name] = error` makes that method raise; `gate()` holds `recommend` until `release`."""

    def __init__(self, inner):
        import threading

        self.inner = inner
        self.requests: list = []
        self.whys: list = []
        self.explains: list = []  # the asks of each explain_many call
        self.fail: dict[str, Exception] = {}  # method name -> error to raise
        self.entered = threading.Event()  # a call is inside recommend()
        self.release = threading.Event()  # let it go on (set unless gated)
        self.release.set()

    def __getattr__(self, name):  # catalog, interactions, limits, embedder, describe, ...
        return getattr(self.inner, name)

    def gate(self) -> SpyEngine:
        self.release.clear()
        return self

    def _call(self, name: str) -> None:
        if name in self.fail:
            raise self.fail[name]

    def recommend(self, request=None, **fields):
        self._call("recommend")
        self.requests.append(request)
        self.entered.set()
        self.release.wait(timeout=300)
        return self.inner.recommend(request, **fields)

    def recommend_many(self, requests):
        self._call("recommend_many")
        self.requests.extend(requests)
        return self.inner.recommend_many(requests)

    def explain_stream(self, result, rank, deadline=None):
        self._call("explain_stream")
        return self.inner.explain_stream(result, rank, deadline=deadline)

    def explain_many(self, asks, deadline=None):
        self._call("explain_many")
        self.explains.append(list(asks))
        return self.inner.explain_many(asks, deadline=deadline)

    def why(self, question, result, *, details=False):
        self._call("why")
        self.whys.append((question, result))
        return self.inner.why(question, result, details=details)


def wait_until_up(url: str, proc, log_path, *, timeout: float, name: str) -> None:
    """Poll `url` until it answers; RuntimeError with the server log's tail when `proc` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log_path.read_text()[-3000:]}") from None
            time.sleep(0.3)
