""""Why (not) X?" answers (`recllm.why`): built from the trace, evidence cited, every why-not reason, raw scores
only with details, and the same text from the chat, `Recommender.why` and a batch `question` row."""

from __future__ import annotations

import re

import pytest

from conftest import HEAT, MATRIX, TITANIC, TOY_STORY, build_recommender
from recllm.catalog import Item
from recllm.explain import Evidence, Explanation
from recllm.rank import Ranked
from recllm.request import Recommendation, Request, Result
from recllm.retrieve import Candidate, Filters
from recllm.why import evidence_sentences, failed_constraint, not_in_catalog, why_answer

DECIMAL_RE = re.compile(r"\d\.\d")  # a raw score; titles, years, ranks and counts are whole numbers


def why_result(shown: int, reason: str | None = None, history=("50", "51"), evidence: Evidence | None = None,
               filters: Filters | None = None, query: str | None = None) -> Result:
    """8 ranked candidates "1".."8" (LLM scores 2, 1, 0, ...), the top `shown` recommended."""
    ranked = [Ranked(Candidate(str(i), f"Movie {i}", 0.5, {}), 3.0 - i, 1.0 / i) for i in range(1, 9)]
    recs = [Recommendation(r.candidate.item_id, r.candidate.title, r.fused_score, rank=n)
            for n, r in enumerate(ranked[:shown], start=1)]
    if reason is not None or evidence is not None:
        recs[0].reason = Explanation(reason or "", "fallback", evidence or Evidence("1"))
    return Result(Request(filters=filters, query=query), list(history), [f"Old {h}" for h in history], ranked,
                  recs, prompt_order=[r.candidate.item_id for r in ranked])


EVIDENCE = Evidence("1", (("50", "Heat", 0.9), ("51", "Ronin", 0.8)), ("Action", "Crime"),
                    co_liked=("51", "Ronin", 12), era="1990s", meets=("from 1999 or earlier, as you asked",))


# -- recommended -------------------------------------------------------------------------------------------------
def test_why_recommended_cites_the_evidence_in_words():
    text = why_answer("1", "Movie 1", why_result(3, "The model's sentence.", evidence=EVIDENCE))
    assert text.startswith("Movie 1 was recommended at #1 of 3 (out of 8 candidates).")
    assert "Heat and Ronin, which you liked" in text and "Action and Crime" in text
    assert "12 people who liked Ronin also liked it." in text
    assert "from 1999 or earlier, as you asked" in text
    assert "The model's sentence." not in text  # facts from the trace, not the model's phrasing again
    assert "\n" not in text and "  " not in text


def test_details_add_the_raw_scores_otherwise_only_places_and_counts():
    result = why_result(3, evidence=EVIDENCE)
    plain, detailed = why_answer("1", "Movie 1", result), why_answer("1", "Movie 1", result, details=True)
    assert not DECIMAL_RE.search(plain) and "Scores" not in plain
    assert detailed.startswith(plain) and "language model 2.00" in detailed and "combined 1.00" in detailed
    below = why_answer("5", "Movie 5", result)
    assert not DECIMAL_RE.search(below) and "retriever 0.50" in why_answer("5", "Movie 5", result, details=True)


def test_evidence_sentences_for_each_kind_of_evidence():
    assert evidence_sentences(Evidence("1", (("50", "Heat", 0.9),))) == ["It is like Heat, which you liked."]
    shared = evidence_sentences(Evidence("1", (), ("Comedy",)))
    assert shared == ["It has Comedy in common with what you liked."]
    assert evidence_sentences(Evidence("1")) == []
    cold = why_answer("1", "Movie 1", why_result(3, evidence=Evidence("1"), history=(), query="space movie"))
    assert "space movie" in cold  # no history: the words asked with are the evidence


def test_shared_genres_are_said_only_of_the_liked_items_that_have_them():
    from recllm.catalog import Catalog

    catalog = Catalog([Item("50", "Heat", 1995, ("Action", "Crime")), Item("51", "Toy Story", 1995, ("Animation",)),
                       Item("52", "Babe", 1995, ("Children",))], name="t")
    ev = Evidence("1", (("50", "Heat", 0.9), ("51", "Toy Story", 0.5)), ("Action",), co_liked=("51", "Toy Story", 7))
    assert evidence_sentences(ev, catalog=catalog) == [
        "It has Action in common with Heat, which you liked.", "7 people who liked Toy Story also liked it."]
    weak = Evidence("1", (("50", "Heat", 0.9), ("52", "Babe", 0.2)), ("Action",))
    assert evidence_sentences(weak, catalog=catalog) == ["It has Action in common with Heat, which you liked."]


@pytest.mark.parametrize("reason", ["", None])
def test_why_without_evidence_has_no_double_spaces(reason):
    assert "  " not in why_answer("1", "Movie 1", why_result(2, reason))


# -- why not -----------------------------------------------------------------------------------------------------
def test_why_not_ranked_below_not_retrieved_in_history():
    result = why_result(3)
    text = why_answer("5", "Movie 5", result)
    assert "not recommended" in text and "#5 of 8" in text and "top 3" in text
    text = why_answer("99", "Other", result)
    assert "not recommended" in text and "not among the 8 candidates" in text
    assert "already in your history" in why_answer("51", "Old", result)


@pytest.mark.parametrize("reason, words", [
    ("disliked", "thumbs down"), ("rejected", "turned it down"), ("passed", "asked for something else"),
    (None, "this request excluded it"),
])
def test_why_not_removed_by_the_person(reason, words):
    filters = Filters(exclude_ids=frozenset({"99"}), exclude_reasons={"99": reason} if reason else {})
    assert words in why_answer("99", "Other", why_result(3, filters=filters))


OLD_DRAMA = Item("99", "Old Drama", 1950, ("Drama",))


@pytest.mark.parametrize("filters, words", [
    (Filters(genres=("Comedy",)), "you asked only for Comedy, and it is Drama"),
    (Filters(exclude_genres=("Drama", "Horror")), "you said no Drama, and it is Drama"),
    (Filters(year_min=1990), "you asked for 1990 or later, and it is from 1950"),
    (Filters(year_max=1940), "you asked for 1940 or earlier, and it is from 1950"),
    (Filters(where={"year": 2000}), "you asked for year 2000, and it has 1950"),
])
def test_why_not_removed_by_a_constraint(filters, words):
    text = why_answer("99", "Old Drama (1950)", why_result(3, filters=filters), item=OLD_DRAMA)
    assert text.startswith("Old Drama (1950) was not recommended because of your constraint:") and words in text


def test_constraints_an_item_meets_are_no_reason():
    assert failed_constraint(OLD_DRAMA, Filters(genres=("drama",), year_min=1900, year_max=1960)) is None
    assert failed_constraint(Item("x", "No Year"), Filters(year_min=1990)) == (
        "you asked for certain years, and its year is not known")


def test_not_in_the_catalog():
    text = not_in_catalog("Zyzzyx Road", "ml")
    assert text == "“Zyzzyx Road” is not in the catalog (ml), so it cannot be recommended."


# -- the real engine, the chat and batch -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rec(chat_home):
    return build_recommender(chat_home)


def test_every_why_answer_cites_its_evidence(rec):
    result = rec.recommend(history=[f"id:{HEAT}", f"id:{TOY_STORY}", f"id:{MATRIX}"], k=5, explain=1)
    for n, recommendation in enumerate(result.recommendations, start=1):
        text = rec.why(f"#{n}", result)
        ev = rec.evidence(recommendation.item_id, result.history)
        assert ev.liked or ev.shared  # there is evidence to cite ...
        assert any(t in text for _, t, _ in ev.liked) or any(s in text for s in ev.shared), text  # ... and it is
        assert text.startswith(recommendation.title) and f"#{n} of 5" in text and not DECIMAL_RE.search(text)
    assert "Scores: language model" in rec.why("#2", result, details=True)


def test_engine_why_not_reasons(rec):
    result = rec.recommend(history=[f"id:{HEAT}"], k=3, explain=0, filters=Filters(year_min=1990))
    assert "already in your history" in rec.why("why not Heat?", result)
    old = next(i for i in rec.catalog if i.year and i.year < 1990 and i.item_id not in result.history)
    assert f"you asked for 1990 or later, and it is from {old.year}" in rec.why(f"id:{old.item_id}", result)
    shown = {r["item_id"] for r in result.candidate_rows()}
    other = next(i for i in rec.catalog if i.year and i.year >= 1990 and i.item_id not in shown | {HEAT})
    assert "not among the 3 candidates" in rec.why(f"why not id:{other.item_id}?", result)
    assert "“Zyzzyx Road Nothing” is not in the catalog" in rec.why("why not Zyzzyx Road Nothing?", result)


def test_same_answer_from_chat_engine_and_batch(rec):
    from recllm.batch import process
    from recllm.chat import ChatSession

    session = ChatSession(rec, explain=2)
    session.respond("I loved Heat and Toy Story")
    chat = session.respond("why #1?").text
    assert chat == rec.why("#1", session.result)
    (row,) = process(rec, [{"id": "q", "history": [f"id:{HEAT}", f"id:{TOY_STORY}"], "k": 5,
                            "question": "why #1?"}])
    assert row["answer"] == chat and "which you liked" in chat
    detailed = session.respond("why #1? with details").text
    assert detailed.startswith(chat) and "Scores:" in detailed and "Scores:" not in chat
    assert rec.why("why #1? scores please", session.result) == detailed


def test_chat_why_not_names_the_persons_own_removal(rec):
    from recllm.chat import ChatSession

    session = ChatSession(rec, explain=0)
    session.respond("I loved Heat and Toy Story")
    first = session.shown[0]
    session.feedback(first.item_id, up=False)
    assert "thumbs down" in session.respond(f"why not id:{first.item_id}?").text
    second = session.shown[0]
    session.respond("drop #1")
    assert session.rejected == [second.item_id]
    assert "turned it down" in session.respond(f"why not id:{second.item_id}?").text
    session.respond("only comedies")
    text = session.respond(f"why not id:{MATRIX}?").text  # an action film
    assert "you asked only for Comedy" in text
    assert "Titanic" in session.respond(f"why not id:{TITANIC}?").text
