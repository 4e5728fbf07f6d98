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


# -- the popularity prior on the engine path: a turn with no usable title and no ask ---------------------------


@pytest.fixture(scope="module")
def real_rec(chat_home):
    from conftest import build_recommender

    return build_recommender(chat_home)


def test_engine_answers_the_most_popular_items_inside_the_filters(real_rec):
    from recllm.errors import EmptyHistory, InputError
    from recllm.request import Request

    rec, counts = real_rec, real_rec.interactions.popularity()
    comedies = sorted((i for i in rec.catalog if "Comedy" in i.genres), key=lambda i: -counts[i.item_id])
    top = comedies[0].item_id
    result = rec.recommend(Request(k=3, filters=Filters(genres=("Comedy",), exclude_ids={top}), explain=0))
    assert [r.item_id for r in result.recommendations] == [i.item_id for i in comedies[1:4]]
    assert all("popularity" in r.candidate.signals for r in result.ranked)
    assert "most popular" in result.trace["ranker"]["reason"]  # the trace says why these were picked
    with pytest.raises(EmptyHistory, match="nothing to recommend from"):  # an API call with nothing at all
        rec.recommend(Request(k=3))
    with pytest.raises(EmptyHistory, match="no such film"):  # titles that all failed stay an error
        rec.recommend(Request(history=["no such film xyz"], k=3, filters=Filters()))
    try:
        rec.use_popularity({comedies[-1].item_id: 1000})  # e.g. conversation mention counts
        assert rec.recommend(Request(k=1, filters=Filters(), explain=0)).recommendations[0].item_id == \
            comedies[-1].item_id
        with pytest.raises(InputError, match="no numeric column"):
            rec.use_popularity(column="votes")
    finally:
        rec.use_popularity()


def test_chat_and_batch_turns_with_nothing_usable_get_popular_picks(real_rec):
    from recllm import batch
    from recllm.chat import ChatSession
    from recllm.chat.replies import say

    counts = real_rec.interactions.popularity()
    session = ChatSession(real_rec, intent_model=None)
    reply = session.respond("what should I watch?")
    assert reply.intent == "recommend" and say("ack_popular") in reply.text
    assert [c.item_id for c in reply.items] == [i for i, _ in counts.most_common(len(reply.items))]
    heat = real_rec.catalog.resolve("Heat (1995)")
    reply = ChatSession(real_rec, intent_model=None).respond("I didn't like Heat, any suggestions?")
    assert reply.intent == "recommend" and heat not in [c.item_id for c in reply.items]
    assert ChatSession(real_rec, intent_model=None).respond("asdkjh qwe zxcv").intent == "clarify"
    rows = [{"id": "hi", "k": 3, "messages": [{"role": "user", "content": "hi! I'm looking for a movie"}]},
            {"id": "no", "k": 3, "messages": [{"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": "hi! what do you like?"},
                                              {"role": "user", "content": "no comedies please"}]}]
    out = {o["id"]: o for o in batch.process(real_rec, rows)}
    assert [r["item_id"] for r in out["hi"]["recommendations"]] == [i for i, _ in counts.most_common(3)]
    no_comedy = [i for i, _ in counts.most_common() if "Comedy" not in real_rec.catalog.get(i).genres][:3]
    assert [r["item_id"] for r in out["no"]["recommendations"]] == no_comedy


# -- conversations as interactions for `recllm fit-retriever` (a low k-core for short sequences) -------------


def test_k_core_keeps_short_sequences_when_asked():
    from recllm import split
    from recllm.errors import CatalogError, InputError

    seqs = {f"c{n}": ["1", "2", "3"] if n % 2 else ["4", "5", "7"] for n in range(6)}
    with pytest.raises(CatalogError, match="min-count"):
        split.split_sequences(seqs, k=5)  # the MovieLens default drops every conversation
    data = split.split_sequences(seqs, k=2)
    assert data.n_users == 6 and data.stats["k_core"] == 2 and all(len(t) == 1 for t in data.train)
    assert split.k_core({"a": ["1", "2"], "b": ["1", "2"]}, 2, user_k=3) == {}  # two items leave nothing to train
    with pytest.raises(InputError, match="at least 1"):
        split.split_sequences(seqs, k=0)


def pattern_dialogues(path, n: int = 24):
    """`n` dialogues where "1" is followed by "2" (then "3"), "4" by "5" (then "7"); some seekers dislike one."""
    lines = []
    for d in range(n):
        a, b, c = ("1", "2", "3") if d % 2 else ("4", "5", "7")
        lines.append(json.dumps(dialogue_json(f"d{d}", [(1, f"I loved @{a}"), (2, f"then try @{b}"),
                                                        (1, "seen it"), (2, f"or @{c}"), (2, "or @6 or @8")],
                                              {c: {"liked": 0}} if d % 6 == 0 else {})))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_conversations_with_a_fitted_retriever(tmp_path, capsys):
    from recllm.cli import main

    movies = tmp_path / "movies.csv"
    movies.write_text("movieId,movieName\n" + "".join(f"{i},{t}\n" for i, t in TITLES.items()))
    dialogues = pattern_dialogues(tmp_path / "dialogues.jsonl", 40)
    assert main(["eval-conversations", str(dialogues), "--fit-retriever", "--min-count", "2", "--json", "-q",
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads(capsys.readouterr().out)
    systems = report["systems"]
    assert {"popularity floor", "fitted retriever on conversations", "all knowledge + fitted retriever"} <= set(systems)
    assert "linked knowledge (MovieLens)" not in systems  # no --link
    held = systems["fitted retriever on conversations"]["strict"]
    assert held["pairs"] == 20 * 4 and held["errors"] == 0  # 20 held-out dialogues: b, then c, 6 and 8
    assert held["recall@10"]["mean"] == 1.0  # 8 movies: every target is in the top 10
    assert "retriever" in report["protocol"] and (tmp_path / "report" / "report.md").is_file()


def test_fit_retriever_on_dialogues_and_rank_with_it(tmp_path):
    from recllm import seqrec
    from recllm.catalog import load_interactions
    from recllm.cli import main

    catalog_csv = tmp_path / "titles.csv"
    catalog_csv.write_text("item_id,title,year\n" + "".join(f"{i.item_id},{i.title},{i.year or ''}\n"
                                                            for i in title_only()))
    dialogues = pattern_dialogues(tmp_path / "d.jsonl")
    out, written = tmp_path / "retriever", tmp_path / "conv.csv"
    assert main(["fit-retriever", "--catalog", str(catalog_csv), "--dialogues", str(dialogues), "--min-count", "2",
                 "--write-interactions", str(written), "--out", str(out), "-q"]) == 0
    inter = load_interactions(written)
    assert inter.history("conv-d1") == ["1", "2", "3", "6", "8"]
    assert inter.history("conv-d0") == ["4", "5", "6", "8"]  # "7" disliked
    fitted = seqrec.CollaborativeRetriever.load(out)
    assert fitted.meta["data_stats"]["k_core"] == 2 and fitted.meta["data_stats"]["users"] == 24
    r, cat = ranker(retriever=fitted)
    assert "retriever" in r.available()
    # it learned which movies go together in these conversations
    assert r.rank([read(cat, [(1, "I loved @1")])], k=1, weights={"retriever": 1.0})[0][0] in ("2", "3")
    assert r.rank([read(cat, [(1, "I loved @4")])], k=1, weights={"retriever": 1.0})[0][0] in ("5", "7")
    assert not r.signals([read(cat, [(1, "hello")])])["retriever"].any()  # nothing it knows: a flat row
