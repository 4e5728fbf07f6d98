"""Conversations (ReDial format) and the knowledge options, on tiny data: no LLM, no real embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recllm import conversations as cv
from recllm import knowledge as kn
from recllm.catalog import Catalog, Interactions, Item
from recllm.convrank import ConversationRanker, Reader, target_ranks, tune_weights
from recllm.retrieve import Filters

TITLES = {  # a title-only catalog, ReDial style: the year inside the title
    "1": "Super Troopers (2001)", "2": "Police Academy (1984)", "3": "The Matrix (1999)", "4": "Heat (1995)",
    "5": "Toy Story (1995)", "6": "The Mummy", "7": "Frozen (2013)", "8": "Nowhere Film (2010)",
}


def title_only() -> Catalog:
    return kn.with_year(Catalog([Item(i, t) for i, t in TITLES.items()], name="tiny", columns=("item_id", "title")))


def movielens_like() -> Catalog:
    return Catalog([
        Item("m1", "Super Troopers", 2001, ("Comedy",), ("cops",)),
        Item("m2", "Police Academy", 1984, ("Comedy",)),
        Item("m3", "Matrix, The", 1999, ("Action", "Sci-Fi")),  # a catalog that moves the article
        Item("m4", "Heat", 1995, ("Action", "Crime")),
        Item("m5", "Toy Story", 1996, ("Animation", "Children")),  # one year off
        Item("m6", "The Mummy", 1932, ("Horror",)), Item("m6b", "The Mummy", 1999, ("Action", "Adventure")),
        Item("m7", "Frozen", 2013, ("Animation",)),
    ], name="other")


def other_interactions() -> Interactions:
    rows = [("u1", "m1", 1, 5.0), ("u1", "m2", 2, 4.0), ("u2", "m1", 1, 4.5), ("u2", "m2", 2, 5.0),
            ("u2", "m3", 3, 2.0), ("u3", "m3", 1, 5.0), ("u3", "m4", 2, 5.0), ("u4", "m6b", 1, 4.0)]
    return Interactions(rows)


def dialogue_json(conv_id: str, lines: list[tuple[int, str]], labels: dict) -> dict:
    mentions = {m: TITLES[m] for _, text in lines for m in cv.MENTION_RE.findall(text)}
    return {"conversationId": conv_id, "initiatorWorkerId": 1, "respondentWorkerId": 2, "movieMentions": mentions,
            "messages": [{"text": t, "senderWorkerId": s, "messageId": n} for n, (s, t) in enumerate(lines)],
            "initiatorQuestions": labels, "respondentQuestions": {}}


DIALOGUE = dialogue_json("c1", [
    (1, "hi, I loved @1 and I didn't like @4"), (1, "any comedy?"), (2, "try @2"), (2, "it is funny"),
    (1, "seen it, more please"), (2, "@3 or @5"),
], {"1": {"liked": 1, "seen": 1, "suggested": 0}, "4": {"liked": 0, "seen": 1, "suggested": 0},
    "2": {"liked": 2, "seen": 1, "suggested": 1}})


def test_reading_redial_and_eval_points(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(DIALOGUE) + "\n")
    [d] = cv.read_dialogues(path)
    turns = d.turns()
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]  # same-speaker messages merged
    assert "Super Troopers (2001)" in turns[0].text and "@1" not in turns[0].text
    points = list(cv.eval_points(d))
    assert [(p.targets, p.mentioned) for p in points] == [(["2"], ["1", "4"]), (["3", "5"], ["1", "4", "2"])]
    assert d.mention_order() == ["1", "4", "2", "3", "5"]
    assert (d.rating("1"), d.rating("4"), d.rating("2")) == (kn.LIKED, kn.DISLIKED, kn.NEUTRAL)


def test_split_is_fixed_and_disjoint():
    ds = [cv.Dialogue(str(i), []) for i in range(20)]
    a, b = cv.split_ids(ds)
    assert [d.id for d in a] == [d.id for d in cv.split_ids(ds)[0]] and len(a) == len(b) == 10
    assert not {d.id for d in a} & {d.id for d in b}


def test_linking_by_title_and_year_with_report():
    cat, other = title_only(), movielens_like()
    link = kn.link_catalogs(cat, other, popularity=other_interactions().popularity())
    assert link.pairs["1"] == "m1" and link.rule["1"] == "title+year"
    assert link.pairs["3"] == "m3"  # "The Matrix" = "Matrix, The"
    assert link.pairs["5"] == "m5" and link.rule["5"] == "title+year±1"
    assert link.pairs["6"] == "m6b" and link.rule["6"] == "title, most popular"  # no year: the most rated
    assert "8" in link.unmatched
    report = link.report(cat, {"1": 3, "8": 1})
    assert report["linked"] == 7 and report["mention_share"] == 0.75
    linked = kn.linked_catalog(cat, other, link)
    assert linked.get("1").genres == ("Comedy",) and "Comedy" in linked.get("1").text
    assert linked.get("1").title == "Super Troopers" and linked.get("1").year == 2001
    assert linked.get("8").genres == ()
    carried = kn.carry_interactions(link, other_interactions())
    assert ("u1", "1", 1, 5.0) in carried and all(r[1] in cat for r in carried)


def test_link_by_id_map_and_files(tmp_path):
    cat, other = title_only(), movielens_like()
    link = kn.link_catalogs(cat, other, id_map={"8": "m7"})
    assert link.pairs["8"] == "m7" and link.rule["8"] == "id map"
    paths = kn.write_linked(tmp_path, cat, other, link, other_interactions())
    from recllm.catalog import load_catalog, load_interactions

    assert load_catalog(paths["catalog"]).get("8").genres == ("Animation",)
    assert len(load_interactions(paths["interactions"])) > 0
    assert json.loads(paths["report"].read_text())["by_rule"]["id map"] == 1


def test_conversations_as_interactions_leave_dislikes_out(tmp_path):
    d = cv._dialogue(DIALOGUE, 1)
    rows = kn.conversation_interactions([d])
    assert [r[1] for r in rows] == ["1", "2", "3", "5"]  # "4" was disliked
    assert rows[0] == ("conv-c1", "1", 0.0, kn.LIKED)
    assert [r[1] for r in kn.conversation_interactions([d], keep_disliked=True)][:2] == ["1", "4"]
    from recllm.catalog import load_interactions

    assert load_interactions(kn.write_interactions(tmp_path / "i.csv", rows)).history("conv-c1") == ["1", "2", "3", "5"]


def test_popularity_prior_stays_inside_the_constraints():
    cat = kn.linked_catalog(title_only(), movielens_like(), kn.link_catalogs(title_only(), movielens_like()))
    counts = {"4": 10, "1": 5, "2": 3, "5": 1}
    top = kn.popularity_prior(cat, counts, Filters(genres=("Comedy",)), exclude=["1"], k=3)
    assert [i for i, _ in top] == ["2"]
    top = kn.popularity_prior(cat, counts, Filters(year_max=1996), k=2)
    assert [i for i, _ in top] == ["4", "2"]


def test_cooccurrence_scores_items_of_the_same_conversations():
    co = kn.CoOccurrence([[("a", 1.0), ("b", 1.0)], [("a", 1.0), ("b", 1.0), ("c", 1.0)], [("c", 1.0), ("d", 1.0)]])
    s = dict(zip(co.item_ids, co.scores([("a", 1.0)])))
    assert s["b"] > s["c"] > 0 and s["d"] == 0 and s["a"] == 0


class FakeEmbedder:
    """Bag of words into 16 buckets (deterministic, no model)."""

    def encode(self, texts, progress=False):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for n, text in enumerate(texts):
            for word in text.lower().split():
                out[n, sum(map(ord, word)) % 16] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


def ranker(**knowledge) -> tuple[ConversationRanker, Catalog]:
    other = movielens_like()
    cat = kn.linked_catalog(title_only(), other, kn.link_catalogs(title_only(), other))
    emb = FakeEmbedder()
    return ConversationRanker(cat, item_vectors=emb.encode([i.text for i in cat]), embedder=emb, **knowledge), cat


def read(cat, lines, known=()):
    d = cv._dialogue(dialogue_json("x", lines, {}), 1)
    return Reader(cat).read(d.turns(cat), known=list(known))


def test_reader_keeps_dislikes_out_of_the_liked_history():
    _, cat = ranker()
    reading = read(cat, [(1, "I loved @1 but I didn't like @4"), (2, "how about @3?")])
    weights = dict(reading.history)
    assert reading.disliked == ["4"] and weights["4"] < weights["3"] < weights["1"]
    assert set(reading.mentioned) == {"1", "4", "3"}


def test_reader_finds_titles_without_a_year_or_misspelled():
    _, cat = ranker()
    reading = read(cat, [(1, "i really liked super troopers and toy stroy")])
    assert {"1", "5"} <= set(reading.mentioned)


def test_a_turn_with_nothing_usable_gets_popular_items_in_its_constraints():
    r, cat = ranker(popularity={"4": 9, "3": 5, "2": 4, "1": 1})
    reading = read(cat, [(1, "hello there"), (2, "hi! what are you in the mood for?"), (1, "only comedies")])
    assert reading.genres == ("Comedy",)
    top = r.rank([reading], k=2, weights={"popularity": 1.0, "constraint": 1.0})[0]
    assert top == ["2", "1"]  # the comedies, most popular first
    assert r.rank([read(cat, [(1, "hello")])], k=1)[0] == ["4"]  # no ask: the most popular


def test_each_knowledge_source_moves_the_right_item_up():
    conv = kn.CoOccurrence([[("1", 1.0), ("2", 1.0)]] * 3 + [[("3", 1.0), ("4", 1.0)]])
    r, cat = ranker(comentions=conv, popularity={"4": 20})
    reading = read(cat, [(1, "I loved @1")])
    assert r.rank([reading], k=1, weights={"comention": 1.0})[0] == ["2"]
    assert r.rank([reading], k=1, weights={"popularity": 1.0})[0] == ["4"]
    link = kn.link_catalogs(title_only(), movielens_like())
    linked = kn.CoOccurrence(kn.sequences_from_rows(kn.carry_interactions(link, other_interactions()), min_rating=4.0))
    r2, _ = ranker(linked=linked)
    assert r2.rank([read(cat, [(1, "I loved @3")])], k=1, weights={"linked": 1.0})[0] == ["4"]
    assert "1" not in r.rank([reading], k=8)[0]  # mentioned movies are never recommended


def test_tuning_finds_the_useful_signal_and_ranks_are_pessimistic_on_ties():
    scores = np.array([[1.0, 1.0, 0.0]])
    assert target_ranks(scores, [[0]], [[]])[0].tolist() == [2.0]
    assert target_ranks(scores, [[0]], [[1]])[0].tolist() == [1.0]
    r, _ = ranker(popularity={"1": 1})
    good = np.tile(np.eye(8, dtype=np.float32)[[2]], (4, 1))
    signals = {"popularity": np.zeros((4, 8), np.float32), "comention": good}
    weights, value = tune_weights(r, signals, [[2]] * 4, [[]] * 4, objective=(1,))
    assert weights["comention"] > 0 and value == 1.0


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"messages": []})])
def test_bad_dialogue_files_are_one_line_errors(tmp_path, bad):
    from recllm.errors import InputError

    path = tmp_path / "bad.jsonl"
    path.write_text(bad + "\n")
    with pytest.raises(InputError, match="line 1"):
        cv.read_dialogues(path)
