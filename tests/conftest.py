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
