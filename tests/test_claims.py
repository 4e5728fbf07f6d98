"""The claim checker: genre and era words against the item's own data, unsourced praise, decode-time bans."""

from __future__ import annotations

import pytest

from recllm.catalog import Item
from recllm.claims import banned_words, contradictions, unsupported_praise

CUCKOO = Item("1193", "One Flew Over the Cuckoo's Nest", 1975, ("Drama",))
PULP = Item("296", "Pulp Fiction", 1994, ("Comedy", "Crime", "Drama", "Thriller"), ("dark comedy", "nonlinear"))
HUGO = Item("89745", "Hugo", 2011, ("Children", "Drama", "Mystery"))
SCARY = Item("3785", "Scary Movie", 2000, ("Comedy", "Horror"))
DEAD_POETS = Item("1246", "Dead Poets Society", 1989, ("Drama",))


@pytest.mark.parametrize("text, item, expected", [
    ("a classic horror movie that has been reimagined in modern settings", CUCKOO, ["horror"]),
    ("a classic example of a dystopian novel", PULP, ["dystopian", "classic"]),
    ("a blend of fantasy and horror", HUGO, ["fantasy", "horror"]),
    ("a touching comedy-drama", DEAD_POETS, ["comedy-drama"]),
    ("a dark crime comedy with a nonlinear story", PULP, []),
    ("a gripping drama from 1975", CUCKOO, []),
    ("a recent mystery", HUGO, []),
    ("the latest thriller", CUCKOO, ["thriller", "latest"]),
    ("a sci-fi / science fiction ride", CUCKOO, ["sci-fi", "science-fiction"]),
])
def test_contradictions(text, item, expected):
    assert sorted(contradictions(text, item)) == sorted(expected)


def test_titles_are_not_claims():
    assert contradictions("Scary Movie is a scary comedy", SCARY) == []  # the item has Horror
    assert contradictions("You may like Scary Movie (2000)", DEAD_POETS, titles=["Scary Movie"]) == []
    assert contradictions("like The Horror of Dracula", CUCKOO, titles=["The Horror of Dracula"]) == []
    assert contradictions("a horror film", CUCKOO, titles=["The Horror of Dracula"]) == ["horror"]


def test_unsupported_praise():
    assert unsupported_praise("It has captivated audiences worldwide.") == ["captivated", "worldwide"]
    assert "acclaimed" in unsupported_praise("a critically acclaimed masterpiece")
    assert unsupported_praise("Because you liked Heat; it shares Crime.") == []


def test_banned_words_are_what_the_checker_rejects():
    banned = banned_words(CUCKOO)
    assert {"horror", "comedy", "recent", "masterpiece"} <= set(banned) and "classic" not in banned  # from 1975
    assert "drama" not in banned
    assert "classic" in banned_words(HUGO) and "recent" not in banned_words(HUGO)  # from 2011
    for item in (CUCKOO, HUGO, PULP):  # every banned word is rejected by the checker or counted as praise
        for word in banned_words(item):
            assert contradictions(f"a {word} film", item) or unsupported_praise(f"a {word} film"), word
    assert "scary" not in banned_words(Item("1", "Scary Stories", 2019, ("Drama",)))  # a word of its own title


def test_years_and_decades_other_than_the_items_own_are_contradictions():
    from recllm.catalog import Item

    monkeys = Item("32", "Twelve Monkeys", 1995, ("Mystery", "Sci-Fi", "Thriller"))
    assert contradictions("Released in 1985, it is a tense thriller.", monkeys) == ["1985"]
    assert contradictions("A 1990s sci-fi mystery from 1995.", monkeys) == []
    assert contradictions("A 1980's mystery.", monkeys) == ["1980's"]
    assert contradictions("It has the Sci-Fi of Blade Runner (1982).", monkeys, titles=["Blade Runner (1982)"]) == []
    assert contradictions("A stylish noir and other noirs.", monkeys) == ["noir", "noirs"]
    assert contradictions("12 people who liked Heat also liked it.", monkeys) == []
    assert contradictions("Made in 2018.", Item("x", "No Year")) == ["2018"]
