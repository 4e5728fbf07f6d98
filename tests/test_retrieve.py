"""Retriever over the small MovieLens subset in a real Chroma: invariants (hypothesis), recency weighting,
cold-start queries, history resolution and the collaborative hook."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recllm.catalog import load_catalog, load_interactions
from recllm.errors import EmptyHistory, InputError, UnknownUser
from recllm.retrieve import Candidate, Filters, Retriever, RetrieverConfig, rrf_fuse
from recllm.store import ItemStore


@pytest.fixture(scope="module")
def catalog(small_catalog_files):
    return load_catalog(small_catalog_files[0])


@pytest.fixture(scope="module")
def retriever(catalog, indexed_home, embedder, small_catalog_files):
    return Retriever(catalog, ItemStore(home=indexed_home), embedder, load_interactions(small_catalog_files[1]))


def check_invariants(result, catalog, history, k, filters=None):
    ids = [c.item_id for c in result]
    assert len(result) <= k
    assert len(ids) == len(set(ids))
    assert all(isinstance(c, Candidate) and c.item_id in catalog for c in result)
    assert not set(ids) & set(history)
    scores = [c.score for c in result]
    assert scores == sorted(scores, reverse=True)
    if filters is not None:
        assert all(filters.accepts(catalog.get(i)) for i in ids)
        assert not set(ids) & filters.exclude_ids


GENRES = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Children", "Horror"]


@st.composite
def requests(draw, ids):
    history = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=15, unique=True))
    k = draw(st.integers(1, 30))
    filters = None
    if draw(st.booleans()):
        low = draw(st.one_of(st.none(), st.integers(1920, 2000)))
        high = draw(st.one_of(st.none(), st.integers(low or 1920, 2010)))
        filters = Filters(
            genres=tuple(draw(st.lists(st.sampled_from(GENRES), max_size=2, unique=True))),
            exclude_genres=tuple(draw(st.lists(st.sampled_from(GENRES), max_size=1))),
            year_min=low, year_max=high,
            exclude_ids=frozenset(draw(st.lists(st.sampled_from(ids), max_size=10))),
        )
    query = draw(st.one_of(st.none(), st.sampled_from(["space adventure", "romantic comedy in Paris", "toys"])))
    return history, k, filters, query


def test_invariants_hold_for_random_requests(retriever, catalog):
    ids = list(catalog.items)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests(ids))
    def check(request):
        history, k, filters, query = request
        result = retriever.retrieve(history=history, k=k, filters=filters, query=query)
        check_invariants(result, catalog, history, k, filters)
        if filters is None:  # nothing filtered: exactly k when the catalog has enough items
            assert len(result) == min(k, len(catalog) - len(history))

    check()


def test_full_history_excluded_and_exact_k(retriever, catalog):
    history = list(catalog.items)[:250]
    result = retriever.retrieve(history=history, k=20)
    assert len(result) == 20
    check_invariants(result, catalog, history, 20)
    everything_else = retriever.retrieve(history=history, k=500)
    assert {c.item_id for c in everything_else} == set(catalog.items) - set(history)


def test_recency_weighting(retriever, catalog):
    weights = retriever.recency_weights(4)
    np.testing.assert_allclose(weights, [0.9 ** 3, 0.9 ** 2, 0.9, 1.0], rtol=1e-6)
    history = ["1", "6", "32", "50"]
    vectors = retriever.store.vectors(catalog, history)
    expected = weights @ vectors
    np.testing.assert_allclose(retriever.history_vector(history), expected / np.linalg.norm(expected), atol=1e-5)
    # only the newest max_history items count
    short = Retriever(catalog, retriever.store, retriever.embedder, config=RetrieverConfig(max_history=2))
    np.testing.assert_allclose(short.history_vector(history), short.history_vector(history[-2:]), atol=1e-6)


def test_newest_item_pulls_hardest(retriever):
    """The same items in another order give another list: the newest one dominates."""
    kids_last = retriever.retrieve(history=["6", "1"], k=5)  # Heat, then Toy Story
    crime_last = retriever.retrieve(history=["1", "6"], k=5)
    assert [c.item_id for c in kids_last] != [c.item_id for c in crime_last]


def test_query_alone_is_a_cold_start(retriever, catalog):
    result = retriever.retrieve(history=[], k=5, query="animated film about toys that come to life")
    assert "1" in [c.item_id for c in result]  # Toy Story
    check_invariants(result, catalog, [], 5)
    top = [c.item_id for c in retriever.search("post-apocalyptic sci-fi with martial arts and philosophy", k=3)]
    assert "2571" in top  # The Matrix (its tags)


def test_query_blends_with_history(retriever):
    plain = [c.item_id for c in retriever.retrieve(history=["6"], k=10)]
    blended = [c.item_id for c in retriever.retrieve(history=["6"], k=10, query="animated children's film")]
    assert plain != blended


def test_nothing_to_go_on_is_empty_history(retriever):
    with pytest.raises(EmptyHistory):
        retriever.retrieve(history=[], k=5)
    with pytest.raises(InputError):
        retriever.search("   ")
    assert retriever.retrieve(history=["1"], k=0) == []


def test_resolve_history(retriever):
    ids, unknown = retriever.resolve_history(["Toy Story", "heat (1995)", "2571", "No Such Film At All", "toy story"])
    assert ids == ["1", "6", "2571"] and unknown == ["No Such Film At All"]
    with pytest.raises(EmptyHistory, match="No Such Film"):
        retriever.resolve_history(["No Such Film At All"])
    with pytest.raises(EmptyHistory):
        retriever.resolve_history([])


def test_user_history(retriever, catalog):
    history = retriever.user_history("1")
    assert history and all(i in catalog for i in history)
    result = retriever.retrieve(history=history, k=10)
    check_invariants(result, catalog, history, 10)
    with pytest.raises(UnknownUser):
        retriever.user_history("no-such-user")
    with pytest.raises(InputError, match="interactions"):
        Retriever(catalog, retriever.store, retriever.embedder).user_history("1")


class FakeCollaborative:
    """Random item vectors and a mean-of-history user vector: stands in for seqrec.SeqEncoder."""

    kind = "seq"

    def __init__(self, ids, dim=8):
        self.item_ids = list(ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.vectors = np.random.default_rng(1).standard_normal((len(ids), dim)).astype(np.float32)

    def encode_users(self, histories):
        return np.stack([self.vectors[[self.index[i] for i in h if i in self.index]].mean(0) for h in histories])


def test_collaborative_signal_is_fused(retriever, catalog, tmp_path):
    store = retriever.store
    collab = FakeCollaborative(list(catalog.items)[:200])  # it knows only part of the catalog
    store.put_vectors(catalog, "seq", collab.item_ids, collab.vectors, model="fake")
    try:
        fused = Retriever(catalog, store, retriever.embedder, collaborative=collab)
        history = ["1", "6", "32"]
        result = fused.retrieve(history=history, k=10)
        check_invariants(result, catalog, history, 10)
        assert len(result) == 10
        assert all({"content", "seq", "content_rank", "seq_rank"} <= set(c.signals) for c in result)
        user = collab.encode_users([history])[0]
        for c in result:  # the signals are exact scores
            if c.item_id in collab.index:
                assert c.signals["seq"] == pytest.approx(float(collab.vectors[collab.index[c.item_id]] @ user), abs=1e-4)
        # a given fuse wins: here the collaborative list alone
        seq_only = Retriever(catalog, store, retriever.embedder, collaborative=collab,
                             fuse=lambda ranked, k: ranked["seq"][:k])
        ranked = seq_only.retrieve(history=history, k=5)
        expected = [i for i, _ in store.query_vectors(catalog, "seq", user, k=5, exclude_ids=set(history))]
        assert [c.item_id for c in ranked] == expected
        # else the signal's own per-request fuse (seqrec.CollaborativeRetriever.make_fuse)
        calls = []

        def make_fuse(h):
            calls.append(list(h))
            return lambda ranked, k: sorted(ranked["content"], key=lambda p: p[1])[:k] + [("not-a-candidate", 9.0)]

        collab.make_fuse = make_fuse
        worst_first = fused.retrieve(history=history, k=3)
        assert calls == [history]
        assert [c.item_id for c in worst_first] != [c.item_id for c in result[:3]]
        assert "not-a-candidate" not in [c.item_id for c in worst_first]  # a fuse cannot add items
        del collab.make_fuse
        filters = Filters(genres=("Comedy",), year_min=1995)
        check_invariants(fused.retrieve(history=history, k=10, filters=filters), catalog, history, 10, filters)
        # a history the collaborative model does not know falls back to content alone
        alone = fused.retrieve(history=["2571"], k=5)
        assert "seq" not in alone[0].signals
    finally:
        store.delete(catalog, "seq")


def test_rrf_fuse():
    fused = dict(rrf_fuse({"a": [("x", 3.0), ("y", 2.0), ("z", 1.0)], "b": [("z", 3.0), ("y", 2.0), ("x", 1.0)]}, k=3))
    assert fused["x"] == pytest.approx(fused["z"]) and fused["x"] > fused["y"] - 1e-3
    assert [i for i, _ in rrf_fuse({"a": [("p", 0.9), ("q", 0.1)], "b": [("q", 5.0)]}, k=1)] == ["q"]
