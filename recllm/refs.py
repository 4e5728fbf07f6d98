"""References to items in what a person types, and the one reader of "why ...?" questions.

A `Ref` names an item three ways: a `rank` on the list shown ("#2", "number 2", "the second one", "the last
one"), an `item_id` (a title, or `id:300` for the item id 300 outright), or the item in `focus` ("it", "that
one": the item last discussed, else #1). `why_target` reads the item a "why" question asks about; the chat,
`Recommender.why` and batch rows all use it, so "why the first one?" means the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recllm.catalog import ID_PREFIX
from recllm.titles import COMMON_WORDS, TitleSpotter, normalize_title, title_spotter, without_article

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Catalog

@dataclass(frozen=True)
class Ref:
    """A reference to an item: `rank` on the shown list (1-based, -1 = last), `item_id`, or the focus."""

    rank: int | None = None
    item_id: str | None = None
    focus: bool = False


ORDINALS = {
    "first": 1, "1st": 1, "top": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4,
    "fifth": 5, "5th": 5, "sixth": 6, "6th": 6, "seventh": 7, "7th": 7, "eighth": 8, "8th": 8,
    "ninth": 9, "9th": 9, "tenth": 10, "10th": 10, "last": -1,
}
_ORD_ALT = "|".join(sorted(ORDINALS, key=len, reverse=True))
_NOUN = r"(?:\s+(?:one|pick|movie|film|item|suggestion|option|title|entry))"
# An item on the shown list: "#2", "number 2", "the second one", "2nd", "the last one".
REF_RE = re.compile(
    rf"#\s*(?P<hash>\d{{1,2}})\b"
    rf"|\b(?:number|no\.|nr\.?|item|pick|option)\s*#?\s*(?P<num>\d{{1,2}})\b"
    rf"|\b(?:the\s+)?(?P<ord>{_ORD_ALT}){_NOUN}\b"
    rf"|\bthe\s+(?P<ord2>{_ORD_ALT})\b(?!\s+(?:time|thing|place|few|couple|part))",
    re.IGNORECASE,
)
# "it", "that one", "this": the item in focus (the last one discussed, else #1)
FOCUS_RE = re.compile(
    r"\b(?:that|this|it)(?:\s+one)?\b(?=\s*(?:$|[.,!?;:)]|and\b|but\b|please\b|either\b|too\b|again\b|already\b))",
    re.IGNORECASE,
)
# An item id written outright: "id:300", "ID: 300"
ID_RE = re.compile(rf"(?<![\w:]){re.escape(ID_PREFIX)}\s*(?P<id>[\w.-]{{1,64}})", re.IGNORECASE)
_WHY_RE = re.compile(
    r"^\W*(?:and\s+|but\s+|so\s+|ok(?:ay)?\W+)?why\b(?!\s+not\b)|\bwhy\s+(?:did|do|would|was|is|are|were|have|has)\s+"
    r"(?:you|it|that|this|they)\b|\bhow\s+come\b|\bwhat\s+makes\s+you\s+think\b|\bexplain\b|\bwhat(?:'s|\s+is)\s+the\s+"
    r"reason\b|\breason\s+for\b|\bwhy\?",
    re.IGNORECASE,
)
WHY_NOT_RE = re.compile(r"^\W*why\s+not\b", re.IGNORECASE)  # "why not Titanic?" asks; "why not older?" refines
_BARE_NUMBER_RE = re.compile(r"\b(?:why|explain)\s+(?:#\s*)?(\d{1,2})\b", re.IGNORECASE)
_ONLY_WHY_RE = re.compile(r"^\W*why\W*$", re.IGNORECASE)


def ref_from_match(match: re.Match) -> Ref:
    """The `Ref` of a `REF_RE` match."""
    if match.group("hash"):
        return Ref(rank=int(match.group("hash")))
    if match.group("num"):
        return Ref(rank=int(match.group("num")))
    return Ref(rank=ORDINALS[(match.group("ord") or match.group("ord2")).lower()])


def is_why(text: str) -> bool:
    """The message asks why ("why #2?", "how come?", "explain the first one"). "why not X?" is not by itself:
    it asks only when X names an item (`why_target`); "why not something older?" is a refinement."""
    return bool(_WHY_RE.search(text))


def why_target(text: str, catalog: Catalog, shown: Sequence[str], spotter: TitleSpotter | None = None) -> Ref | None:
    """The item a "why" question is about, else None.

    Read in this order: `id:300`; a place on the shown list ("#2", "the second one", "why 2"); the title of a
    shown item; any catalog title (`spotter`, by default the catalog's cached one); "it" / "that one" / a bare
    "why?" (the focus). A "why not X?" that is not otherwise a why question counts only when X names an item.
    `shown`: item ids of the list shown, best first.
    """
    why_not = bool(WHY_NOT_RE.search(text)) and not is_why(text)
    explicit = ID_RE.search(text)
    if explicit:
        item_id = explicit.group("id")
        return Ref(item_id=item_id) if item_id in catalog.items else None
    ref = REF_RE.search(text)
    if ref:
        return ref_from_match(ref)
    bare = _BARE_NUMBER_RE.search(text)
    if bare:
        return Ref(rank=int(bare.group(1)))
    item_id = _shown_title(text, catalog, shown)
    if item_id:
        return Ref(item_id=item_id)
    spots, _ = (spotter or title_spotter(catalog)).spot(text)
    if spots:
        return Ref(item_id=spots[0].item_id)
    if why_not:
        return None
    return Ref(focus=True) if FOCUS_RE.search(text) or _ONLY_WHY_RE.search(text) else None


def _shown_title(text: str, catalog: Catalog, shown: Sequence[str]) -> str | None:
    """A shown item whose title the text contains (longest title first), case-insensitively."""
    norm = f" {normalize_title(text)} "
    best = None
    for item_id in shown:
        item = catalog.items.get(item_id)
        if item is None:
            continue
        title = normalize_title(item.title)
        for key in {title, normalize_title(item.title.partition(" (")[0]), without_article(title)}:
            if len(key) >= 2 and f" {key} " in norm and (best is None or len(key) > best[0]):
                if key in COMMON_WORDS and not re.search(rf"\b{re.escape(item.title)}\b", text):
                    continue  # "it" is a pronoun unless written as the title
                best = (len(key), item_id)
    return best[1] if best else None
