"""Evidence, explanation validator, fallback and streaming ("why" answers: tests/test_why.py)."""

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
    assert fallback_text(ev) == "It has the Comedy and Romance of Sabrina and The American President, which you liked."
    assert fallback_text(Evidence("x", (("7", "Sabrina", 0.9),))) == "It is close to Sabrina, which you liked."
    co = Evidence("x", (("7", "Sabrina", 0.9),), ("Comedy",), co_liked=("11", "The American President", 12))
    assert fallback_text(co) == ("It has the Comedy of Sabrina, which you liked. "
                                 "12 people who liked The American President also liked it.")
    assert co.titles == ("Sabrina", "The American President")  # the collaborative item is evidence too
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


def test_one_list_of_ordinary_words_for_every_title_matcher():
    """The validator and the chat's spotter read titles with one normalisation and one list of ordinary words
    (`recllm.titles`): a one-word title that is an everyday word is never matched in a sentence."""
    from recllm import titles

    assert titles.STOP_WORDS <= titles.COMMON_WORDS and {"kids", "up", "it", "her", "story"} <= titles.COMMON_WORDS
    matcher = TitleMatcher(["Kids", "Up", "Heat", "Toy Story"])
    assert matcher.find("Kids will love it, and so will grown-ups: it is Up there with Heat.") == ["Heat"]
    assert matcher.find("a toy Story") == ["Toy Story"]  # "story" is an everyday word, "Story" still a title
    assert titles.normalize_title("Amélie: the Fabulous-Destiny!") == "amelie the fabulous destiny"


def test_evidence_carries_the_collaborative_fact_the_era_and_the_constraints_met():
    from recllm.catalog import Interactions, Item
    from recllm.explain import constraints_met
    from recllm.retrieve import Filters

    heat = Item("6", "Heat", 1995, ("Action", "Crime", "Thriller"))
    toy = Item("1", "Toy Story", 1995, ("Animation", "Comedy"))
    ronin = Item("7", "Ronin", 1998, ("Action", "Crime", "Thriller"))
    casino = Item("8", "Casino", 1995, ("Crime", "Drama"))
    rows = [(f"u{u}", i, t, 5.0) for u in range(4) for t, i in enumerate(("6", "8"))]  # 4 people liked Heat + Casino
    rows += [("u9", "1", 0, 5.0), ("u9", "8", 1, 5.0), ("u8", "7", 0, 2.0), ("u8", "8", 1, 5.0)]  # u8 did not like Ronin
    inter = Interactions(rows)
    assert inter.co_liked("8", ["1", "6", "7"]) == [("6", 4), ("1", 1)]  # a rating of 2 is not "liked"
    history = [toy, ronin, heat]
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]])  # Ronin is the closest in content, Heat next
    meets = constraints_met(casino, Filters(genres=("crime",), year_max=1999))
    ev = evidence(casino, history, vectors, np.array([0.0, 1.0]), interactions=inter, meets=meets)
    assert ev.co_liked == ("6", "Heat", 4) and ev.era == "1990s"
    assert [t for _, t, _ in ev.liked] == ["Ronin", "Heat"]  # the most similar, then the most liked together
    assert ev.meets == ("a Crime title, as you asked", "from 1999 or earlier, as you asked")
    traced = ev.to_dict()
    assert traced["co_liked"] == {"item_id": "6", "title": "Heat", "people": 4} and traced["meets"] == list(meets)
    few = evidence(casino, [toy, heat], None, None, interactions=Interactions(rows[:2] + rows[-4:]))
    assert few.co_liked is None  # one person is no collaborative fact (MIN_CO_LIKED)
    assert constraints_met(casino, Filters(year_min=1990)) == ("from 1990 or later, as you asked",)
    assert constraints_met(casino, Filters(genres=("crime",), year_min=2000)) == ("a Crime title, as you asked",)
    assert constraints_met(casino, None) == ()


def test_a_model_that_fails_mid_stream_gives_the_plain_sentences():
    from recllm.errors import ModelError

    class Dropping(ScriptedLM):  # a server that goes away after two pieces (RemoteLM raises ModelError)
        def stream_many(self, prompts, max_new_tokens, **kwargs):
            yield 0, " like Sabrina"
            yield 1, " it is"
            raise ModelError("The LLM server at http://127.0.0.1:1 closed the stream (reset)")

    ev = Evidence(NOTTING.item_id, (("7", "Sabrina", 0.9),), ("Comedy",))
    out = list(Explainer(Dropping(""), titles=MATCHER).stream_many([(NOTTING, ev), (NOTTING, ev)]))
    finals = [p for _, p in out if not isinstance(p, str)]
    assert [f.source for f in finals] == ["fallback", "fallback"]
    assert finals[0].text == fallback_text(ev) and "closed the stream" in finals[0].rejected


def test_full_stops_inside_titles_end_no_sentence():
    from recllm.explain import tidy

    titles = ["Independence Day (a.k.a. ID4)", "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb"]
    text = ("You may enjoy Independence Day (a.k.a. ID4) because like Dr. Strangelove or: How I Learned to Stop "
            "Worrying and Love the Bomb it is a wild ride. It has Sci-Fi. And more.")
    kept, complete = tidy(text, 2, titles)
    assert complete and kept == text.rsplit(" And more.", 1)[0]
    assert tidy("You may enjoy Dr. No because", 2, [])[0] == "You may enjoy Dr."  # what the titles prevent
