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


# ---------------------------------------------------------------- bootstrap over users


def test_per_user_values_average_to_the_metrics():
    ranks = np.array([1, 2, 7, 15, INF, 3.0])
    keys, table = metrics.per_user_table(ranks)
    assert table.shape == (6, 9)
    assert dict(zip(keys, table.mean(axis=0))) == pytest.approx(metrics.summarize(ranks))


def test_bootstrap_of_identical_systems_is_zero_with_p_one():
    rng = np.random.default_rng(3)
    values = metrics.per_user(rng.integers(1, 40, 500).astype(float), "ndcg", 10)
    b = metrics.bootstrap(values, values)
    assert b["mean"] == b["low"] == b["high"] == 0.0
    assert b["p_one_sided"] == 1.0 and b["p_two_sided"] == 1.0


def test_bootstrap_finds_a_clearly_better_system():
    rng = np.random.default_rng(4)
    base = rng.integers(1, 40, 600).astype(float)
    better = np.maximum(1.0, base - 5)  # every user's true item moves up 5 places (or to the top)
    a, b = metrics.per_user(better, "ndcg", 10), metrics.per_user(base, "ndcg", 10)
    up = metrics.bootstrap(a, b)
    assert up["mean"] == pytest.approx(a.mean() - b.mean()) and up["low"] > 0
    assert up["p_one_sided"] < 0.01 and up["p_two_sided"] < 0.01
    down = metrics.bootstrap(b, a)  # the other way round: worse, so no evidence of a gain
    assert down["high"] < 0 and down["p_one_sided"] > 0.99 and down["p_two_sided"] < 0.01


def test_bootstrap_interval_is_reproducible_and_about_right():
    rng = np.random.default_rng(5)
    values = rng.random(2000) < 0.17  # a Recall@10 of about 0.17 over 2,000 users
    one = metrics.bootstrap(values)
    assert one == metrics.bootstrap(values)  # fixed seed
    assert one["low"] < one["mean"] < one["high"]
    half_width = 1.96 * values.std() / np.sqrt(len(values))  # the normal approximation
    assert (one["high"] - one["low"]) / 2 == pytest.approx(half_width, rel=0.15)
    many = metrics.bootstrap(np.stack([values, ~values], axis=1))  # several metrics at once
    assert many["mean"][0] == one["mean"] and many["low"][0] == one["low"]
    with pytest.raises(ValueError):
        metrics.bootstrap(values, values[:-1])  # a paired bootstrap needs the same users
