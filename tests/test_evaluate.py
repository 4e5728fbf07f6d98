"""The evaluation protocol: k-core filter, leave-one-out split, baselines and reports end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recllm import evaluate, metrics, split
from recllm.catalog import load_catalog, load_interactions


# ---------------------------------------------------------------- k-core


def test_k_core_iterates_to_a_fixed_point():
    # item "x" has 5 interactions, but two of its users fall below 5 once rare item "r" goes,
    # which drops x below 5 in turn, which drops a third user: only a fixed point catches all of it.
    seqs = {
        "u1": ["x", "a", "b", "c", "r"],  # loses r -> 4 items -> dropped
        "u2": ["x", "a", "b", "c", "r"],  # same
        "u3": ["x", "a", "b", "c", "d"],  # loses x (3 left after u1, u2 go) -> 4 items -> dropped
        "u4": ["x", "a", "b", "c", "d", "e"],  # loses x -> 5 items, stays
        "u5": ["x", "a", "b", "c", "d", "e"],
        "u6": ["a", "b", "c", "d", "e"],
        "u7": ["a", "b", "c", "d", "e"],
        "u8": ["a", "b", "c", "d", "e"],
    }
    core = split.k_core(seqs, 5)
    assert set(core) == {"u4", "u5", "u6", "u7", "u8"}
    assert all(s == ["a", "b", "c", "d", "e"] for s in core.values())
    # a fixed point: filtering again changes nothing
    assert split.k_core(core, 5) == core
    # and every user / item has at least 5
    counts: dict[str, int] = {}
    for s in core.values():
        for i in s:
            counts[i] = counts.get(i, 0) + 1
    assert min(counts.values()) >= 5 and min(len(s) for s in core.values()) >= 5


def test_k_core_single_pass_is_not_enough_here():
    seqs = {f"u{n}": ["x", "a", "b", "c", "r" if n < 2 else "d"] for n in range(5)}
    seqs.update({f"v{n}": ["a", "b", "c", "d", "e"] for n in range(5)})
    core = split.k_core(seqs, 5)
    assert "x" not in {i for s in core.values() for i in s}
    assert all(len(s) >= 5 for s in core.values())


def test_split_drops_repeats_and_orders_items_by_catalog():
    seqs = {f"u{n}": ["a", "b", "a", "c", "d", "e"] for n in range(5)}  # "a" repeated
    data = split.split_sequences(seqs, ["e", "d", "c", "b", "a", "zzz"])
    assert data.item_ids == ["e", "d", "c", "b", "a"]
    assert data.stats["repeats_dropped"] == 5
    ids = data.item_ids
    assert [ids[i] for i in data.train[0]] == ["a", "b", "c"]
    assert ids[data.valid[0]] == "d" and ids[data.test[0]] == "e"


# ---------------------------------------------------------------- the bundled data


@pytest.fixture(scope="module")
def movielens():
    catalog = load_catalog()
    interactions = load_interactions()
    return catalog, interactions, split.prepare(catalog, interactions)


def test_bundled_movielens_counts_match_llamarec(movielens):
    _, _, data = movielens
    assert (data.n_users, data.n_items, data.stats["interactions"]) == (610, 3650, 90274)
    assert sum(len(t) for t in data.train) + 2 * data.n_users == 90274


def test_split_properties_on_movielens(movielens):
    catalog, interactions, data = movielens
    sequences = interactions.sequences()
    test_inputs, valid_inputs = data.histories("test"), data.histories("valid")
    for u, user in enumerate(data.user_ids):
        train = [data.item_ids[i] for i in data.train[u]]
        valid, test = data.item_ids[data.valid[u]], data.item_ids[data.test[u]]
        # the held-out items never appear in the user's training data or model input
        assert test not in train and test != valid
        assert valid not in train
        assert data.test[u] not in test_inputs[u]
        assert data.valid[u] not in valid_inputs[u]
        # chronological: every train event <= validation <= test in time, in file order on ties
        kept = set(train) | {valid, test}
        order = [item for item, _ in sequences[user] if item in kept]
        assert order == train + [valid, test]
        times = {item: ts for item, ts in sequences[user]}
        assert max(times[i] for i in train) <= times[valid] <= times[test]
    # the model input at test time is train + the validation item
    assert list(data.histories("test")[0]) == list(data.train[0]) + [data.valid[0]]


def test_timestamp_ties_break_by_file_row_order(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{n},Item {n}\n" for n in range(6)))
    rows = ["user_id,item_id,timestamp"]
    for u in range(5):
        # same timestamp for the last three rows: file order i3, i5, i4 must be kept
        rows += [f"u{u},i0,1", f"u{u},i1,2", f"u{u},i2,3", f"u{u},i3,9", f"u{u},i5,9", f"u{u},i4,9"]
    inter = tmp_path / "inter.csv"
    inter.write_text("\n".join(rows) + "\n")
    data = split.prepare(load_catalog(items), load_interactions(inter))
    ids = data.item_ids
    assert ids[data.test[0]] == "i4" and ids[data.valid[0]] == "i5"
    assert [ids[i] for i in data.train[0]] == ["i0", "i1", "i2", "i3"]


def test_items_without_catalog_entry_are_dropped(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{n},Item {n}\n" for n in range(6)))
    rows = ["user_id,item_id,timestamp"] + [f"u{u},{i},{t}" for u in range(5) for t, i in
                                            enumerate(["i0", "i1", "ghost", "i2", "i3", "i4"])]
    inter = tmp_path / "inter.csv"
    inter.write_text("\n".join(rows) + "\n")
    data = split.prepare(load_catalog(items), load_interactions(inter))
    assert "ghost" not in data.item_ids
    assert data.stats["untitled_dropped"] == 5


def test_item_tags_are_counted_from_train_side_tag_events_only(tmp_path):
    """MovieLens tags carry a user and a time: a tag a user put on a held-out item, or put after their
    held-out interactions began, must not reach the item texts used in evaluation."""
    folder = tmp_path / "ml"
    folder.mkdir()
    movies = "".join(f"{n},Movie {n} (1990),Drama\n" for n in range(8))
    (folder / "movies.csv").write_text("movieId,title,genres\n" + movies)
    ratings = ["userId,movieId,rating,timestamp"]
    for u in range(1, 7):  # each user rates 0..5 (train 0..3, validation 4, test 5) at times 10..15
        ratings += [f"{u},{n},4.0,{10 + n}" for n in range(6)]
    (folder / "ratings.csv").write_text("\n".join(ratings) + "\n")
    (folder / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n"
        "1,5,heldout-test,9\n"  # on user 1's test item (even before the cutoff): dropped
        "1,4,heldout-valid,5\n"  # on the validation item: dropped
        "2,1,too-late,14\n"  # on a train item, but after user 2's validation interaction (time 14): dropped
        "2,1,before,13\n"  # on a train item before the cutoff: kept
        "99,5,outsider,20\n"  # a user outside the split: item side information, kept
    )
    catalog, interactions = split.load_inputs(folder, folder / "ratings.csv")
    data = split.prepare(catalog, interactions)
    assert data.n_users == 6 and split.has_timed_tags(catalog)
    assert set(catalog.get("5").tags) == {"heldout-test", "outsider"}  # the catalog itself counts every event
    texts = dict(zip(data.item_ids, split.item_texts(data, catalog, interactions)))
    assert "outsider" in texts["5"] and "heldout-test" not in texts["5"]
    assert "heldout-valid" not in texts["4"]
    assert "before" in texts["1"] and "too-late" not in texts["1"]
    assert split.train_side_tags(data, interactions, folder / "tags.csv") == {"1": ("before",), "5": ("outsider",)}


def test_the_shipped_retriever_reproduces_its_committed_figure():
    """The retriever shipped for the bundled MovieLens gives the test figures README and
    docs/eval/llm-ranker report (numpy path, all items, all 610 users)."""
    from recllm import paths, seqrec

    catalog, interactions = split.load_inputs()
    data = split.prepare(catalog, interactions)
    fitted = seqrec.CollaborativeRetriever.load(paths.PACKAGE_DIR / "data" / "retrievers" / "ml-latest-small")
    seqrec.check_fitted_on(fitted, data)
    ranks = evaluate.rank_all(fitted.scores_idx, data, "test").ranks
    assert round(metrics.ndcg_at_k(ranks, 10), 4) == 0.0918 and round(metrics.recall_at_k(ranks, 10), 4) == 0.1738
    report = json.loads((paths.PROJECT_DIR / "docs" / "eval" / "llm-ranker" / "report.json").read_text())
    assert metrics.summarize(ranks) == pytest.approx(report["systems"]["retriever"]["metrics"], abs=1e-9)


# ---------------------------------------------------------------- ranking rules


def test_rank_all_excludes_history_and_counts_misses():
    data = split.split_sequences({f"u{n}": ["a", "b", "c", "d", "e"] for n in range(5)})

    def scorer(hist):  # prefers "a" (history) most, then items in reverse catalog order
        s = np.tile(np.arange(data.n_items, dtype=np.float32), (len(hist), 1))
        s[:, data.item_ids.index("a")] = 100.0
        return s

    ranking = evaluate.rank_all(scorer, data, "test")
    # history a, b, c, d is excluded; only e remains, at rank 1
    assert list(ranking.ranks) == [1.0] * 5
    assert all(list(row[:1]) == [data.item_ids.index("e")] and all(x == -1 for x in row[1:]) for row in ranking.top)


def test_rerank_uses_candidates_and_counts_retriever_misses():
    seqs = {f"u{n}": [f"i{(n + k) % 30}" for k in range(6)] for n in range(30)}
    data = split.split_sequences(seqs, [f"i{n}" for n in range(30)])
    # a retriever that puts the true item 3rd for even users and misses it for odd ones
    ranking = evaluate.Ranking(ranks=np.zeros(data.n_users), top=np.full((data.n_users, 20), -1))
    for u in range(data.n_users):
        others = [i for i in range(data.n_items) if i != data.test[u] and i not in data.histories("test")[u]]
        ranking.top[u] = others[:20] if u % 2 else (others[:2] + [int(data.test[u])] + others[2:19])
    calls = []

    def reverse(requests):  # reverse order: the 3rd of 20 becomes the 18th
        calls.extend(requests)
        return [list(range(len(c))) for _, c, _ in requests]

    ranks = evaluate.rerank(ranking, data, reverse, "test")
    assert all(math.isinf(r) for r in ranks[1::2])
    assert all(r == 18.0 for r in ranks[0::2])
    assert len(calls) == 15  # users whose true item was missed are not sent to the ranker
    assert all(len(h) <= evaluate.HISTORY_LEN and len(c) == 20 and sc == sorted(sc, reverse=True)
               for h, c, sc in calls)


# ---------------------------------------------------------------- end to end


def planted(tmp_path, n_items=30, n_users=60, length=10, seed=0):
    """A catalog + interactions where every user walks a cycle i -> i+1 (mod n): the next item is known."""
    rng = np.random.default_rng(seed)
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,genres\n" + "".join(f"m{n},Movie {n},G{n % 3}\n" for n in range(n_items)))
    rows = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        start = int(rng.integers(n_items))
        rows += [f"u{u},m{(start + t) % n_items},{1000 + t}" for t in range(length)]
    inter = tmp_path / "interactions.csv"
    inter.write_text("\n".join(rows) + "\n")
    vectors = {f"m{n}": rng.normal(size=8).astype(np.float32) for n in range(n_items)}
    return items, inter, vectors


@pytest.mark.slow
def test_run_eval_end_to_end_on_a_planted_pattern(tmp_path):
    from recllm.seqrec import SeqConfig

    items, inter, vectors = planted(tmp_path)
    cfg = SeqConfig(dim=32, blocks=1, max_len=12, dropout=0.1, lr=5e-3, batch_size=16, max_epochs=25,
                    min_epochs=5, patience=5, time_budget_s=30)
    out = tmp_path / "out"
    report = evaluate.run_eval(items, inter, seeds=(0,), out_dir=out, content_vectors=vectors, config=cfg,
                               progress=False, ranker=lambda reqs: [[-i for i in range(len(c))] for _, c, _ in reqs],
                               ranker_name="keep")
    systems = report.systems
    assert set(systems) == {"popularity", "transition", "content", "seq", "retriever", "retriever+keep"}
    # the collaborative encoder learned "next item = i + 1"
    assert systems["seq"]["metrics"]["recall@5"] >= 0.9
    assert systems["retriever"]["metrics"]["ndcg@10"] >= 0.9
    assert systems["transition"]["metrics"]["recall@5"] >= 0.9
    # a ranker that keeps the retriever's order changes nothing
    assert systems["retriever+keep"]["metrics"] == pytest.approx(systems["retriever"]["metrics"])
    # random text vectors know nothing about the cycle: far below the collaborative signals
    assert systems["content"]["metrics"]["ndcg@10"] < 0.5
    assert report.data["users"] == 60 and report.data["items"] == 30
    for name in ("report.json", "report.md", "report.png", "retriever-seed0/seq.safetensors",
                 "retriever-seed0/fusion.json", "retriever-seed0/seq.json"):
        assert (out / name).is_file(), name
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["systems"]["retriever"]["metrics"]["ndcg@10"] == pytest.approx(systems["retriever"]["metrics"]["ndcg@10"])
    md = (out / "report.md").read_text()
    assert "| retriever |" in md and "top 20" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # uncertainty over users: every system has an interval around its mean, and each other system is
    # compared with the retriever on the same users (a ranker that keeps its order: difference 0, p = 1)
    for name, r in systems.items():
        lo, hi = r["interval"]["ndcg@10"]
        assert lo <= r["metrics"]["ndcg@10"] <= hi, name
    keep = report.comparisons["retriever+keep"]["ndcg@10"]
    assert keep["difference"] == 0 and keep["p_one_sided"] == 1 and keep["p_two_sided"] == 1
    assert report.comparisons["popularity"]["ndcg@10"]["high"] < 0  # clearly worse than the retriever
    assert loaded["comparisons"]["retriever+keep"]["vs"] == "retriever" and loaded["bootstrap"]["resamples"] == 1000
    assert "95% bootstrap interval over users" in md and "| retriever+keep | ndcg@10 | +0.0000 |" in md
    assert "within noise" in md and "Spread over seeds" not in md  # one seed: no spread to show
    with np.load(out / "ranks.npz") as saved:
        assert list(saved["user_ids"]) == [f"u{n}" for n in range(60)]
        np.testing.assert_array_equal(saved["retriever/seed0"], report.ranks["retriever"][0])
    from recllm import report as reports

    assert reports.load(out).to_markdown() == md  # a saved report renders again from its files
    # the saved retriever is re-evaluated without refitting, with the same figures
    again = evaluate.run_eval(items, inter, systems=("retriever",), retriever=out / "retriever-seed0", progress=False)
    assert again.systems["retriever"]["metrics"] == pytest.approx(systems["retriever"]["metrics"])
    # several rankers side by side in one report (e.g. untuned and tuned): one system each
    both = evaluate.run_eval(items, inter, systems=("retriever",), retriever=out / "retriever-seed0", progress=False,
                             ranker={"keep": lambda reqs: [[-i for i in range(len(c))] for _, c, _ in reqs],
                                     "reverse": lambda reqs: [[i for i in range(len(c))] for _, c, _ in reqs]})
    assert set(both.systems) == {"retriever", "retriever+keep", "retriever+reverse"}
    assert both.systems["retriever+keep"]["metrics"] == pytest.approx(systems["retriever"]["metrics"])
    assert both.systems["retriever+reverse"]["metrics"]["ndcg@10"] < systems["retriever"]["metrics"]["ndcg@10"]


def test_report_keeps_the_interval_over_users_apart_from_the_spread_over_seeds(tmp_path):
    from recllm import report as reports

    rng = np.random.default_rng(0)
    base = rng.integers(1, 60, 400).astype(float)
    ranks = {"retriever": [base, np.maximum(1, base - 1)], "retriever+llm": [np.maximum(1, base - 2)] * 2}
    rep = reports.build(ranks, {}, seeds=[0, 1], user_ids=[str(n) for n in range(400)],
                        command="recllm eval --seeds 0 1", data={"name": "toy", "users": 400},
                        protocol={"phase": "test", "k_core": 5})
    r = rep.systems["retriever"]
    assert r["std"]["ndcg@10"] > 0 and len(r["per_seed"]) == 2  # the spread over seeds
    keys, table = reports.user_table(ranks["retriever"])  # the interval: per-user values averaged over seeds
    assert r["interval"]["ndcg@10"] == pytest.approx(
        [metrics.bootstrap(table[:, keys.index("ndcg@10")])[k] for k in ("low", "high")])
    cmp = rep.comparisons["retriever+llm"]["ndcg@10"]
    assert cmp["difference"] > 0 and cmp["p_one_sided"] < 0.05 and reports.verdict(cmp) == "better"
    md = rep.to_markdown()
    assert "recllm eval --seeds 0 1" in md and "Spread over seeds (2 seeds)" in md
    assert "not an interval over users" in md
    rep.save(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["command"] == "recllm eval --seeds 0 1"


def test_unknown_system_is_a_clean_error():
    from recllm.errors import InputError

    with pytest.raises(InputError):
        evaluate.run_eval(systems=("nope",))


def test_metrics_of_a_perfect_scorer_are_one():
    data = split.split_sequences({f"u{n}": [f"i{(n + k) % 9}" for k in range(6)] for n in range(9)})
    targets = data.test
    ranking = evaluate.rank_all(lambda h: np.eye(data.n_items, dtype=np.float32)[targets[: len(h)]], data, "test")
    assert metrics.summarize(ranking.ranks)["ndcg@5"] == 1.0


def test_llm_ranker_adapter_passes_titles_and_returns_fused_scores():
    from types import SimpleNamespace

    catalog = load_catalog()
    seen = []

    class FakeLLMRanker:  # the part of recllm.rank.LLMRanker the adapter uses
        catalog = None

        def rank_many(self, requests):
            seen.extend(requests)
            out = []
            for _, cands in requests:  # prefers the last candidate: reversed order, fused = position
                out.append([SimpleNamespace(candidate=c, llm_score=0.0, fused_score=float(n))
                            for n, c in reversed(list(enumerate(cands)))])
            return out

    rank = evaluate.llm_ranker(FakeLLMRanker(), catalog)
    scores = rank([(["1", "2"], ["3", "4", "5"], [0.3, 0.2, 0.1])])
    assert scores == [[0.0, 1.0, 2.0]]
    titles, cands = seen[0]
    assert [line.title for line in titles] == [catalog.get("1").label, catalog.get("2").label]
    assert titles[0].genres == catalog.get("1").genres  # shown when the adapter asks for genres
    assert [c.item_id for c in cands] == ["3", "4", "5"] and cands[0].score == 0.3
