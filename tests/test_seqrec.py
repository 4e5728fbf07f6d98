"""The sequential encoder and the fused collaborative retriever: learning, scoring as dot products, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recllm import evaluate, seqrec, signals, split
from recllm.errors import ModelError

FAST = seqrec.SeqConfig(dim=32, blocks=1, max_len=12, dropout=0.1, lr=5e-3, batch_size=16, max_epochs=40,
                        min_epochs=5, patience=8, time_budget_s=30)


def cycle_data(n_items=30, n_users=60, length=10, seed=0) -> split.EvalData:
    """Every user walks i -> i+1 (mod n) from a random start: the next item is always known."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for u in range(n_users):
        start = int(rng.integers(n_items))
        seqs[f"u{u}"] = [f"m{(start + t) % n_items}" for t in range(length)]
    return split.split_sequences(seqs, [f"m{n}" for n in range(n_items)], name="cycle")


@pytest.fixture(scope="module")
def cycle():
    data = cycle_data()
    vectors = np.random.default_rng(1).normal(size=(data.n_items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fitted = seqrec.fit_on_split(data, seed=0, config=FAST, content=vectors, progress=False)
    return data, fitted


def test_encoder_learns_the_planted_pattern(cycle):
    data, fitted = cycle
    hist = data.histories("test")
    ranking = evaluate.rank_all(fitted.encoder.scores_idx, data, "test")
    assert (ranking.ranks == 1).mean() >= 0.9
    # and the fused retriever too
    assert (evaluate.rank_all(fitted.scores_idx, data, "test").ranks == 1).mean() >= 0.9
    assert fitted.encoder.info["best_valid_ndcg@10"] > 0.8
    assert len(hist) == data.n_users


def test_scores_are_exact_dot_products_and_cosine_ranks_the_same(cycle):
    data, fitted = cycle
    histories = [[data.item_ids[i] for i in h] for h in data.histories("test")[:10]]
    ids, items = fitted.item_vectors()
    assert ids == data.item_ids
    users = fitted.user_vectors(histories)
    seq = fitted.signal_scores(histories, signals=("seq",))["seq"]
    np.testing.assert_allclose(users @ items.T, seq, rtol=1e-5, atol=1e-5)
    # all item vectors share one norm, so cosine similarity orders items exactly like the dot product
    norms = np.linalg.norm(items, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)
    cosine = (users @ items.T) / (np.linalg.norm(users, axis=1, keepdims=True) * norms[None])
    for b in range(len(users)):
        assert list(np.argsort(-cosine[b], kind="stable")[:5]) == list(np.argsort(-seq[b], kind="stable")[:5])
    # one user at a time gives the same vector
    np.testing.assert_allclose(fitted.user_vector(histories[0]), users[0], rtol=1e-5, atol=1e-6)
    assert fitted.user_vector(["not-an-item"]) is None


def test_fused_scores_equal_fuse_of_signals(cycle):
    data, fitted = cycle
    histories = [[data.item_ids[i] for i in h] for h in data.histories("test")[:5]]
    parts = fitted.signal_scores(histories)
    assert set(parts) == {"seq", "transition", "content", "popularity"}
    np.testing.assert_allclose(fitted.scores(histories), signals.fuse(parts, fitted.weights), rtol=1e-5, atol=1e-5)
    # a candidate subset scores the same as the full catalog restricted to it
    sub = [3, 7, 11]
    np.testing.assert_allclose(signals.fuse({k: v[:, sub] for k, v in parts.items()}, fitted.weights),
                               fitted.scores(histories)[:, sub], rtol=1e-5, atol=1e-5)


def test_rank_excludes_history(cycle):
    data, fitted = cycle
    history = [data.item_ids[i] for i in data.histories("test")[0]]
    top = fitted.rank(history, k=5, exclude={data.item_ids[0]})
    assert len(top) == 5 and not {i for i, _ in top} & (set(history) | {data.item_ids[0]})
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)


def test_checkpoint_round_trip(cycle, tmp_path):
    data, fitted = cycle
    fitted.save(tmp_path / "r")
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"seq.safetensors", "seq.json", "fusion.json", "transitions.npz", "content.npy"} <= files
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in files)
    loaded = seqrec.CollaborativeRetriever.load(tmp_path / "r")
    assert loaded.weights == fitted.weights
    histories = [[data.item_ids[i] for i in h] for h in data.histories("test")[:8]]
    np.testing.assert_allclose(loaded.scores(histories), fitted.scores(histories), rtol=1e-6, atol=1e-6)
    enc = seqrec.SeqEncoder.load(tmp_path / "r")
    np.testing.assert_allclose(enc.encode_users(histories), fitted.encoder.encode_users(histories), rtol=1e-6, atol=1e-6)
    seqrec.check_fitted_on(loaded, data)
    with pytest.raises(ModelError):
        seqrec.check_fitted_on(loaded, cycle_data(seed=5))


def test_bad_checkpoints_are_clean_errors(tmp_path):
    with pytest.raises(ModelError):
        seqrec.CollaborativeRetriever.load(tmp_path)
    (tmp_path / "seq.json").write_text(json.dumps({"config": {"dim": 8, "bogus": 1}, "item_ids": ["a"]}))
    with pytest.raises(ModelError):
        seqrec.SeqEncoder.load(tmp_path)


def test_unknown_and_empty_histories_encode():
    data = cycle_data(n_users=30)
    enc = seqrec.train(data.train, data.item_ids, config=seqrec.SeqConfig(dim=8, blocks=1, max_len=4, max_epochs=1),
                       progress=False)
    vecs = enc.encode_users([[], ["nope"], ["m1", "m2"]])
    assert vecs.shape == (3, 9) and np.isfinite(vecs).all()


def test_transitions_by_hand(tmp_path):
    trans = signals.Transitions.fit([np.array([0, 1, 2]), np.array([0, 1, 3])], 4,
                                    signals.TransitionConfig(gaps=2, gap_decay=0.5, last=1))
    # after item 0: item 1 twice at gap 1, items 2 and 3 once each at gap 2 (weight 0.5)
    np.testing.assert_allclose(trans.scores([[0]])[0], [0, 2, 0.5, 0.5])
    np.testing.assert_allclose(trans.scores([[2, 1]])[0], [0, 0, 1, 1])  # only the last item votes
    trans.save(tmp_path / "t.npz")
    again = signals.Transitions.load(tmp_path / "t.npz")
    np.testing.assert_allclose(again.scores([[0], [1]]), trans.scores([[0], [1]]))


def test_choose_weights_finds_the_informative_signal():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 50, size=40)
    good = rng.normal(size=(40, 50)).astype(np.float32)
    good[np.arange(40), target] += 3.0
    noise = rng.normal(size=(40, 50)).astype(np.float32)
    from recllm import metrics

    weights, value = signals.choose_weights(
        {"seq": noise, "good": good}, lambda s: metrics.ndcg_at_k(metrics.rank_of_targets(s, target), 10), base="seq"
    )
    assert weights["good"] >= 2.0 and value > 0.5


def test_candidate_signals_and_make_fuse_for_the_chroma_path(cycle):
    data, fitted = cycle
    history = [data.item_ids[i] for i in data.histories("test")[0]]
    cands = ["m3", "cold-item", "m7"]
    sig = fitted.candidate_signals(history, cands, content=np.array([0.1, 0.9, 0.2], dtype=np.float32))
    full = fitted.signal_scores([history])
    used = {n for n, w in fitted.weights.items() if w}
    assert set(sig) == used | ({"content"} if fitted.weights.get("content") else set())
    if "seq" in sig:
        assert sig["seq"][0] == pytest.approx(full["seq"][0, 3])
        assert sig["seq"][1] == pytest.approx(full["seq"][0].min())  # a cold item sits at the bottom of seq
    fuse = fitted.make_fuse(history)
    ranked = {"content": [("m3", 0.1), ("cold-item", 0.9)], "seq": [("m7", 5.0), ("m3", 4.0)]}
    out = fuse(ranked, 2)
    assert len(out) == 2 and {i for i, _ in out} <= {"m3", "cold-item", "m7"}
    assert out[0][1] >= out[1][1]


def test_changing_only_test_items_leaves_the_fit_unchanged(tmp_path):
    """The held-out last item of every user never reaches fitting: swap them all and the fit is the same,
    bit for bit (weights, transitions, popularity, fusion weights, the split fingerprint)."""
    rng = np.random.default_rng(7)
    seqs = {}
    for u in range(40):
        start = int(rng.integers(30))
        seqs[f"u{u}"] = [f"m{(start + t) % 30}" for t in range(10)]
    swapped = {u: s[:-1] + [f"m{(int(s[0][1:]) + 15) % 30}"] for u, s in seqs.items()}  # a new, unseen last item
    items = [f"m{n}" for n in range(30)]
    a, b = split.split_sequences(seqs, items), split.split_sequences(swapped, items)
    assert a.item_ids == b.item_ids and (a.test != b.test).all()
    assert all((x == y).all() for x, y in zip(a.train, b.train)) and (a.valid == b.valid).all()
    tiny = seqrec.SeqConfig(dim=8, blocks=1, max_len=8, max_epochs=3, min_epochs=1, batch_size=16)
    vectors = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    fa, fb = (seqrec.fit_on_split(d, seed=0, config=tiny, content=vectors, progress=False) for d in (a, b))
    assert seqrec.data_fingerprint(a) == seqrec.data_fingerprint(b) == fa.meta["data_fingerprint"]
    assert fa.weights == fb.weights and fa.meta["transition_config"] == fb.meta["transition_config"]
    sa, sb = fa.encoder.model.state_dict(), fb.encoder.model.state_dict()
    assert all(torch_equal(sa[k], sb[k]) for k in sa)
    np.testing.assert_array_equal(fa.popularity, fb.popularity)
    np.testing.assert_array_equal(fa.transitions.data, fb.transitions.data)
    np.testing.assert_array_equal(fa.scores_idx(a.histories("test")), fb.scores_idx(a.histories("test")))


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_coordinate_search_climbs_one_setting_at_a_time():
    calls = []

    def value(cfg):
        calls.append(cfg)
        return -(cfg["a"] - 2) ** 2 - (cfg["b"] - 0.5) ** 2

    best, v = signals.coordinate_search({"a": 0, "b": 0.0}, {"a": (0, 1, 2, 3), "b": (0.0, 0.5, 1.0)}, value)
    assert best == {"a": 2, "b": 0.5} and v == 0
    assert calls[0] == {"a": 0, "b": 0.0} and len(calls) == 1 + 5 + 5  # start, then two passes (the 2nd finds nothing)
