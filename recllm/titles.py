"""Titles in text: the one title normalisation, the one list of ordinary words, and finding titles in text.

- `normalize_title` is the key every title comparison uses (lower case, accents and punctuation removed).
- `STOP_WORDS` (function words and the vocabulary of asking for films: never the content of an ask, never a
  significant word of a title) and `COMMON_WORDS` (those and everyday words: never a title on their own):
  "Kids", "Up", "It", "Her", "The One", "Love Story" are catalog titles, but not when a sentence uses the words.
- `title_keys` are the keys an item is known by (its title, with the year, without an alternate title, without
  or with a moved leading article); `Catalog.resolve` and `TitleSpotter` both index them.
- `TitleMatcher` finds titles of a closed list in *generated* text (the explanation validator). A title of two
  or more words counts when one of its significant words is capitalised or it has three or more significant
  words ("superhero movie" is not "Superhero Movie"; "toy Story" and "back to the future part iii" count); a
  one-word title counts only when written with its own capitalisation ("Heat", not "the heat"); one-word
  titles that are common words or of one or two characters are never matched.
- `TitleSpotter` finds the catalog items a *person* names in a message: quoted text, then spans of up to
  `MAX_TITLE_TOKENS` words looked up exactly, guarded by capitals and by cue words ("loved", "like", ...), then
  a near spelling of a list member after a cue ("I liked toy stroy").
"""

from __future__ import annotations

import re
import threading
import unicodedata
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from recllm.errors import RecllmError

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Catalog, Item

MAX_TITLE_TOKENS = 12  # longest span (in words) the title spotter tries

# Function words and the vocabulary of asking for films.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any anything are as at away back be because been before
being below between both but by can could did do does doing done down during each either else enough even ever
every everything few for from further get gets give go going got had has have having he her here hers herself
him himself his how i if in into is it its itself just least let lets like likes liked love loved made make
many maybe me might mine more most much must my myself need never next no nor not nothing now of off often on
once one ones only or other others our ours ourselves out over own please pretty quite rather really right same
see seen she should show so some something soon still such than thank thanks that the their theirs them
themselves then there these they thing things this those though through to too under until up us very want
wanted was watch watched way we well were what when where which while who whom why will with without would yes
yet you your yours yourself yourselves movie movies film films flick flicks recommend recommendation
recommendations suggest suggestion suggestions looking look find pick picks options option ideas idea watching
i'd i'm i've you're it's that's what's don't can't won't id im ive youre dont cant wont gimme lemme wanna gonna
pls plz nice cool awesome lol perhaps somethin stuff kinda sorta enjoy enjoyed enjoying fan fans favorite
favourite favourites favorites hate hated hating dislike disliked adore adored great good bad terrible awful
boring tonight today another different similar kind type sort bit lot lots hello hi hey ok okay sure nope nah
number top first second third fourth fifth last already anyway actually instead use know think tell try prefer
guess probably definitely
""".split())
# Everyday words: never a title on their own, nor a span made only of them (outside quotes or Title Case).
COMMON_WORDS = STOP_WORDS | frozenset("""
two three four five six seven eight nine ten new old older newer recent modern classic classics story
stories kid kids child children family people man men woman women girl girls boy boys friend friends life
night day time world home house war space action funny scary horror comedy drama romance crime mystery
fantasy adventure thriller western musical documentary animation animated cartoon sci fi fiction science
dark light heart hearts big little small long short high low hot cold fun star stars gold blue red black
white green lost found end beginning begin start reset help drop remove skip hide weekend together alone
mood feel feeling family's run
""".split())

_ARTICLE_RE = re.compile(r"^(the|a|an) (.+)$")
TOKEN_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # a word of a message ("don't" is one)
CLAUSE_BREAK_RE = re.compile(r"[.!?;\n]|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bwhile\b",
                             re.IGNORECASE)
_CUE_RE = re.compile(
    r"\b(?:loved|love|liked|like|likes|enjoyed|enjoy|adored|adore|fan\s+of|fans\s+of|watched|seen|saw|hated|hate|"
    r"disliked|dislike|can'?t\s+stand|similar\s+to|vein\s+of|lines\s+of|closer\s+to|such\s+as|about|based\s+on|"
    r"including|favou?rites?\s+(?:is|are|was|were)|than)\b",
    re.IGNORECASE,
)
_CONJ_RE = re.compile(r"\s*(?:,|&|\band\b|\bor\b|\bplus\b|/|\bnor\b)\s*", re.IGNORECASE)
_QUOTED_RE = re.compile(r"[\"“”«»]([^\"“”«»]{1,150})[\"“”«»]|(?<![\w])'([^']{2,150})'(?![\w])")


def words(text: str) -> list[str]:
    """The words of `text` with accents removed, case kept (`normalize_title` is these, lower-cased)."""
    text = unicodedata.normalize("NFKD", text)
    return re.findall(r"\w+", "".join(c for c in text if not unicodedata.combining(c)))


def normalize_title(text: str) -> str:
    """Lower-case, accents and punctuation removed, whitespace collapsed: the key titles are matched on."""
    return " ".join(words(text)).lower()


def title_keys(item: Item) -> set[str]:
    """The normalised keys an item is known by: title, label (with year), title without an alternate title
    ("Seven (a.k.a. Se7en)"), each without a leading article ("heat" finds "The Heat"), the article moved to
    the end."""
    title = normalize_title(item.title)
    keys = {title, normalize_title(item.label), normalize_title(item.title.partition(" (")[0])}
    keys |= {without_article(key) for key in keys}
    moved = _ARTICLE_RE.match(title)
    if moved:  # "american president the" (catalogs that write "President, The")
        keys.add(f"{moved.group(2)} {moved.group(1)}")
    keys.discard("")
    return keys


def without_article(key: str) -> str:
    """A normalised key without its leading article."""
    match = _ARTICLE_RE.match(key)
    return match.group(2) if match else key


# -- titles of a closed list in generated text --------------------------------------------------------------------


def _looks_like_a_title(phrase: Sequence[str]) -> bool:
    """A phrase of 2+ words names a title when one of its significant words is capitalised, or when it has 3+
    significant words ("superhero movie" and "the game" are ordinary phrases; "Toy Story" is a title)."""
    significant = [w for w in phrase if w.lower() not in STOP_WORDS] or list(phrase)
    return len(significant) >= 3 or any(w[:1].isupper() for w in significant)


def _key(title: str) -> tuple[str, ...]:
    return tuple(normalize_title(title).split())


class TitleMatcher:
    """Finds titles of a list named in a text (see the module doc for the rules)."""

    def __init__(self, titles: Iterable[str]) -> None:
        self._index: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        self._titles: set[str] = set()
        for title in titles:
            self.add(title, sort=False)
        for bucket in self._index.values():
            bucket.sort(key=lambda kt: -len(kt[0]))  # longest titles first

    def add(self, title: str, sort: bool = True) -> None:
        if not title or title in self._titles:
            return
        self._titles.add(title)
        key = _key(title)
        if not key or (len(key) == 1 and (len(key[0]) <= 2 or key[0] in COMMON_WORDS)):
            return
        bucket = self._index.setdefault(key[0], [])
        bucket.append((key, title))
        if sort:
            bucket.sort(key=lambda kt: -len(kt[0]))

    def __contains__(self, title: str) -> bool:
        key = _key(title)
        return any(k == key for k, _ in self._index.get(key[0] if key else "", []))

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(first word, end word, title) of every title occurrence in `text`."""
        found_words = words(text)
        lower = [w.lower() for w in found_words]
        found = []
        for i, word in enumerate(lower):
            for key, title in self._index.get(word, ()):
                if tuple(lower[i:i + len(key)]) != key:
                    continue
                if len(key) == 1 and found_words[i] != words(title)[0]:
                    continue  # one-word titles only with their own capitalisation
                if len(key) > 1 and not _looks_like_a_title(found_words[i:i + len(key)]):
                    continue
                found.append((i, i + len(key), title))
        return found

    def find(self, text: str) -> list[str]:
        return list(dict.fromkeys(t for _, _, t in self.spans(text)))

    def with_titles(self, titles: Iterable[str]) -> TitleMatcher:
        """A copy that also knows `titles`."""
        out = TitleMatcher([])
        out._index = {k: list(v) for k, v in self._index.items()}
        out._titles = set(self._titles)
        for title in titles:
            out.add(title)
        return out


def named_titles_outside(text: str, allowed: Collection[str], matcher: TitleMatcher) -> list[str]:
    """Titles `text` names that are not in `allowed` (a title inside an allowed one, e.g. "Toy Story" in
    "Toy Story 2", does not count)."""
    spans = matcher.with_titles(allowed).spans(text)
    allowed_keys = {_key(t) for t in allowed}
    allowed_spans = [(a, b) for a, b, t in spans if _key(t) in allowed_keys]
    bad = [title for a, b, title in spans
           if _key(title) not in allowed_keys and not any(x <= a and b <= y for x, y in allowed_spans)]
    return list(dict.fromkeys(bad))


# -- catalog items a person names in a message --------------------------------------------------------------------


@dataclass(frozen=True)
class Spot:
    """A catalog title found in a message: characters [start, end) name item `item_id`."""

    item_id: str
    start: int
    end: int
    text: str
    quoted: bool = False


class TitleSpotter:
    """Finds catalog titles in a person's message without mistaking common words for titles.

    Index keys are `title_keys` and, second choice, the part before a colon ("star wars"). When several items
    share a key the one whose own title is exactly the key wins, then the most popular.
    """

    def __init__(self, catalog: Catalog, popularity: dict | None = None):
        self.catalog = catalog
        popularity = popularity or {}
        primary: dict[str, list[str]] = {}
        alias: dict[str, list[str]] = {}
        for item in catalog:
            keys = title_keys(item)
            for key in keys:
                primary.setdefault(key, []).append(item.item_id)
            head = normalize_title(re.split(r":| - ", item.title.partition(" (")[0])[0])
            if head and head not in keys and len(head) >= 3:
                for key in {head, without_article(head)}:
                    alias.setdefault(key, []).append(item.item_id)
        order = {item_id: i for i, item_id in enumerate(catalog.items)}

        def rank(key: str, ids: list[str]) -> tuple[str, ...]:
            return tuple(sorted(dict.fromkeys(ids), key=lambda i: (normalize_title(catalog.items[i].title) != key,
                                                                   -popularity.get(i, 0), order[i])))

        self._primary = {k: rank(k, v) for k, v in primary.items()}
        self._alias = {k: rank(k, v) for k, v in alias.items() if k not in self._primary}

    @cached_property
    def vocabulary(self) -> frozenset[str]:
        """Words a free-text ask can be made of: the catalog's own words (titles, genres, tags, descriptions)
        and the whole words of the default embedder's vocabulary when it is installed."""
        found = {w.lower() for item in self.catalog for w in TOKEN_RE.findall(item.text)}
        try:
            from recllm.embed import default_model_path

            vocab = default_model_path() / "vocab.txt"
            found.update(w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha())
        except (RecllmError, OSError):
            pass
        return frozenset(found)

    def lookup(self, text: str) -> str | None:
        """The item a span names exactly (normalised), else None."""
        key = normalize_title(text)
        ids = self._primary.get(key) or self._alias.get(key)
        return ids[0] if ids else None

    def spot(self, text: str, *, quoted: bool = True) -> tuple[list[Spot], list[str]]:
        """(titles found, quoted strings that name nothing). Spans never overlap."""
        spots: list[Spot] = []
        unknown: list[str] = []
        taken = [False] * len(text)

        def add(item_id: str, start: int, end: int, is_quoted: bool = False) -> None:
            spots.append(Spot(item_id, start, end, text[start:end], is_quoted))
            for i in range(start, end):
                taken[i] = True

        if quoted:
            for match in _QUOTED_RE.finditer(text):
                inner = match.group(1) or match.group(2)
                start = match.start(1) if match.group(1) else match.start(2)
                item_id = self.lookup(inner) or self.catalog.resolve(inner)
                if item_id:
                    add(item_id, start, start + len(inner), True)
                elif len(inner.split()) <= MAX_TITLE_TOKENS:
                    unknown.append(inner.strip())
                    for i in range(match.start(), match.end()):
                        taken[i] = True
        tokens = [(m.start(), m.end(), m.group()) for m in TOKEN_RE.finditer(text)]
        self._scan(text, tokens, taken, _cue_segments(text), add)
        spots.sort(key=lambda s: s.start)
        return spots, unknown

    def _scan(self, text: str, tokens: list, taken: list[bool], cue_spans: list, add: Callable) -> None:
        lowercase_text = text == text.lower() or text == text.upper()
        conjuncts = _conjuncts(text, cue_spans)
        i = 0
        while i < len(tokens):
            start = tokens[i][0]
            if taken[start]:
                i += 1
                continue
            in_cue = any(a <= start < b for a, b in cue_spans)
            hit = None
            for n in range(min(MAX_TITLE_TOKENS, len(tokens) - i), 0, -1):
                end = tokens[i + n - 1][1]
                if any(taken[start:end]):
                    continue
                item_id = self.lookup(text[start:end])
                if item_id is None:
                    continue
                span_words = [t[2].lower() for t in tokens[i:i + n]]
                if _accept(text, tokens, i, n, span_words, in_cue, lowercase_text, (start, end) in conjuncts):
                    hit = (item_id, start, end, n)
                    break
            if hit:
                add(hit[0], hit[1], hit[2])
                i += hit[3]
            else:
                i += 1
        # a conjunct after a cue that named nothing exactly: a near spelling ("toy stroy")
        for start, end in sorted(conjuncts):
            if any(taken[start:end]):
                continue
            span_words = [w.lower() for w in TOKEN_RE.findall(text[start:end])]
            if len(span_words) >= 2 and not all(w in COMMON_WORDS for w in span_words) and end - start >= 6:
                item_id = self.catalog.resolve(text[start:end])
                if item_id:
                    add(item_id, start, end)


def _cue_segments(text: str) -> list[tuple[int, int]]:
    """Character ranges after a cue word ("loved", "like", ...) up to the end of the clause."""
    segments = []
    for cue in _CUE_RE.finditer(text):
        stop = CLAUSE_BREAK_RE.search(text, cue.end())
        segments.append((cue.end(), stop.start() if stop else len(text)))
    return segments


def _conjuncts(text: str, cue_spans) -> set[tuple[int, int]]:
    """The list members of each cue segment ("Heat", "Toy Story" in "loved Heat and Toy Story")."""
    out = set()
    for a, b in cue_spans:
        pos = a
        for sep in list(_CONJ_RE.finditer(text, a, b)) + [None]:
            end = sep.start() if sep else b
            piece = text[pos:end]
            stripped = piece.strip(" \t'\"“”?!,.")
            if stripped:
                offset = pos + piece.find(stripped)
                out.add((offset, offset + len(stripped)))
            pos = sep.end() if sep else b
    return out


def _accept(text, tokens, i, n, span_words, in_cue, lowercase_text, whole_conjunct) -> bool:
    """Whether the span of tokens [i, i + n), which names a title exactly, is meant as that title."""
    first = tokens[i][2]
    capital = first[:1].isupper() and not lowercase_text
    all_common = all(w in COMMON_WORDS for w in span_words)
    if whole_conjunct:  # "loved heat": a whole list member after a cue
        return not all_common or capital
    if n >= 2:  # "toy story"; "The One" only capitalised after a cue or in Title Case
        title_case = all(t[2][:1].isupper() for t in tokens[i:i + n])
        return not all_common or (capital and (in_cue or title_case))
    if not capital or all_common:  # one word: capitalised and not a common word ("Heat", never "Kids")
        return False
    before = text[tokens[i - 1][1]:tokens[i][0]] if i else "."
    if in_cue or not re.search(r"[.!?\n\"“]", before) and i:
        return True
    # first word of a sentence: a title only when the sentence goes on like one ("Heat was great", "Heat?")
    return bool(re.match(r"\s*(?:$|[,?!.&]|(?:was|is|were|and|or)\b)", text[tokens[i][1]:], re.IGNORECASE))


_SPOTTERS: weakref.WeakKeyDictionary[Catalog, TitleSpotter] = weakref.WeakKeyDictionary()
_SPOTTERS_LOCK = threading.Lock()


def title_spotter(catalog: Catalog, popularity: dict | None = None) -> TitleSpotter:
    """One `TitleSpotter` per catalog object (built once, by the first caller's `popularity`; it holds no
    session state)."""
    with _SPOTTERS_LOCK:
        spotter = _SPOTTERS.get(catalog)
        if spotter is None:
            spotter = _SPOTTERS[catalog] = TitleSpotter(catalog, popularity)
        return spotter
