"""Metrics against hand-computed cases, and invariants of ranking helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recllm import metrics

INF = math.inf


def test_hand_computed_single_users():
    # rank 1: everything is 1
    assert metrics.ndcg_at_k([1], 5) == 1.0
    assert metrics.recall_at_k([1], 5) == 1.0
    assert metrics.mrr_at_k([1], 5) == 1.0
    # rank 3: NDCG = 1/log2(4) = 0.5, MRR = 1/3
    assert metrics.ndcg_at_k([3], 5) == pytest.approx(0.5)
    assert metrics.mrr_at_k([3], 5) == pytest.approx(1 / 3)
    assert metrics.recall_at_k([3], 5) == 1.0
    # rank 7 is outside the top 5 but inside the top 10: NDCG@10 = 1/log2(8) = 1/3
    assert metrics.ndcg_at_k([7], 5) == 0.0
    assert metrics.ndcg_at_k([7], 10) == pytest.approx(1 / 3)
    assert metrics.recall_at_k([7], 5) == 0.0
    assert metrics.mrr_at_k([7], 10) == pytest.approx(1 / 7)
    # rank exactly k counts
    assert metrics.recall_at_k([10], 10) == 1.0
    assert metrics.recall_at_k([11], 10) == 0.0


def test_hand_computed_means_count_misses():
    ranks = [1, 2, 15, INF]  # four users, one missed entirely
    # NDCG@10: (1 + 1/log2(3) + 0 + 0) / 4
    assert metrics.ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    # Recall@10: 2 of 4; Recall@20: 3 of 4
    assert metrics.recall_at_k(ranks, 10) == 0.5
    assert metrics.recall_at_k(ranks, 20) == 0.75
    # MRR@20: (1 + 1/2 + 1/15 + 0) / 4
    assert metrics.mrr_at_k(ranks, 20) == pytest.approx((1 + 0.5 + 1 / 15) / 4)


def test_summarize_keys():
    out = metrics.summarize([1, INF])
    assert set(out) == {f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in (5, 10, 20)}
    assert out["recall@5"] == 0.5


def test_bad_ranks_rejected():
    with pytest.raises(ValueError):
        metrics.ndcg_at_k([0], 10)
    with pytest.raises(ValueError):
        metrics.recall_at_k([float("nan")], 10)


def test_rank_of_targets_by_hand():
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.3],  # target 2 (0.5): only item 1 is higher -> rank 2
            [0.4, 0.4, 0.4, 0.4],  # all tied, target 2: items 0 and 1 come first -> rank 3
            [-np.inf, 0.2, 0.1, 0.0],  # target 0 excluded -> miss
            [0.3, 0.3, 0.0, 0.9],  # target 1 tied with item 0 (listed first), item 3 higher -> rank 3
        ]
    )
    ranks = metrics.rank_of_targets(scores, np.array([2, 2, 0, 1]))
    assert list(ranks) == [2.0, 3.0, INF, 3.0]


def test_rank_in_list():
    assert metrics.rank_in_list(["a", "b", "c"], "c") == 3.0
    assert metrics.rank_in_list(["a", "b", "c"], "z") == INF


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(-3, 3), min_size=6, max_size=6), min_size=1, max_size=5),
    st.integers(1, 6),
)
def test_top_k_matches_stable_sort_and_rank(rows, k):
    scores = np.array(rows, dtype=np.float64)
    top = metrics.top_k(scores, k)
    for b in range(len(rows)):
        expected = np.argsort(-scores[b], kind="stable")[:k]
        assert list(top[b]) == list(expected)
        # the rank of each listed item equals its position in the list
        for pos, item in enumerate(top[b], start=1):
            assert metrics.rank_of_targets(scores[b : b + 1], np.array([item]))[0] == pos


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 50), st.just(INF)), min_size=1, max_size=30))
def test_metric_ranges_and_monotone_in_k(ranks):
    for fn in (metrics.ndcg_at_k, metrics.recall_at_k, metrics.mrr_at_k):
        values = [fn(ranks, k) for k in (1, 5, 10, 20)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values)  # a bigger cut-off never lowers a metric
    # with one relevant item: MRR <= NDCG <= Recall at every k
    for k in (1, 5, 10, 20):
        assert metrics.mrr_at_k(ranks, k) <= metrics.ndcg_at_k(ranks, k) + 1e-12
        assert metrics.ndcg_at_k(ranks, k) <= metrics.recall_at_k(ranks, k) + 1e-12
