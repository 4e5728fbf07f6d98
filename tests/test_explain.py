"""Evidence, explanation validator, fallback, streaming and "why" answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recllm.catalog import Item
from recllm.explain import (
    Evidence,
    Explainer,
    Explanation,
    TitleMatcher,
    evidence,
    fallback_text,
    is_degenerate,
    named_titles_outside,
    claims_liked,
    tidy,
    validate,
    why_answer,
)

TOY = Item("1", "Toy Story", 1995, ("Adventure", "Animation", "Comedy"))
TOY2 = Item("3114", "Toy Story 2", 1999, ("Adventure", "Animation", "Comedy"))
HEAT = Item("6", "Heat", 1995, ("Action", "Crime", "Thriller"))
SABRINA = Item("7", "Sabrina", 1995, ("Comedy", "Romance"))
PRESIDENT = Item("11", "The American President", 1995, ("Comedy", "Drama", "Romance"))
NOTTING = Item("2671", "Notting Hill", 1999, ("Comedy", "Romance"))
CATALOG = [TOY, TOY2, HEAT, SABRINA, PRESIDENT, NOTTING, Item("2", "Jumanji", 1995, ("Adventure",)),
           Item("8", "It", 1990, ("Horror",)), Item("9", "Up", 2009, ("Animation",)),
           Item("10", "Romance", 1999, ("Drama",))]
MATCHER = TitleMatcher(i.title for i in CATALOG)


class ScriptedLM:
    """A fake LM that streams a fixed answer (like simonw/llm's MockModel)."""

    model_id, adapter_id = "scripted", None

    def __init__(self, text):
        self.text = text
        self.prompts = []

    def describe(self):
        return {"model": self.model_id, "adapter": None, "device": "cpu"}

    def chat_text(self, messages):
        return "\n".join(m["content"] for m in messages)

    def stream(self, prompt, max_new_tokens, **kwargs):
        self.prompts.append(prompt)
        for word in self.text.split(" ")[:max_new_tokens]:
            yield " " + word

    @property
    def tokenizer(self):
        from recllm.llm import default_tokenizer

        return default_tokenizer()

    def stream_many(self, prompts, max_new_tokens, **kwargs):
        for row, prompt in enumerate(prompts):
            for piece in self.stream(prompt, max_new_tokens):
                yield row, piece
            yield row, None


def test_evidence_picks_the_most_similar_history_items():
    history = [TOY, HEAT, SABRINA]
    vectors = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    ev = evidence(PRESIDENT, history, vectors, np.array([0.0, 0.0, 1.0]), n=2)
    assert ev.item_id == "11"
    assert ev.titles == ("Sabrina",)  # Toy Story and Heat have cosine 0: not evidence
    ev = evidence(NOTTING, history, vectors, np.array([0.5, 0.1, 0.5]), n=2)
    assert ev.titles == ("Sabrina", "Toy Story")
    assert ev.shared == ("Comedy", "Romance")
    assert [s for _, _, s in ev.liked] == sorted((s for _, _, s in ev.liked), reverse=True)


def test_evidence_never_uses_items_outside_history_or_the_item_itself():
    ev = evidence(SABRINA, [SABRINA, TOY], np.eye(2), np.array([1.0, 1.0]), n=5)
    assert ev.titles == ("Toy Story",)
    assert evidence(TOY, [], None, None).liked == ()
    ev = evidence(NOTTING, [HEAT, SABRINA, PRESIDENT], None, None, n=2)  # no vectors: genre overlap
    assert ev.titles == ("Sabrina", "The American President") or ev.titles == ("The American President", "Sabrina")
    assert "Heat" not in ev.titles


def test_fallback_sentences():
    ev = Evidence("2671", (("7", "Sabrina", 0.9), ("11", "The American President", 0.8)), ("Comedy", "Romance"))
    assert fallback_text(ev) == "Because you liked Sabrina and The American President; shares Comedy, Romance."
    assert fallback_text(Evidence("x", (("7", "Sabrina", 0.9),))) == "Because you liked Sabrina."
    assert "Comedy" in fallback_text(Evidence("x", (), ("Comedy",)))
    assert fallback_text(Evidence("x"))
    long = fallback_text(Evidence("x", (("7", "Endless " * 100 + "(1999)", 0.9),), ("Drama " * 50,)))
    assert len(long) < 200 and "(1999)" in long  # a huge catalog title is cut, its year kept


def test_matcher_rules():
    assert MATCHER.find("You will love toy Story, trust me.") == ["Toy Story"]
    assert MATCHER.find("a toy story about notting hill") == []  # lower-case two-word phrases are ordinary
    assert TitleMatcher(["Back to the Future Part III"]).find("like back to the future part iii") != []
    assert MATCHER.find("Like Toy Story 2 it is fun") == ["Toy Story 2", "Toy Story"]
    assert MATCHER.find("The heat of the moment") == []  # one-word title only as written: "Heat"
    assert MATCHER.find("Fans of Heat will like it") == ["Heat"]
    assert MATCHER.find("It is up to you") == []  # common words are never titles
    assert MATCHER.find("Toy Storyline") == []  # word boundaries
    assert MATCHER.find("Pokémon and Notting-Hill") == ["Notting Hill"]


def test_validator():
    allowed = ["Notting Hill", "Sabrina", "The American President"]
    ok = "Like Sabrina and The American President, Notting Hill is a warm romantic comedy."
    assert validate(ok, allowed=allowed, matcher=MATCHER) is None
    assert "Heat" in validate("As in Heat, it has great actors.", allowed=allowed, matcher=MATCHER)
    assert validate("", allowed=allowed, matcher=MATCHER) == "empty"
    assert validate("Yes.", allowed=allowed, matcher=MATCHER) == "empty"
    assert validate("great great great movie for you", allowed=allowed, matcher=MATCHER) == "degenerate"
    assert validate("word " * 80, allowed=allowed, matcher=MATCHER) == "too long"
    assert validate("A fine pick that you may", allowed=allowed, matcher=MATCHER, complete=False) == "too long"
    # a title contained in an allowed title is fine; alone it is not
    assert named_titles_outside("You liked Toy Story 2.", ["Toy Story 2"], MATCHER) == []
    assert named_titles_outside("You liked Toy Story.", ["Toy Story 2"], MATCHER) == ["Toy Story"]


def test_validator_rejects_claiming_the_recommended_item_as_liked():
    allowed = ["Notting Hill", "Sabrina"]
    bad = "You may enjoy Notting Hill because you've already watched Notting Hill twice."
    assert validate(bad, allowed=allowed, matcher=MATCHER, not_liked=["Notting Hill"]).startswith("claims")
    good = "You may enjoy Notting Hill because you liked Sabrina, and it is just as warm."
    assert validate(good, allowed=allowed, matcher=MATCHER, not_liked=["Notting Hill"]) is None
    final = Explainer(ScriptedLM("you loved Notting Hill."), titles=MATCHER).explain(
        NOTTING, evidence(NOTTING, [SABRINA], None, None))
    assert final.source == "fallback" and final.rejected.startswith("claims the user liked")
    assert claims_liked("You really enjoyed the Notting Hill soundtrack", ["Notting Hill"]) == ["Notting Hill"]


def test_degenerate_and_tidy():
    assert is_degenerate("the movie is the movie is the movie is fun")
    assert is_degenerate("!!! ??? ### $$$")
    assert not is_degenerate("Because you liked Sabrina, this warm comedy should suit you.")
    assert tidy("One. Two! Three? Four.", 2) == ("One. Two!", True)
    assert tidy("no end here", 2) == ("no end here", False)
    assert tidy("Said \"hi.\" Then left.", 1) == ("Said \"hi.\"", True)


def test_explainer_accepts_grounded_text_and_streams():
    ev = evidence(NOTTING, [HEAT, SABRINA, PRESIDENT], None, None)
    lm = ScriptedLM("like Sabrina it is a charming Comedy.\nExtra")
    explainer = Explainer(lm, titles=MATCHER)
    out = list(explainer.stream(NOTTING, ev))
    assert out[0] == "You may enjoy Notting Hill because"  # the answer prefix streams first
    assert all(isinstance(p, str) for p in out[:-1]) and isinstance(out[-1], Explanation)
    final = out[-1]
    assert final.source == "llm" and final.rejected is None
    assert final.text == "You may enjoy Notting Hill because like Sabrina it is a charming Comedy."
    assert final.meta["prompt_sha256"] and final.meta["model"] == "scripted"
    assert "Notting Hill" in lm.prompts[0] and "Sabrina" in lm.prompts[0]
    assert final.to_dict()["evidence"]["item_id"] == "2671"


def test_explainer_falls_back_when_the_model_names_another_title():
    ev = evidence(NOTTING, [HEAT, SABRINA, PRESIDENT], None, None)
    final = Explainer(ScriptedLM("you loved Toy Story."), titles=MATCHER).explain(NOTTING, ev)
    assert final.source == "fallback" and "Toy Story" in final.rejected
    assert final.text == fallback_text(ev) and "Toy Story" not in final.text
    assert final.draft == "You may enjoy Notting Hill because you loved Toy Story."


def test_explainer_finishes_a_sentence_the_model_ended_early():
    ev = evidence(NOTTING, [SABRINA], None, None)
    final = Explainer(ScriptedLM("it is a warm Comedy like Sabrina"), titles=MATCHER).explain(NOTTING, ev)
    assert final.source == "llm" and final.text.endswith("like Sabrina.")


def test_explainer_without_model_or_with_tiny_model(tiny_lm):
    ev = evidence(NOTTING, [SABRINA], None, None)
    assert Explainer(None).explain(NOTTING, ev).source == "fallback"
    explanation = Explainer(tiny_lm, titles=MATCHER).explain(NOTTING, ev)  # random weights: gibberish
    assert explanation.source in ("llm", "fallback") and explanation.text
    if explanation.source == "fallback":
        assert explanation.text == fallback_text(ev)
    assert named_titles_outside(explanation.text, ["Notting Hill", "Sabrina", "Comedy", "Romance"], MATCHER) == []


# -- properties ----------------------------------------------------------------------------------------------
VOCAB = ["crimson", "harbor", "midnight", "falcon", "garden", "silver", "winter", "echo", "river", "stone"]
FILLER = ["and", "a", "you", "liked", "this", "because", "fun", "warm", "story", "with"]
title_strategy = st.lists(st.sampled_from(VOCAB), min_size=2, max_size=4).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(catalog=st.lists(title_strategy, min_size=2, max_size=12, unique=True), data=st.data())
def test_property_validator_never_passes_a_title_outside_the_evidence(catalog, data):
    matcher = TitleMatcher(catalog)
    allowed = data.draw(st.lists(st.sampled_from(catalog), max_size=3, unique=True))
    named = data.draw(st.lists(st.sampled_from(catalog), min_size=1, max_size=4))
    pieces = []
    for title in named:
        cases = [str.upper, str.title] + ([str.lower] if len(title.split()) >= 3 else [])
        case = data.draw(st.sampled_from(cases))
        pieces += [data.draw(st.sampled_from(FILLER)), case(title), "and"]
    text = " ".join(pieces) + "."
    verdict = validate(text, allowed=allowed, matcher=matcher, max_chars=10_000)
    # Pieces are separated by filler words, so no title occurrence spans two pieces and none of the named
    # titles that are not allowed can hide inside an allowed one.
    outside = {t for t in named if t not in allowed}
    assert outside <= set(named_titles_outside(text, allowed, matcher))
    if outside:
        assert verdict is not None
    else:
        assert verdict in (None, "degenerate")


@settings(max_examples=200, deadline=None)
@given(catalog=st.lists(title_strategy, min_size=3, max_size=12, unique=True), data=st.data())
def test_property_explanations_are_always_grounded(catalog, data):
    items = [Item(str(i), t.title(), 2000, (data.draw(st.sampled_from(["Comedy", "Drama", "Horror"])),))
             for i, t in enumerate(catalog)]
    matcher = TitleMatcher(i.title for i in items)
    target = items[0]
    history = data.draw(st.lists(st.sampled_from(items[1:]), max_size=5, unique_by=lambda i: i.item_id))
    ev = evidence(target, history, None, None, n=2)
    assert set(ev.titles) <= {h.title for h in history}
    fallback = fallback_text(ev)
    assert named_titles_outside(fallback, ev.titles, matcher) == []
    script = " ".join(data.draw(st.lists(st.sampled_from([i.title for i in items] + FILLER), max_size=12))) + "."
    final = Explainer(ScriptedLM(script), titles=matcher).explain(target, ev)
    assert named_titles_outside(final.text, [*ev.titles, target.title], matcher) == []
    assert final.source == "llm" or final.text == fallback


# -- why -----------------------------------------------------------------------------------------------------
def why_result(shown: int, reason: str | None = None, history=("50", "51")):
    """A result with 8 ranked candidates "1".."8" (LLM scores 2, 1, 0, ...), the top `shown` recommended."""
    from recllm.rank import Ranked
    from recllm.request import Recommendation, Request, Result
    from recllm.retrieve import Candidate

    ranked = [Ranked(Candidate(str(i), f"Movie {i}", 0.5, {}), 3.0 - i, 1.0 / i) for i in range(1, 9)]
    recs = [Recommendation(r.candidate.item_id, r.candidate.title, r.fused_score, rank=n)
            for n, r in enumerate(ranked[:shown], start=1)]
    if reason is not None:
        recs[0].reason = Explanation(reason, "fallback", Evidence("1"))
    return Result(Request(), list(history), [f"Old {h}" for h in history], ranked, recs,
                  prompt_order=[r.candidate.item_id for r in ranked])


def test_why_recommended():
    text = why_answer("1", "Movie 1", why_result(3, "Because you liked X."))
    assert text.startswith("Movie 1 was recommended at #1 of 3 (out of 8 candidates).")
    assert "Because you liked X." in text and "\n" not in text
    assert "Scores" not in text and "2.00" not in text  # raw scores only when asked for
    assert "language model 2.00" in why_answer("1", "Movie 1", why_result(3), details=True)


def test_why_not_recommended_but_candidate():
    text = why_answer("5", "Movie 5", why_result(3))
    assert "not recommended" in text and "#5 of 8" in text and "top 3" in text


def test_why_not_a_candidate_and_in_history():
    text = why_answer("99", "Other", why_result(3))
    assert "not recommended" in text and "not among the 8 candidates" in text
    assert "already in your history" in why_answer("51", "Old", why_result(3))


@pytest.mark.parametrize("reason", ["", None])
def test_why_without_reason_has_no_double_spaces(reason):
    assert "  " not in why_answer("1", "Movie 1", why_result(2, reason))


def test_one_list_of_ordinary_words_for_every_title_matcher():
    """The validator and the chat's spotter read titles with one normalisation and one list of ordinary words
    (`recllm.titles`): a one-word title that is an everyday word is never matched in a sentence."""
    from recllm import titles

    assert titles.STOP_WORDS <= titles.COMMON_WORDS and {"kids", "up", "it", "her", "story"} <= titles.COMMON_WORDS
    matcher = TitleMatcher(["Kids", "Up", "Heat", "Toy Story"])
    assert matcher.find("Kids will love it, and so will grown-ups: it is Up there with Heat.") == ["Heat"]
    assert matcher.find("a toy Story") == ["Toy Story"]  # "story" is an everyday word, "Story" still a title
    assert titles.normalize_title("Amélie: the Fabulous-Destiny!") == "amelie the fabulous destiny"
