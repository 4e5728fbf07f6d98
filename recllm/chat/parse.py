"""Reading one chat message: `MessageParser.parse(message) -> Parsed`, what the message asks for.

Rules only, deterministic, no conversation state: the intent of the whole message (reset, profile, user,
help, why, greeting), then titles (`recllm.titles.TitleSpotter`) and what stands around them (liked, disliked,
"something like"), references to the shown list (`recllm.refs`), genre and era constraints, list-level
refinements ("older", "something else"), and the free-text ask that is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from recllm.catalog import Catalog, clean_text
from recllm.chat.lexicon import (
    ANCHOR_RE, CLEAR_ALL_RE, CLEAR_GENRES_RE, CLEAR_YEARS_RE, DECADE_BOUND_RE, DECADE_RE, DECADE_WORDS, GENRE_WORDS,
    GREET_RE, HELP_RE, KIDS_GENRES, KIDS_RE, LIKE_BEFORE_RE, LIKE_VERBS, MEDIA, MORE_RE, NEG_AFTER_RE, NEG_LIKE_RE,
    NEG_TITLE_RE, NEWER_RE, OLD_BEFORE, OLD_RE, OLDER_RE, PROFILE_RE, RECENT_RE, RECENT_YEARS, REJECT_BEFORE_RE,
    REJECT_VERBS, RESET_RE, USER_RE, VIOLENT_GENRES, VIOLENT_RE, YEAR_BOUND_RE, YEAR_RANGE_RE, YEAR_RE,
)
from recllm.refs import FOCUS_RE, REF_RE, WHY_NOT_RE, Ref, is_why, ref_from_match, why_target
from recllm.titles import CLAUSE_BREAK_RE, STOP_WORDS, TOKEN_RE, TitleSpotter, title_spotter


@dataclass
class Parsed:
    """What one message asks for. Produced by `MessageParser.parse`; changes nothing by itself."""

    text: str
    intent: str = "act"  # act | reset | profile | why | user | help | greet | none
    user_id: str | None = None
    why: Ref | None = None
    reject: list[Ref] = field(default_factory=list)  # shown items turned down ("drop #2", "not that one")
    like: list[Ref] = field(default_factory=list)  # shown items to follow ("more like #3")
    liked: list[str] = field(default_factory=list)  # item ids the person likes ("I loved Heat")
    disliked: list[str] = field(default_factory=list)  # item ids the person does not like
    anchors: list[str] = field(default_factory=list)  # item ids asked for "something like"
    unknown_titles: list[str] = field(default_factory=list)
    shift: str | None = None  # "older" | "newer"
    more: bool = False  # "something else": the shown items are passed over
    only_genres: tuple[str, ...] | None = None  # "only comedies"
    want_genres: tuple[str, ...] | None = None  # "for kids" (any of these)
    exclude_genres: tuple[str, ...] = ()  # "no horror", "less violent"
    allow_genres: tuple[str, ...] = ()  # "horror is fine"
    year_min: int | None = None
    year_max: int | None = None
    years_set: bool = False  # the message gave an era
    clear_genres: bool = False
    clear_years: bool = False
    query: str | None = None  # the free-text ask left when everything above is taken out

    @property
    def has_constraints(self) -> bool:
        return bool(self.only_genres or self.want_genres or self.exclude_genres or self.allow_genres
                    or self.years_set or self.clear_genres or self.clear_years)

    @property
    def query_only(self) -> bool:
        """Nothing but free text: a paraphrase of a command ("go back further in time") looks like this too."""
        return bool(self.query) and not (self.reject or self.like or self.liked or self.disliked or self.anchors
                                         or self.shift or self.more or self.has_constraints)

    @property
    def actionable(self) -> bool:
        return bool(self.reject or self.like or self.liked or self.disliked or self.anchors or self.shift
                    or self.more or self.has_constraints or self.query)


class MessageParser:
    """Rules that turn a message into a `Parsed` for one catalog. Holds no conversation state."""

    def __init__(self, catalog: Catalog, spotter: TitleSpotter | None = None, max_chars: int | None = None):
        self.catalog = catalog
        self.max_chars = max_chars  # characters of a message that are read (None: all); the rest is ignored
        self.spotter = spotter or title_spotter(catalog)
        names = sorted({g for item in catalog for g in item.genres})
        self.genres = names
        words = {}
        for name in names:
            alts = [GENRE_WORDS[name]] if name in GENRE_WORDS else []
            alts.append(re.escape(name.lower()) + r"s?")
            words[name] = "|".join(alts)
        self._genre_words = words
        any_genre = "|".join(f"(?:{w})" for w in words.values()) or r"(?!x)x"
        self._genre_any = re.compile(rf"\b(?:{any_genre})\b", re.IGNORECASE)
        one = rf"(?:{any_genre}){MEDIA}"
        glist = rf"{one}(?:\s*(?:,|\band\b|\bor\b|&|/|\bplus\b)\s*(?:{one}))*"
        self._only_re = re.compile(
            rf"\b(?:only|just|strictly|purely|exclusively|nothing\s+but)\s+(?:(?:the|some)\s+)?(?P<g>{glist})\b"
            rf"|\b(?P<g2>{glist})\s+only\b", re.IGNORECASE)
        self._exclude_re = re.compile(
            rf"\b(?:no|not|without|nothing|skip|avoid|hate|dislike|no\s+more|less|fewer|except|but\s+not|"
            rf"other\s+than|anything\s+but|minus|(?:do|did)\s*n[o']?t\s+(?:like|want|enjoy))\s+"
            rf"(?:(?:any|more|the|too|so|very|that|really|a\s+lot\s+of|much)\s+)*(?P<g>{glist})\b"
            rf"|\b(?P<g2>{glist})[- ]free\b", re.IGNORECASE)
        self._allow_re = re.compile(
            rf"\b(?P<g>{glist})\s+(?:is|are)\s+(?:fine|ok|okay|good|allowed|welcome)\b|"
            rf"\b(?:allow|include|with)\s+(?P<g2>{glist})\s+(?:again|too|back)\b", re.IGNORECASE)
        years = [item.year for item in catalog if item.year]
        self.max_year = max(years) if years else None

    def genres_in(self, text: str) -> tuple[str, ...]:
        """Catalog genres named in `text` ("comedies and dramas" -> Comedy, Drama)."""
        out = []
        for name, pattern in self._genre_words.items():
            if re.search(rf"\b(?:{pattern})\b", text, re.IGNORECASE) and name not in out:
                out.append(name)
        return tuple(out)

    def parse(self, message: str, *, shown: list[str] = ()) -> Parsed:
        """Read one message. `shown`: item ids on the list now (for titles named in a why/reject)."""
        text = clean_text(message, self.max_chars)
        parsed = Parsed(text=text)
        if not text.strip(" .!?"):
            parsed.intent = "none"
            return parsed
        if RESET_RE.search(text):
            parsed.intent = "reset"
            return parsed
        if PROFILE_RE.search(text):
            parsed.intent = "profile"
            return parsed
        user = USER_RE.search(text)
        if user:
            parsed.intent = "user"
            parsed.user_id = user.group("user") or user.group("user2")
            return parsed
        if HELP_RE.search(text):
            parsed.intent = "help"
            return parsed
        asks = is_why(text)
        if asks or WHY_NOT_RE.search(text):  # "why not Titanic?" asks; "why not older?" refines
            target = why_target(text, self.catalog, shown, self.spotter)
            if asks or target is not None:
                parsed.intent = "why"
                parsed.why = target
                return parsed
        if GREET_RE.search(text):
            parsed.intent = "greet"
            return parsed
        self._parse_act(text, parsed, shown)
        return parsed

    # -- everything else ---------------------------------------------------------------------------------

    def _parse_act(self, text: str, parsed: Parsed, shown) -> None:
        work = list(text)  # characters still unexplained; matched spans become spaces

        def mask(start: int, end: int) -> None:
            for i in range(start, end):
                work[i] = " "

        def current() -> str:
            return "".join(work)

        # titles first: "2001: A Space Odyssey" must not become a year
        spots, parsed.unknown_titles = self.spotter.spot(text)
        shown_set = set(shown)
        for spot in spots:
            before = text[_clause_start(text, spot.start):spot.start]
            after = text[spot.end:_clause_end(text, spot.end)]
            negative = bool(NEG_TITLE_RE.search(before) or NEG_AFTER_RE.search(after))
            if negative:
                if spot.item_id in shown_set:
                    parsed.reject.append(Ref(item_id=spot.item_id))
                else:
                    add_new(parsed.disliked, spot.item_id)
            elif re.search(r"\b(?:seen|watched|saw)\b[\w\s,']{0,30}$", before, re.I) and spot.item_id in shown_set:
                parsed.reject.append(Ref(item_id=spot.item_id))
            elif ANCHOR_RE.search(before):
                add_new(parsed.anchors, spot.item_id)
            elif re.search(r"\b(?:love|loved|like|liked|likes|enjoy|enjoyed|adore|adored|fan|fans|watched|seen|saw|"
                           r"favou?rites?)\b", before, re.I):
                add_new(parsed.liked, spot.item_id)
            else:
                add_new(parsed.anchors, spot.item_id)
            mask(spot.start, spot.end)
        for title in parsed.unknown_titles:
            pos = text.find(title)
            if pos >= 0:
                mask(pos, pos + len(title))

        # references to the shown list
        for match in REF_RE.finditer(current()):
            mask(self._ref_action(text, match.start(), ref_from_match(match), parsed), match.end())
        for match in re.finditer(rf"\b(?:{REJECT_VERBS}|{LIKE_VERBS})\s+(?P<n>\d{{1,2}})\b(?!\s*(?:years?|s\b|'s))",
                                 current(), re.IGNORECASE):
            mask(self._ref_action(text, match.start("n"), Ref(rank=int(match.group("n"))), parsed), match.end())
        for match in FOCUS_RE.finditer(current()):
            mask(self._ref_action(text, match.start(), Ref(focus=True), parsed), match.end())

        # constraints
        for match in VIOLENT_RE.finditer(current()):
            parsed.exclude_genres = merge(parsed.exclude_genres, [g for g in VIOLENT_GENRES if g in self.genres])
            mask(match.start(), match.end())
        for match in KIDS_RE.finditer(current()):
            parsed.want_genres = merge(parsed.want_genres or (), [g for g in KIDS_GENRES if g in self.genres])
            mask(match.start(), match.end())
        for match in self._only_re.finditer(current()):
            parsed.only_genres = merge(parsed.only_genres or (), self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        for match in self._allow_re.finditer(current()):
            parsed.allow_genres = merge(parsed.allow_genres, self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        for match in self._exclude_re.finditer(current()):
            parsed.exclude_genres = merge(parsed.exclude_genres,
                                           self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        if CLEAR_ALL_RE.search(current()):
            parsed.clear_genres = parsed.clear_years = True
            for match in CLEAR_ALL_RE.finditer(current()):
                mask(match.start(), match.end())
        for regex, attr in ((CLEAR_GENRES_RE, "clear_genres"), (CLEAR_YEARS_RE, "clear_years")):
            for match in regex.finditer(current()):
                setattr(parsed, attr, True)
                mask(match.start(), match.end())
        # list-level refinements ("nothing too old" is a shift, not an era)
        for regex, shift in ((OLDER_RE, "older"), (NEWER_RE, "newer")):
            for match in regex.finditer(current()):
                parsed.shift = shift
                mask(match.start(), match.end())
        self._parse_years(current, mask, parsed)
        for match in MORE_RE.finditer(current()):
            parsed.more = True
            mask(match.start(), match.end())

        parsed.query = _residual_query(current(), self.spotter.vocabulary)  # genre words stay: the index reads them

    @staticmethod
    def _ref_action(text: str, start: int, ref: Ref, parsed: Parsed) -> int:
        """Record what the words before a reference ask for it; returns where those words start (or `start`)."""
        clause = _clause_start(text, start)
        before = text[clause:start]
        for regex, out in ((NEG_LIKE_RE, parsed.reject), (REJECT_BEFORE_RE, parsed.reject),
                           (LIKE_BEFORE_RE, parsed.like)):
            match = regex.search(before)
            if match:
                out.append(ref)
                return clause + match.start()
        return start  # a bare reference ("#2?") asks nothing: left to the clarifying reply

    def _parse_years(self, current, mask, parsed: Parsed) -> None:
        def decade_range(match) -> tuple[int, int]:
            if match.group("decw"):
                base = DECADE_WORDS[match.group("decw").lower()]
            else:
                digits = match.group("dec")
                if len(digits) == 4:
                    base = int(digits)
                else:
                    tens = int(digits[0])
                    base = (2000 if tens <= 1 else 1900) + tens * 10
            part = (match.group("part") or "").lower()
            return {"early": (base, base + 3), "mid": (base + 3, base + 6), "late": (base + 6, base + 9)}.get(
                part, (base, base + 9))

        lows, highs = [], []
        for match in DECADE_BOUND_RE.finditer(current()):
            start, end = decade_range(DECADE_RE.search(match.group("d")))
            op = " ".join(match.group("op").lower().split())
            before = op in ("before", "pre", "prior to", "older than")
            if op == "from" and not match.group("on"):
                lows.append(start)
                highs.append(end)
            elif before != bool(match.group("neg")):  # "before the 80s", "nothing after the 80s"
                highs.append(start - 1 if before else end)
            else:
                lows.append(start if op in ("since", "from") or match.group("neg") else end + 1)
            mask(match.start(), match.end())
        for match in YEAR_RANGE_RE.finditer(current()):
            a, b = sorted((int(match.group("a")), int(match.group("b"))))
            lows.append(a)
            highs.append(b)
            mask(match.start(), match.end())
        for match in YEAR_BOUND_RE.finditer(current()):
            if match.group("y2"):
                year, op = int(match.group("y2")), match.group("op2").lower()
                if any(w in op for w in ("later", "newer", "after", "up")):
                    lows.append(year)
                else:
                    highs.append(year)
            else:
                year, op = int(match.group("y")), " ".join(match.group("op").lower().split())
                neg = bool(match.group("neg"))
                if op in ("before", "pre", "prior to", "older than", "earlier than"):
                    (lows if neg else highs).append(year if neg else year - 1)
                elif op in ("until", "up to", "no later than"):
                    (lows if neg else highs).append(year + 1 if neg else year)
                elif op in ("after", "post", "newer than", "later than", "more recent than"):
                    (highs if neg else lows).append(year if neg else year + 1)
                elif op == "from" and not match.group("on"):
                    lows.append(year)
                    highs.append(year)
                else:
                    (highs if neg else lows).append(year - 1 if neg else year)
            mask(match.start(), match.end())
        decades = [decade_range(m) for m in DECADE_RE.finditer(current())]
        for match in DECADE_RE.finditer(current()):
            mask(match.start(), match.end())
        if decades:  # "the 80s or 90s": the span of all decades named
            lows.append(min(d[0] for d in decades))
            highs.append(max(d[1] for d in decades))
        for match in YEAR_RE.finditer(current()):
            lows.append(int(match.group("y")))
            highs.append(int(match.group("y")))
            mask(match.start(), match.end())
        if not (lows or highs):
            if OLD_RE.search(current()):
                highs.append(OLD_BEFORE - 1)
                for match in OLD_RE.finditer(current()):
                    mask(match.start(), match.end())
            elif RECENT_RE.search(current()) and self.max_year:
                lows.append(self.max_year - RECENT_YEARS + 1)
                for match in RECENT_RE.finditer(current()):
                    mask(match.start(), match.end())
        if lows or highs:
            parsed.years_set = True
            parsed.year_min = min(lows) if lows else None
            parsed.year_max = max(highs) if highs else None
            if parsed.year_min is not None and parsed.year_max is not None and parsed.year_min > parsed.year_max:
                parsed.year_min, parsed.year_max = parsed.year_max, parsed.year_min


def add_new(values: list, value) -> None:
    """Append `value` unless `values` has it."""
    if value not in values:
        values.append(value)


def merge(current: tuple, new) -> tuple:
    """`current` then the members of `new` it lacks."""
    return tuple(dict.fromkeys([*current, *new]))


def _clause_start(text: str, pos: int) -> int:
    start = 0
    for match in CLAUSE_BREAK_RE.finditer(text, 0, pos):
        start = match.end()
    return start


def _clause_end(text: str, pos: int) -> int:
    match = CLAUSE_BREAK_RE.search(text, pos)
    return match.start() if match else len(text)


def _residual_query(work: str, vocabulary: frozenset[str]) -> str | None:
    """The free-text ask left in `work` (explained spans blanked), or None when no known content word remains."""
    tokens = [w.lower() for w in TOKEN_RE.findall(work)]
    content = [w for w in tokens if w not in STOP_WORDS and not w.isdigit() and len(w) > 1]
    if not any(w in vocabulary or w.rstrip("s") in vocabulary for w in content):
        return None
    query = " ".join(work.split())
    edge = r"(?:\b(?:and|or|but|with|from|for|the|a|an|of|to|in|on|by|than|like|please)\b|[,;:!?.\-])"
    query = re.sub(rf"^(?:\s*{edge})+|(?:\s*{edge})+$", "", query, flags=re.IGNORECASE).strip()
    query = re.sub(r"\s+([,.;:!?])", r"\1", query)
    return query[:200] or None


