"""What an explanation claims about an item, checked against the catalog: a small lexicon of genre, era and
praise words.

`contradictions(text, item)` lists the genre or era words in `text` that the item's own data does not support
("a classic horror movie" for a drama from 2011: "horror", "classic"), and years or decades other than its own
("released in 1985" for a 1995 film); `unsupported_praise(text)` lists praise
with no source in our data ("captivated audiences worldwide"); `banned_words(item)` is the list of words the
model must not generate for that item (the decode-time half of the same check). Titles are removed from the text
first, so "Scary Movie" or "The Horror of Dracula" named as a title is no claim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Item

# Words that assert a genre, by the catalog genre (MovieLens names; matched case-insensitively) they need.
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("action", "action-packed"),
    "Adventure": ("adventure", "adventures", "adventurous"),
    "Animation": ("animated", "animation", "cartoon", "cartoons", "anime"),
    "Children": ("children's", "kids'", "family-friendly"),
    "Comedy": ("comedy", "comedies", "comedic", "funny", "hilarious", "humorous", "comedy-drama"),
    "Crime": ("crime", "gangster", "gangsters", "heist", "mafia", "mobster"),
    "Documentary": ("documentary", "documentaries"),
    "Drama": ("drama", "dramas", "dramatic", "comedy-drama"),
    "Fantasy": ("fantasy", "fantastical", "magical"),
    "Film-Noir": ("noir", "noirs"),
    "Horror": ("horror", "scary", "slasher", "terrifying", "gory"),
    "Musical": ("musical", "musicals"),
    "Mystery": ("mystery", "mysteries", "whodunit"),
    "Romance": ("romance", "romantic", "romcom", "rom-com"),
    "Sci-Fi": ("sci-fi", "science-fiction", "scifi", "futuristic", "dystopian", "dystopia"),
    "Thriller": ("thriller", "thrillers", "suspense", "suspenseful"),
    "War": ("war",),
    "Western": ("western", "westerns", "cowboy", "cowboys"),
}
ERA_WORDS: dict[str, tuple[str, ...]] = {  # words that need the item's year in a range
    "old": ("classic", "classics", "vintage", "old-school", "golden-age"),
    "new": ("recent", "brand-new", "newest", "latest"),
}
OLD_BEFORE = 1990  # "classic" / "vintage" need a year before this
NEW_FROM = 2010  # "recent" / "latest" need a year from this on
PRAISE = (  # praise with no source in our data
    "acclaimed", "award-winning", "masterpiece", "must-see", "must-watch", "captivated", "captivating audiences",
    "beloved", "timeless", "iconic", "legendary", "praised", "oscar", "oscars", "best movie", "best film",
    "of all time", "worldwide", "critics",
)

# a year or a decade ("1990s", "1990's"); "(2000)" labels a title, it is no claim
_YEAR_RE = re.compile(r"(?<![\w(-])(1[89]\d\d|20\d\d)('?s)?(?![\w)-])")
_WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*'?")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("’", "'"))


def _phrase_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", re.IGNORECASE)


def strip_titles(text: str, titles: Iterable[str]) -> str:
    """`text` with every given title (and its form without "(year)") replaced by a space."""
    for title in sorted({t for t in titles if t}, key=len, reverse=True):
        for form in {title, re.sub(r"\s*\(\d{4}\)$", "", title)}:
            if form:
                text = _phrase_re(form).sub(" ", text)
    return text


def _supported(item: Item) -> set[str]:
    """Lower-case genres and tag words of the item: what a genre word may name."""
    words = {g.lower() for g in item.genres}
    for tag in item.tags:
        words.update(_words(tag))
    return words


def _claimed_genres(words: Sequence[str]) -> dict[str, set[str]]:
    """{word in the text: the genres it asserts} (word pairs like "science fiction" count as one word)."""
    text = " ".join(words).replace("science fiction", "science-fiction").replace("film noir", "noir")
    out: dict[str, set[str]] = {}
    for word in text.split():
        for genre, forms in GENRE_WORDS.items():
            if word in forms:
                out.setdefault(word, set()).add(genre)
    return out


def contradictions(text: str, item: Item, *, titles: Iterable[str] = ()) -> list[str]:
    """Genre and era words in `text` that `item` does not support (titles in `titles` and the item's own title
    are not read as claims). Empty when every such word is true of the item."""
    body = strip_titles(text, [item.title, item.label, *titles])
    words = _words(body)
    supported = _supported(item)
    bad = []
    for word, genres in _claimed_genres(words).items():
        if word not in supported and any(g.lower() not in supported for g in genres):
            bad.append(word)
    year = item.year
    for word in words:
        if word in ERA_WORDS["old"] and (year is None or year >= OLD_BEFORE):
            bad.append(word)
        if word in ERA_WORDS["new"] and (year is None or year < NEW_FROM):
            bad.append(word)
    for match in _YEAR_RE.finditer(body):  # "released in 1985", "a 1990s film": the item's year / decade only
        claimed = int(match.group(1))
        if year is None or (claimed != year // 10 * 10 if match.group(2) else claimed != year):
            bad.append(match.group(0))
    return list(dict.fromkeys(bad))


def unsupported_praise(text: str, *, titles: Iterable[str] = ()) -> list[str]:
    """Praise phrases in `text` that nothing in our data backs ("acclaimed", "captivated audiences")."""
    body = strip_titles(text, titles)
    return [p for p in PRAISE if _phrase_re(p).search(body)]


def banned_words(item: Item) -> list[str]:
    """Words the model must not write about `item`: genre words it does not support, era words its year does
    not fit, and unsourced praise (for decode-time bans; `contradictions` is the check after)."""
    supported = _supported(item)
    out = [w for genre, forms in GENRE_WORDS.items() if genre.lower() not in supported
           for w in forms if w not in supported and "-" not in w and "'" not in w]
    year = item.year
    if year is None or year >= OLD_BEFORE:
        out += [w for w in ERA_WORDS["old"] if "-" not in w]
    if year is None or year < NEW_FROM:
        out += [w for w in ERA_WORDS["new"] if "-" not in w]
    out += [p for p in PRAISE if " " not in p and "-" not in p]
    title_words = set(_words(item.title))
    return [w for w in dict.fromkeys(out) if w not in title_words]
