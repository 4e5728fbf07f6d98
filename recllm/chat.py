"""Chat sessions: a conversation turned into recommendation requests, with refinements and "why" answers.

A `ChatSession` wraps one `engine.Recommender` and keeps everything one person told it: the titles they
like (history gathered from the chat), dislikes, constraints (genres in/out, years), the items they turned
down, the current free-text ask, and the last list shown with the `Result` (trace) of the turn that made
it. State lives on the session object only, so concurrent sessions never mix.

Understanding is deterministic: rules find intents, refinements, constraints and item references; titles
are spotted by exact lookup of candidate spans (n-grams, quoted text, the words after "loved", "like",
...) in a title index built from the catalog, with guards against common words ("Kids", "Up", "It").
When the rules find nothing to act on, or nothing but free text (which may be a paraphrased command: "go
back further in time"), the message is compared by embedding similarity with example messages
(`prompts/chat_intents.txt`). The language model only ranks and phrases, inside the engine.

One turn:
    parse(message) -> Parsed            what the message asks (pure, no state change)
    session applies it                  history / dislikes / constraints / exclusions updated
    engine.recommend(Request, explain=0)   the ranked list, shown at once
    engine.explain_stream(result, rank)    reasons of the top `explain` items, streamed
Every reply text comes from `prompts/chat_replies.txt`. Errors the engine raises (`RecllmError`) become a
short reply; a message nothing can be made of gets a clarifying reply.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from recllm import paths
from recllm.catalog import Catalog, clean_text, normalize_title
from recllm.errors import InputError, RecllmError, UnknownUser
from recllm.memory import Memory
from recllm.prompts import Prompt, join_and

log = logging.getLogger(__name__)

MAX_MESSAGE = 1000  # characters of a message (default of engine.Limits.max_message_chars); longer: an error reply
DEFAULT_K = 5  # items shown per turn
DEFAULT_EXPLAIN = 3  # items of a turn that get a streamed reason
MAX_TITLE_TOKENS = 12  # longest span (in words) the title spotter tries
INTENT_MIN_SIM = 0.72  # cosine to the nearest example message that overrides a free-text reading
INTENT_MIN_SIM_UNCLEAR = 0.60  # ... for a message the rules could make nothing of
RECENT_YEARS = 5  # "recent" = the catalog's newest 5 years
OLD_BEFORE = 1980  # "old" / "classic" = before this year
PROFILE_TITLES = 8  # titles named per line of "what do you know about me?"
KEEP_RESULTS = 10  # results (traces) of the last turns kept for "why X?" about an earlier list
KEEP_MESSAGES = 400  # transcript messages kept per session
VIOLENT_GENRES = ("Horror", "Thriller", "War", "Crime")  # excluded by "less violent"
KIDS_GENRES = ("Children", "Animation")  # required (any) by "for kids"

# ------------------------------------------------------------------------------------------- lexicon

# Words for catalog genres (regex alternatives, no groups). Genres of a catalog not listed here still match
# by their own name.
GENRE_WORDS = {
    "Comedy": r"comed(?:y|ies)|funny|hilarious|humou?rous|rom-?coms?",
    "Horror": r"horrors?|scary|slashers?|gory|gore|frightening|spooky|creepy",
    "Sci-Fi": r"sci[- ]?fi|science[- ]fiction|scifi",
    "Animation": r"animat(?:ed|ion|ions)|cartoons?|anime",
    "Children": r"kids?|children'?s?|family|families",
    "Romance": r"romances?|romantic|love stor(?:y|ies)",
    "Documentary": r"documentar(?:y|ies)|docs",
    "Thriller": r"thrillers?|suspense(?:ful)?",
    "Action": r"action",
    "Adventure": r"adventures?",
    "Crime": r"crime|gangsters?|heists?|mafia",
    "Drama": r"dramas?|dramatic",
    "Fantasy": r"fantasy|fantasies",
    "Mystery": r"myster(?:y|ies)|whodunn?its?|detective",
    "War": r"war|wartime",
    "Musical": r"musicals?",
    "Western": r"westerns?",
    "Film-Noir": r"film[- ]noirs?|noirs?",
    "IMAX": r"imax",
}
_MEDIA = r"(?:\s+(?:movies?|films?|ones|stuff|flicks?|shows?))?"

# Function words and chat vocabulary: never the content of an ask.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any anything are as at away back be because been before
being both but by can could did do does doing done down during each either else enough even ever every
everything few for from further get gets give go going got had has have having he her here hers him his how i
if in into is it its just least let lets like likes liked love loved made make many maybe me might mine more
most much must my myself need never next no nor not nothing now of off often on once one ones only or other
others our out over own please pretty quite rather really right same see seen she should show so some
something soon still such than thank thanks that the their them then there these they thing things this
those though through to too under until up us very want wanted was watch watched way we well were what when
where which while who whom why will with without would yes yet you your yours movie movies film films flick
flicks recommend recommendation recommendations suggest suggestion suggestions looking look find pick picks
options option ideas idea watching i'd i'm i've you're it's that's what's don't can't won't id im ive youre
dont cant wont gimme lemme wanna gonna pls plz nice cool awesome lol perhaps somethin stuff kinda sorta
enjoy enjoyed enjoying fan fans favorite favourite favourites favorites hate hated hating dislike disliked
adore adored great good bad terrible awful boring was is tonight today another different similar kind type
sort bit lot lots hello hi hey ok okay sure nope nah number top first second third fourth fifth last
already anyway actually instead use know think tell try prefer guess probably definitely thing maybe
""".split())
# Words that never make a title on their own (outside quotes), and whose spans of only such words are not
# titles either: "Kids", "Up", "It", "The One", "Only You", "Love Story" are catalog titles.
COMMON_WORDS = STOP_WORDS | frozenset("""
two three four five six seven eight nine ten new old older newer recent modern classic classics story
stories kid kids child children family people man men woman women girl girls boy boys friend friends life
night day time world home house war space action funny scary horror comedy drama romance crime mystery
fantasy adventure thriller western musical documentary animation animated cartoon sci fi fiction science
dark light heart hearts big little small long short high low hot cold fun star stars gold blue red black
white green lost found end beginning begin start reset help drop remove skip hide weekend together alone
mood feel feeling family's
""".split())

_ORDINALS = {
    "first": 1, "1st": 1, "top": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4,
    "fifth": 5, "5th": 5, "sixth": 6, "6th": 6, "seventh": 7, "7th": 7, "eighth": 8, "8th": 8,
    "ninth": 9, "9th": 9, "tenth": 10, "10th": 10, "last": -1,
}
_ORD_ALT = "|".join(sorted(_ORDINALS, key=len, reverse=True))
_NOUN = r"(?:\s+(?:one|pick|movie|film|item|suggestion|option|title|entry))"
# An item on the shown list: "#2", "number 2", "the second one", "2nd", "the last one".
_REF = (
    rf"#\s*(?P<hash>\d{{1,2}})\b"
    rf"|\b(?:number|no\.|nr\.?|item|pick|option)\s*#?\s*(?P<num>\d{{1,2}})\b"
    rf"|\b(?:the\s+)?(?P<ord>{_ORD_ALT}){_NOUN}\b"
    rf"|\bthe\s+(?P<ord2>{_ORD_ALT})\b(?!\s+(?:time|thing|place|few|couple|part))"
)
_REF_RE = re.compile(_REF, re.IGNORECASE)
# "it", "that one", "this": the item in focus (the last one discussed, else #1)
_FOCUS_RE = re.compile(
    r"\b(?:that|this|it)(?:\s+one)?\b(?=\s*(?:$|[.,!?;:)]|and\b|but\b|please\b|either\b|too\b|again\b|already\b))",
    re.IGNORECASE,
)

_REJECT_VERBS = (
    r"drop|remove|delete|hide|skip|exclude|ditch|lose|cut|nix|scrap|get\s+rid\s+of|not|no|nope|never|"
    r"seen|watched|saw|hate|hated|dislike|disliked|(?:do|did)\s*n[o']?t\s+(?:like|want|enjoy|care\s+for)|"
    r"not\s+interested\s+in|not\s+a\s+fan\s+of|can'?t\s+stand|without|except|instead\s+of"
)
_LIKE_VERBS = (
    r"more\s+like|more\s+of|similar\s+to|closer\s+to|like|love|loved|liked|enjoyed|adore|keep|"
    r"in\s+the\s+vein\s+of|along\s+the\s+lines\s+of|based\s+on"
)
_REJECT_BEFORE_RE = re.compile(rf"\b(?:{_REJECT_VERBS})\b[\w\s,']{{0,24}}$", re.IGNORECASE)
_LIKE_BEFORE_RE = re.compile(rf"\b(?:{_LIKE_VERBS})\b[\w\s,']{{0,16}}$", re.IGNORECASE)
_NEG_LIKE_RE = re.compile(
    r"\b(?:not|n't|nothing|less|never|un)\s*(?:really\s+)?(?:like|love|liked|loved|enjoyed)\b[\w\s,']{0,16}$",
    re.IGNORECASE)

# Titles: what stands before a spotted title decides whether it is liked, disliked or an anchor.
_NEG_TITLE_RE = re.compile(
    r"\b(?:hate|hated|dislike|disliked|(?:do|did)\s*n[o']?t\s+(?:like|love|enjoy|care\s+for)|can'?t\s+stand|"
    r"not\s+a\s+fan\s+of|no\s+more|not|no|never|drop|remove|skip|hide|without|except|instead\s+of|"
    r"bored\s+by|hated\s+watching)\b[\w\s,'&:-]{0,40}$",
    re.IGNORECASE,
)
_NEG_AFTER_RE = re.compile(r"^\W{0,3}(?:\s*(?:was|is|were|are)\s+(?:really\s+|so\s+|too\s+)?"
                           r"(?:terrible|awful|boring|bad|dull|overrated|meh|the\s+worst|not\s+good|horrible)|"
                           r"\s*sucked|\s*was\s+not\s+for\s+me)", re.IGNORECASE)
_ANCHOR_RE = re.compile(
    r"\b(?:(?:something|anything|movies?|films?|ones?|stuff|things?|more|else)\s+(?:like|similar\s+to)|similar\s+to|"
    r"in\s+the\s+vein\s+of|along\s+the\s+lines\s+of|closer\s+to|such\s+as|if\s+i\s+liked|fans?\s+of|"
    r"recommend(?:ations)?\s+(?:like|based\s+on)|based\s+on)\b[\w\s,'&:-]{0,40}$",
    re.IGNORECASE,
)
_CUE_RE = re.compile(
    r"\b(?:loved|love|liked|like|likes|enjoyed|enjoy|adored|adore|fan\s+of|fans\s+of|watched|seen|saw|hated|hate|"
    r"disliked|dislike|can'?t\s+stand|similar\s+to|vein\s+of|lines\s+of|closer\s+to|such\s+as|about|based\s+on|"
    r"including|favou?rites?\s+(?:is|are|was|were)|than)\b",
    re.IGNORECASE,
)
_CLAUSE_BREAK_RE = re.compile(r"[.!?;\n]|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bwhile\b",
                              re.IGNORECASE)
_CONJ_RE = re.compile(r"\s*(?:,|&|\band\b|\bor\b|\bplus\b|/|\bnor\b)\s*", re.IGNORECASE)
_QUOTED_RE = re.compile(r"[\"“”«»]([^\"“”«»]{1,150})[\"“”«»]|(?<![\w])'([^']{2,150})'(?![\w])")
_TOKEN_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")

# Whole-message intents.
_RESET_RE = re.compile(
    r"^\W*(?:ok(?:ay)?\W+|please\W+|let'?s\W+|can\s+we\W+)?(?:start\s+(?:over|again|afresh|fresh|from\s+scratch)|"
    r"reset|restart|clear\s+(?:it\s+all|everything|all|the\s+chat|my\s+(?:profile|history))|clear|"
    r"forget\s+(?:everything|it\s+all|all\s+(?:of\s+)?(?:that|this)|what\s+i\s+(?:said|told\s+you)|about\s+me)|"
    r"new\s+(?:session|conversation|chat)|begin\s+again|wipe\s+(?:everything|it\s+all|the\s+slate))\b",
    re.IGNORECASE,
)
_PROFILE_RE = re.compile(
    r"\bwhat\s+(?:do|did|else\s+do)\s+you\s+(?:know|remember|think\s+you\s+know|have)\s+(?:about|on)\s+me\b|"
    r"\bwhat\s+(?:have|did)\s+i\s+(?:told|tell|said|say)\b|\bwhat\s+do\s+i\s+like\b|\bmy\s+(?:profile|taste|preferences)\b|"
    r"\bwhat\s+(?:you\s+)?know\s+about\s+me\b|\bwho\s+am\s+i\b",
    re.IGNORECASE,
)
_USER_RE = re.compile(
    r"\b(?:i\s*am|i'?m|use|as|be|start\s+(?:from|with|as)|switch\s+to|load|pick|choose|log\s+in\s+as)\s+"
    r"(?:the\s+)?(?:movielens\s+)?user\s*(?:id)?\s*[#:]?\s*(?P<user>[\w-]{1,40})\b|"
    r"^\W*(?:movielens\s+)?user\s*(?:id)?\s*[#:]?\s*(?P<user2>\d{1,10})\W*$",
    re.IGNORECASE,
)
_HELP_RE = re.compile(
    r"^\W*(?:help|what\s+can\s+you\s+do|how\s+does\s+(?:this|it)\s+work|what\s+do\s+i\s+(?:do|say|type))\W*$",
    re.IGNORECASE)
_GREET_RE = re.compile(r"^\W*(?:hi|hello|hey|hiya|howdy|yo|good\s+(?:morning|afternoon|evening)|thanks?(?:\s+you)?|"
                       r"ty|cheers|great|cool|nice|ok(?:ay)?|sure)(?:\s+(?:there|so\s+much|a\s+lot|!+))*\W*$",
                       re.IGNORECASE)
_WHY_RE = re.compile(
    r"^\W*(?:and\s+|but\s+|so\s+|ok(?:ay)?\W+)?why\b(?!\s+not\b)|\bwhy\s+(?:did|do|would|was|is|are|were|have|has)\s+"
    r"(?:you|it|that|this|they)\b|\bhow\s+come\b|\bwhat\s+makes\s+you\s+think\b|\bexplain\b|\bwhat(?:'s|\s+is)\s+the\s+"
    r"reason\b|\breason\s+for\b|\bwhy\?",
    re.IGNORECASE,
)

# Refinements.
_MORE_RE = re.compile(
    r"\b(?:something|anything)\s+else\b|\b(?:show\s+(?:me\s+)?|give\s+(?:me\s+)?|any\s+|some\s+)?"
    r"(?:more|other|others|different|new)\s+(?:ones|options|picks|suggestions|ideas|movies|films|titles)\b|"
    r"^\W*(?:more|others|next|again|no|nope|nah|none|another)\W*(?:please|pls)?\W*$|"
    r"\bnone\s+of\s+(?:these|those|them)\b|\bnot\s+(?:these|those)\b|\b(?:other|different)\s+(?:ones|options)\b|"
    r"\bshow\s+(?:me\s+)?(?:more|others)\b",
    re.IGNORECASE,
)
_OLDER_RE = re.compile(r"\b(?:older|earlier|less\s+recent|further\s+back|more\s+classic|not\s+so\s+new|"
                       r"not\s+as\s+new|from\s+further\s+back)\b", re.IGNORECASE)
_NEWER_RE = re.compile(r"\b(?:newer|more\s+recent|later\s+ones|more\s+modern|less\s+old|not\s+so\s+old|"
                       r"not\s+as\s+old|nothing\s+(?:too|so)\s+old|fresher)\b", re.IGNORECASE)
_OLD_RE = re.compile(r"\b(?:old(?:ies)?|classics?|vintage|golden[- ]age|black[- ]and[- ]white)"
                     r"(?=\s+(?:movies?|films?|ones|stuff|flicks?)|\W*$)|\bclassics\b|\boldies\b", re.IGNORECASE)
_RECENT_RE = re.compile(r"\b(?:recent|new|latest|modern|current|contemporary)(?=\s+(?:movies?|films?|ones|stuff|"
                        r"releases?|flicks?)|\W*$)|\bnew\s+releases?\b|\brecent(?:ly)?\b", re.IGNORECASE)
_KIDS_RE = re.compile(
    r"\b(?:for|with|watch\s+with|suitable\s+for|ok\s+for|safe\s+for)\s+(?:the\s+|my\s+|our\s+|young\s+|little\s+|small\s+|"
    r"young(?:er)?\s+|the\s+whole\s+)*(?:kids?|children|child|family|toddlers?|little\s+ones|son|daughter|"
    r"nephews?|nieces?|grand(?:kids|children))\b|\b(?:kid|family|child|children)[- ]friendly\b|"
    r"\b\d{1,2}[- ]?(?:year|yr)s?[- ]?olds?\b|\bfamily\s+(?:movies?|films?|night)\b|\bkids?\s+(?:movies?|films?)\b",
    re.IGNORECASE,
)
_VIOLENT_RE = re.compile(
    r"\b(?:less|not(?:\s+(?:too|so|that|very))?|non-?|without|no|nothing|fewer|minus|avoid|skip)\s*"
    r"(?:violent|violence|gory|gore|brutal|bloody|grim|bloodshed)\b|\bgentler?\b|\bwholesome\b|\bsofter\b",
    re.IGNORECASE,
)
_CLEAR_ALL_RE = re.compile(r"\b(?:no|clear|remove|drop|reset|forget)\s+(?:the\s+|all\s+(?:the\s+)?|any\s+)?"
                           r"(?:filters?|constraints?|restrictions?)\b|\banything\s+goes\b", re.IGNORECASE)
_CLEAR_GENRES_RE = re.compile(r"\b(?:any|all)\s+(?:genres?|kinds?|types?)\b|\bgenre\s+doesn'?t\s+matter\b",
                              re.IGNORECASE)
_CLEAR_YEARS_RE = re.compile(r"\b(?:any|all)\s+(?:years?|eras?|decades?|periods?|time)\b|"
                             r"\b(?:year|era|age)\s+doesn'?t\s+matter\b", re.IGNORECASE)

_YEAR = r"(?:18[89]\d|19\d\d|20[0-4]\d)"
_DECADE_WORDS = {"twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
                 "seventies": 1970, "eighties": 1980, "nineties": 1990, "noughties": 2000, "aughts": 2000,
                 "two thousands": 2000}
_DECADE = (r"(?:(?P<part>early|mid|late)[- ]?)?(?:the\s+)?(?:(?:['’])?(?P<dec>(?:19|20)?\d0)\s*['’]?s\b|"
           rf"(?P<decw>{'|'.join(_DECADE_WORDS)})\b)")
_DECADE_RE = re.compile(_DECADE, re.IGNORECASE)
_YEAR_RANGE_RE = re.compile(
    rf"\b(?:between|from)?\s*(?P<a>{_YEAR})\s*(?:-|–|—|to|until|till|through|and)\s*(?P<b>{_YEAR})\b", re.IGNORECASE)
_YEAR_BOUND_RE = re.compile(
    rf"(?P<neg>\b(?:nothing|none|no|not)\s+(?:\w+\s+)?)?\b(?P<op>before|pre|prior\s+to|older\s+than|earlier\s+than|until|up\s+to|no\s+later\s+than|"
    rf"after|post|since|newer\s+than|later\s+than|more\s+recent\s+than|no\s+earlier\s+than|from)"
    rf"[\s-]*(?:the\s+(?:year\s+)?)?(?P<y>{_YEAR})(?P<on>\s+(?:on(?:wards?)?|and\s+(?:later|after|up|newer)|or\s+(?:later|newer)))?\b"
    rf"|\b(?P<y2>{_YEAR})\s+(?P<op2>or\s+(?:later|newer|after|earlier|older|before)|and\s+(?:later|up|after|earlier|before))\b",
    re.IGNORECASE,
)
_DECADE_BOUND_RE = re.compile(rf"(?P<neg>\b(?:nothing|none|no|not)\s+(?:\w+\s+)?)?"
                              rf"\b(?P<op>before|pre|prior\s+to|older\s+than|after|post|since|newer\s+than|from)"
                              rf"[\s-]*(?:the\s+)?(?P<d>{_DECADE})(?P<on>\s+on(?:wards?)?)?", re.IGNORECASE)
_YEAR_RE = re.compile(rf"\b(?:in\s+|from\s+)?(?P<y>{_YEAR})\b")

# ------------------------------------------------------------------------------------------ templates


class Templates:
    """Reply templates: `[name]` sections of a text file, each a `string.Template` checked on render."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecllmError(f"cannot read the chat templates {path}: {exc}") from None
        self.prompts: dict[str, Prompt] = {}
        for name, body in _sections(text).items():
            self.prompts[name] = Prompt(name=f"{path.stem}:{name}", text="\n".join(body).strip("\n"), path=path)

    def render(self, name: str, **values: object) -> str:
        return self.prompts[name].render(**values)


def _sections(text: str) -> dict[str, list[str]]:
    """{section name: its lines} of a `[name]`-sectioned file; `#` comment lines dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^\[([a-z0-9_\-]+)\]\s*$", line)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None and not line.startswith("#"):
            current.append(line)
    return sections


_TEMPLATES: dict[Path, Templates] = {}
_TEMPLATES_LOCK = threading.Lock()


def templates() -> Templates:
    """The chat reply templates (`prompts/chat_replies.txt`), read once per process."""
    path = paths.prompts_dir() / "chat_replies.txt"
    with _TEMPLATES_LOCK:
        if path not in _TEMPLATES:
            _TEMPLATES[path] = Templates(path)
        return _TEMPLATES[path]


# ------------------------------------------------------------------------------------------- titles


@dataclass(frozen=True)
class Spot:
    """A catalog title found in a message: characters [start, end) name item `item_id`."""

    item_id: str
    start: int
    end: int
    text: str
    quoted: bool = False


class TitleSpotter:
    """Finds catalog titles in free text without mistaking common words for titles.

    Index keys are normalised titles (also with the year, without an alternate title or leading article)
    and, second choice, the part before a colon ("star wars"). When several items share a key the one whose
    own title is exactly the key wins, then the most popular.
    """

    def __init__(self, catalog: Catalog, popularity: dict | None = None):
        self.catalog = catalog
        popularity = popularity or {}
        primary: dict[str, list[str]] = {}
        alias: dict[str, list[str]] = {}
        for item in catalog:
            title = normalize_title(item.title)
            keys = {title, normalize_title(item.label), normalize_title(item.title.partition(" (")[0])}
            for key in list(keys):
                match = re.match(r"^(?:the|a|an) (.+)$", key)
                if match:
                    keys.add(match.group(1))
            for key in keys:
                if key:
                    primary.setdefault(key, []).append(item.item_id)
            head = normalize_title(re.split(r":| - ", item.title.partition(" (")[0])[0])
            if head and head not in keys and len(head) >= 3:
                alias.setdefault(head, []).append(item.item_id)
                match = re.match(r"^(?:the|a|an) (.+)$", head)
                if match:
                    alias.setdefault(match.group(1), []).append(item.item_id)
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
        words = {w.lower() for item in self.catalog for w in _TOKEN_RE.findall(item.text)}
        try:
            from recllm.embed import default_model_path

            vocab = default_model_path() / "vocab.txt"
            words.update(w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha())
        except (RecllmError, OSError):
            pass
        return frozenset(words)

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
        tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN_RE.finditer(text)]
        cue_spans = self._cue_segments(text)
        self._scan(text, tokens, taken, cue_spans, add)
        spots.sort(key=lambda s: s.start)
        return spots, unknown

    @staticmethod
    def _cue_segments(text: str) -> list[tuple[int, int]]:
        """Character ranges after a cue word ("loved", "like", ...) up to the end of the clause."""
        segments = []
        for cue in _CUE_RE.finditer(text):
            stop = _CLAUSE_BREAK_RE.search(text, cue.end())
            segments.append((cue.end(), stop.start() if stop else len(text)))
        return segments

    def _scan(self, text, tokens, taken, cue_spans, add) -> None:
        lowercase_text = text == text.lower() or text == text.upper()
        conjuncts = self._conjuncts(text, cue_spans)
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
                span = text[start:end]
                item_id = self.lookup(span)
                if item_id is None:
                    continue
                words = [t[2].lower() for t in tokens[i:i + n]]
                if self._accept(text, tokens, i, n, words, in_cue, lowercase_text, (start, end) in conjuncts):
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
            words = [w.lower() for w in _TOKEN_RE.findall(text[start:end])]
            if len(words) >= 2 and not all(w in COMMON_WORDS for w in words) and len(text[start:end]) >= 6:
                item_id = self.catalog.resolve(text[start:end])
                if item_id:
                    add(item_id, start, end)

    @staticmethod
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

    @staticmethod
    def _accept(text, tokens, i, n, words, in_cue, lowercase_text, whole_conjunct) -> bool:
        first = tokens[i][2]
        capital = first[:1].isupper() and not lowercase_text
        all_common = all(w in COMMON_WORDS for w in words)
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


_SPOTTERS: "weakref.WeakKeyDictionary[Catalog, TitleSpotter]" = weakref.WeakKeyDictionary()
_SPOTTERS_LOCK = threading.Lock()


def title_spotter(catalog: Catalog, popularity: dict | None = None) -> TitleSpotter:
    """One `TitleSpotter` per catalog object (built once; it holds no session state)."""
    with _SPOTTERS_LOCK:
        spotter = _SPOTTERS.get(catalog)
        if spotter is None:
            spotter = _SPOTTERS[catalog] = TitleSpotter(catalog, popularity)
        return spotter


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Ref:
    """A reference to an item: `rank` on the shown list (1-based, -1 = last), `item_id`, or the focus."""

    rank: int | None = None
    item_id: str | None = None
    focus: bool = False


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

    def __init__(self, catalog: Catalog, spotter: TitleSpotter | None = None, max_chars: int = MAX_MESSAGE):
        self.catalog = catalog
        self.max_chars = max_chars  # characters of a message that are read; the rest is ignored
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
        one = rf"(?:{any_genre}){_MEDIA}"
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
        if _RESET_RE.search(text):
            parsed.intent = "reset"
            return parsed
        if _PROFILE_RE.search(text):
            parsed.intent = "profile"
            return parsed
        user = _USER_RE.search(text)
        if user:
            parsed.intent = "user"
            parsed.user_id = user.group("user") or user.group("user2")
            return parsed
        if _HELP_RE.search(text):
            parsed.intent = "help"
            return parsed
        why_not = re.match(r"^\W*why\s+not\b", text, re.IGNORECASE)  # "why not Titanic?" asks; "why not older?" refines
        target = self._why_target(text, shown) if why_not or _WHY_RE.search(text) else None
        if _WHY_RE.search(text) or (why_not and target is not None and not target.focus):
            parsed.intent = "why"
            parsed.why = target
            return parsed
        if _GREET_RE.search(text):
            parsed.intent = "greet"
            return parsed
        self._parse_act(text, parsed, shown)
        return parsed

    # -- why ---------------------------------------------------------------------------------------------

    def _why_target(self, text: str, shown) -> Ref | None:
        ref = _REF_RE.search(text)
        if ref:
            return _ref_from_match(ref)
        bare = re.search(r"\b(?:why|explain)\s+(?:#\s*)?(\d{1,2})\b", text, re.IGNORECASE)
        if bare:
            return Ref(rank=int(bare.group(1)))
        item_id = self._shown_title(text, shown)
        if item_id:
            return Ref(item_id=item_id)
        spots, _ = self.spotter.spot(text)
        if spots:
            return Ref(item_id=spots[0].item_id)
        return Ref(focus=True) if _FOCUS_RE.search(text) or re.search(r"^\W*why\W*$", text, re.I) else None

    def _shown_title(self, text: str, shown) -> str | None:
        """A shown item whose title the text contains (longest title first), case-insensitively."""
        norm = f" {normalize_title(text)} "
        best = None
        for item_id in shown:
            item = self.catalog.items.get(item_id)
            if item is None:
                continue
            for key in {normalize_title(item.title), normalize_title(item.title.partition(" (")[0]),
                        re.sub(r"^(?:the|a|an) ", "", normalize_title(item.title))}:
                if len(key) >= 2 and f" {key} " in norm and (best is None or len(key) > best[0]):
                    if key in COMMON_WORDS and not re.search(rf"\b{re.escape(item.title)}\b", text):
                        continue  # "it" is a pronoun unless written as the title
                    best = (len(key), item_id)
        return best[1] if best else None

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
            negative = bool(_NEG_TITLE_RE.search(before) or _NEG_AFTER_RE.search(after))
            if negative:
                if spot.item_id in shown_set:
                    parsed.reject.append(Ref(item_id=spot.item_id))
                else:
                    _add(parsed.disliked, spot.item_id)
            elif re.search(r"\b(?:seen|watched|saw)\b[\w\s,']{0,30}$", before, re.I) and spot.item_id in shown_set:
                parsed.reject.append(Ref(item_id=spot.item_id))
            elif _ANCHOR_RE.search(before):
                _add(parsed.anchors, spot.item_id)
            elif re.search(r"\b(?:love|loved|like|liked|likes|enjoy|enjoyed|adore|adored|fan|fans|watched|seen|saw|"
                           r"favou?rites?)\b", before, re.I):
                _add(parsed.liked, spot.item_id)
            else:
                _add(parsed.anchors, spot.item_id)
            mask(spot.start, spot.end)
        for title in parsed.unknown_titles:
            pos = text.find(title)
            if pos >= 0:
                mask(pos, pos + len(title))

        # references to the shown list
        for match in _REF_RE.finditer(current()):
            mask(self._ref_action(text, match.start(), _ref_from_match(match), parsed), match.end())
        for match in re.finditer(rf"\b(?:{_REJECT_VERBS}|{_LIKE_VERBS})\s+(?P<n>\d{{1,2}})\b(?!\s*(?:years?|s\b|'s))",
                                 current(), re.IGNORECASE):
            mask(self._ref_action(text, match.start("n"), Ref(rank=int(match.group("n"))), parsed), match.end())
        for match in _FOCUS_RE.finditer(current()):
            mask(self._ref_action(text, match.start(), Ref(focus=True), parsed), match.end())

        # constraints
        for match in _VIOLENT_RE.finditer(current()):
            parsed.exclude_genres = _merge(parsed.exclude_genres, [g for g in VIOLENT_GENRES if g in self.genres])
            mask(match.start(), match.end())
        for match in _KIDS_RE.finditer(current()):
            parsed.want_genres = _merge(parsed.want_genres or (), [g for g in KIDS_GENRES if g in self.genres])
            mask(match.start(), match.end())
        for match in self._only_re.finditer(current()):
            parsed.only_genres = _merge(parsed.only_genres or (), self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        for match in self._allow_re.finditer(current()):
            parsed.allow_genres = _merge(parsed.allow_genres, self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        for match in self._exclude_re.finditer(current()):
            parsed.exclude_genres = _merge(parsed.exclude_genres,
                                           self.genres_in(match.group("g") or match.group("g2")))
            mask(match.start(), match.end())
        if _CLEAR_ALL_RE.search(current()):
            parsed.clear_genres = parsed.clear_years = True
            for match in _CLEAR_ALL_RE.finditer(current()):
                mask(match.start(), match.end())
        for regex, attr in ((_CLEAR_GENRES_RE, "clear_genres"), (_CLEAR_YEARS_RE, "clear_years")):
            for match in regex.finditer(current()):
                setattr(parsed, attr, True)
                mask(match.start(), match.end())
        # list-level refinements ("nothing too old" is a shift, not an era)
        for regex, shift in ((_OLDER_RE, "older"), (_NEWER_RE, "newer")):
            for match in regex.finditer(current()):
                parsed.shift = shift
                mask(match.start(), match.end())
        self._parse_years(current, mask, parsed)
        for match in _MORE_RE.finditer(current()):
            parsed.more = True
            mask(match.start(), match.end())

        parsed.query = _residual_query(current(), self.spotter.vocabulary)  # genre words stay: the index reads them

    @staticmethod
    def _ref_action(text: str, start: int, ref: Ref, parsed: Parsed) -> int:
        """Record what the words before a reference ask for it; returns where those words start (or `start`)."""
        clause = _clause_start(text, start)
        before = text[clause:start]
        for regex, out in ((_NEG_LIKE_RE, parsed.reject), (_REJECT_BEFORE_RE, parsed.reject),
                           (_LIKE_BEFORE_RE, parsed.like)):
            match = regex.search(before)
            if match:
                out.append(ref)
                return clause + match.start()
        return start  # a bare reference ("#2?") asks nothing: left to the clarifying reply

    def _parse_years(self, current, mask, parsed: Parsed) -> None:
        def decade_range(match) -> tuple[int, int]:
            if match.group("decw"):
                base = _DECADE_WORDS[match.group("decw").lower()]
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
        for match in _DECADE_BOUND_RE.finditer(current()):
            start, end = decade_range(_DECADE_RE.search(match.group("d")))
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
        for match in _YEAR_RANGE_RE.finditer(current()):
            a, b = sorted((int(match.group("a")), int(match.group("b"))))
            lows.append(a)
            highs.append(b)
            mask(match.start(), match.end())
        for match in _YEAR_BOUND_RE.finditer(current()):
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
        decades = [decade_range(m) for m in _DECADE_RE.finditer(current())]
        for match in _DECADE_RE.finditer(current()):
            mask(match.start(), match.end())
        if decades:  # "the 80s or 90s": the span of all decades named
            lows.append(min(d[0] for d in decades))
            highs.append(max(d[1] for d in decades))
        for match in _YEAR_RE.finditer(current()):
            lows.append(int(match.group("y")))
            highs.append(int(match.group("y")))
            mask(match.start(), match.end())
        if not (lows or highs):
            if _OLD_RE.search(current()):
                highs.append(OLD_BEFORE - 1)
                for match in _OLD_RE.finditer(current()):
                    mask(match.start(), match.end())
            elif _RECENT_RE.search(current()) and self.max_year:
                lows.append(self.max_year - RECENT_YEARS + 1)
                for match in _RECENT_RE.finditer(current()):
                    mask(match.start(), match.end())
        if lows or highs:
            parsed.years_set = True
            parsed.year_min = min(lows) if lows else None
            parsed.year_max = max(highs) if highs else None
            if parsed.year_min is not None and parsed.year_max is not None and parsed.year_min > parsed.year_max:
                parsed.year_min, parsed.year_max = parsed.year_max, parsed.year_min


def _add(values: list, value) -> None:
    if value not in values:
        values.append(value)


def _merge(current: tuple, new) -> tuple:
    return tuple(dict.fromkeys([*current, *new]))


def _ref_from_match(match: re.Match) -> Ref:
    if match.group("hash"):
        return Ref(rank=int(match.group("hash")))
    if match.group("num"):
        return Ref(rank=int(match.group("num")))
    word = (match.group("ord") or match.group("ord2")).lower()
    return Ref(rank=_ORDINALS[word])


def _clause_start(text: str, pos: int) -> int:
    start = 0
    for match in _CLAUSE_BREAK_RE.finditer(text, 0, pos):
        start = match.end()
    return start


def _clause_end(text: str, pos: int) -> int:
    match = _CLAUSE_BREAK_RE.search(text, pos)
    return match.start() if match else len(text)


def _residual_query(work: str, vocabulary: frozenset[str]) -> str | None:
    """The free-text ask left in `work` (explained spans blanked), or None when no known content word remains."""
    words = [w.lower() for w in _TOKEN_RE.findall(work)]
    content = [w for w in words if w not in STOP_WORDS and not w.isdigit() and len(w) > 1]
    if not any(w in vocabulary or w.rstrip("s") in vocabulary for w in content):
        return None
    query = " ".join(work.split())
    edge = r"(?:\b(?:and|or|but|with|from|for|the|a|an|of|to|in|on|by|than|like|please)\b|[,;:!?.\-])"
    query = re.sub(rf"^(?:\s*{edge})+|(?:\s*{edge})+$", "", query, flags=re.IGNORECASE).strip()
    query = re.sub(r"\s+([,.;:!?])", r"\1", query)
    return query[:200] or None


# --------------------------------------------------------------------------------------- embeddings


class IntentIndex:
    """Nearest example message by embedding cosine (`prompts/chat_intents.txt`), for what rules miss."""

    def __init__(self, embedder, path: Path | None = None):
        path = path or paths.prompts_dir() / "chat_intents.txt"
        examples = [(name, line.strip()) for name, lines in _sections(path.read_text(encoding="utf-8")).items()
                    for line in lines if line.strip()]
        self.labels = [name for name, _ in examples]
        self.texts = [text for _, text in examples]
        self.embedder = embedder
        self.vectors = embedder.encode(self.texts, progress=False)  # (N, d), unit rows

    def classify(self, text: str, min_sim: float = INTENT_MIN_SIM) -> tuple[str | None, float]:
        """(intent, cosine) of the nearest example; intent None below `min_sim`."""
        vector = self.embedder.encode([text], progress=False)[0]
        sims = self.vectors @ vector
        best = int(sims.argmax())
        score = float(sims[best])
        return (self.labels[best] if score >= min_sim else None), score


_INTENT_INDEXES: dict[int, IntentIndex] = {}
_INTENT_LOCK = threading.Lock()


def intent_index(embedder) -> IntentIndex:
    """One `IntentIndex` per embedder object (the examples are embedded once)."""
    with _INTENT_LOCK:
        index = _INTENT_INDEXES.get(id(embedder))
        if index is None or index.embedder is not embedder:
            index = _INTENT_INDEXES[id(embedder)] = IntentIndex(embedder)
        return index


# ----------------------------------------------------------------------------------------- session


@dataclass
class Card:
    """One item on the shown list, as a UI renders it."""

    item_id: str
    rank: int  # 1-based position on the list as shown now
    title: str  # Item.label, "Heat (1995)"
    name: str  # title without the year
    year: int | None
    genres: tuple[str, ...]
    reason: str = ""  # the explanation (streamed in; "" for items beyond the explained ones)
    liked: bool | None = None  # thumbs: True up, False down, None not rated

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "rank": self.rank, "title": self.title, "name": self.name,
                "year": self.year, "genres": list(self.genres), "reason": self.reason, "liked": self.liked}


@dataclass
class Reply:
    """One answer of the session. While streaming, `done` is False and `text`/`items` grow."""

    text: str
    items: list[Card] = field(default_factory=list)
    intent: str = "note"  # recommend | why | profile | reset | feedback | clarify | help | greet | error | thinking
    done: bool = True


@dataclass
class Constraints:
    """Filters a session applies to every request until changed."""

    genres: tuple[str, ...] = ()  # item must have any of these
    exclude_genres: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None

    def filters(self, exclude_ids=()):
        from recllm.retrieve import Filters

        return Filters(genres=self.genres, exclude_genres=self.exclude_genres, year_min=self.year_min,
                       year_max=self.year_max, exclude_ids=frozenset(exclude_ids))

    def parts(self) -> list[str]:
        """Short phrases naming each constraint ("only Comedy", "no Horror", "1990–1999")."""
        t = templates()
        out = []
        if self.genres:
            out.append(t.render("filter_only", genres=_join_or(self.genres)))
        if self.exclude_genres:
            out.append(t.render("filter_no", genres=_join_or(self.exclude_genres)))
        if self.year_min is not None and self.year_max is not None:
            out.append(t.render("filter_years", start=self.year_min, end=self.year_max))
        elif self.year_min is not None:
            out.append(t.render("filter_after", start=self.year_min))
        elif self.year_max is not None:
            out.append(t.render("filter_before", end=self.year_max))
        return out


def _join_or(values) -> str:
    return "/".join(values)


@dataclass
class _Plan:
    """What a turn does after the state changes: a reply now, or a request to run first."""

    acks: list[str] = field(default_factory=list)
    reply: Reply | None = None
    recommend: bool = False


class ChatSession:
    """One person's conversation with a `Recommender`. Not shared between people; safe to call from threads.

    `k`: items shown per turn. `explain`: how many of them get a streamed reason. `intent_model`: an
    object with `encode(texts, progress=False)` for the embedding fallback; "auto" takes the recommender's
    embedder (or the packaged default), None turns the fallback off. `memory`: a `recllm.memory.Memory`;
    a session started from a user id then keeps that person's messages and thumbs there and starts with
    their earlier thumbs.
    """

    def __init__(self, recommender, *, k: int = DEFAULT_K, explain: int = DEFAULT_EXPLAIN, intent_model="auto",
                 memory: Memory | None = None):
        self.recommender = recommender
        self.memory = memory  # records a chosen user's turns and thumbs (None: nothing is kept after the session)
        self.catalog: Catalog = recommender.catalog
        self.k = k
        self.explain = explain
        self._intent_model = intent_model
        interactions = getattr(recommender, "interactions", None)
        popularity = getattr(self.catalog, "popularity", None) or (
            interactions.popularity() if interactions is not None and hasattr(interactions, "popularity") else {})
        self.max_message = getattr(getattr(recommender, "limits", None), "max_message_chars", MAX_MESSAGE)
        self.parser = MessageParser(self.catalog, title_spotter(self.catalog, popularity), self.max_message)
        self._lock = threading.RLock()
        self.messages: list[dict] = []  # the transcript: {"role": "user"|"assistant", "content": str}
        self._clear()

    # -- state ---------------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.user: str | None = None  # MovieLens user id the history starts from
        self.liked: list[str] = []  # item ids gathered from the chat, oldest first
        self.disliked: list[str] = []
        self.rejected: list[str] = []  # shown items turned down: never shown again
        self.passed: list[str] = []  # shown items skipped by "something else" (until the next new ask)
        self.query: str | None = None
        self.constraints = Constraints()
        self.shown: list[Card] = []
        self.result = None  # the engine Result of the list shown now
        self._results: dict[str, object] = {}  # item id -> Result of the turn that showed it
        self._recent: list = []  # the last KEEP_RESULTS results
        self.focus: str | None = None  # the item last discussed ("not that one")
        self.turns = 0

    @property
    def history(self) -> list[str]:
        """The history sent with each request (after the chosen user's own), oldest first."""
        return list(self.liked)

    def reset(self) -> Reply:
        """Forget everything (the transcript stays, with a note)."""
        with self._lock:
            self._clear()
            return self._say(Reply(templates().render("reset"), intent="reset"))

    # -- public turns --------------------------------------------------------------------------------

    def respond(self, message: str) -> Reply:
        """Answer one message (the last state of `respond_stream`)."""
        *_, last = self.respond_stream(message)
        return last

    def respond_stream(self, message: str) -> Iterator[Reply]:
        """Answer one message, yielding growing `Reply`s; the last one has `done=True`."""
        with self._lock:
            full = clean_text(message, None)
            text = full[: self.max_message]
            self.messages.append({"role": "user", "content": text})
            self._remember({"kind": "message", "role": "user", "content": text})
            self.turns += 1
            try:
                if len(full) > self.max_message:
                    raise InputError(f"your message is {len(full)} characters long; the limit is {self.max_message}")
                plan = self._plan(text)
            except RecllmError as exc:
                plan = _Plan(reply=Reply(templates().render("error", message=str(exc)), self.shown, "error"))
        if plan.reply is not None:
            yield self._say(plan.reply)
            return
        yield Reply("", list(self.shown), "thinking", done=False)  # the message is taken: a UI can show it now
        yield from self._recommend_stream(plan.acks)

    def use_user(self, user_id: str) -> Reply:
        """Start over from a MovieLens user's history and show picks for them."""
        *_, last = self.use_user_stream(user_id)
        return last

    def use_user_stream(self, user_id: str) -> Iterator[Reply]:
        with self._lock:
            reply, acks = self._start_user(str(user_id).strip())
        if reply is not None:
            yield self._say(reply)
            return
        yield Reply("", list(self.shown), "thinking", done=False)
        yield from self._recommend_stream(acks)

    def feedback(self, item_id: str, up: bool) -> Reply:
        """Thumbs up (a like: used from the next request on) or down (a dislike: off the list for good)."""
        with self._lock:
            item_id = str(item_id)
            item = self.catalog.items.get(item_id)
            if item is None:
                return self._say(Reply(templates().render("feedback_unknown"), self.shown, "feedback"))
            if up:
                _move(item_id, self.liked, self.disliked)
                for card in self.shown:
                    if card.item_id == item_id:
                        card.liked = True
                text = templates().render("feedback_up", title=item.label)
                self.focus = item_id
            else:
                _move(item_id, self.disliked, self.liked)
                self._drop_shown([item_id])
                text = templates().render("feedback_down", title=item.label)
            self._remember({"kind": "feedback", "item_id": item_id, "up": bool(up)})
            return self._say(Reply(text, list(self.shown), "feedback"))

    def profile(self) -> dict:
        """What the session knows, as data."""
        with self._lock:
            return {"user": self.user, "liked": list(self.liked), "disliked": list(self.disliked),
                    "rejected": list(self.rejected), "query": self.query,
                    "constraints": {"genres": list(self.constraints.genres),
                                    "exclude_genres": list(self.constraints.exclude_genres),
                                    "year_min": self.constraints.year_min, "year_max": self.constraints.year_max}}

    # -- planning --------------------------------------------------------------------------------------

    def _plan(self, text: str) -> _Plan:
        t = templates()
        parsed = self.parser.parse(text, shown=[c.item_id for c in self.shown])
        intent = parsed.intent
        if intent == "act" and (parsed.query_only or not parsed.actionable):
            min_sim = INTENT_MIN_SIM if parsed.actionable else INTENT_MIN_SIM_UNCLEAR
            intent = self._embedded_intent(text, min_sim) or ("act" if parsed.actionable else "clarify")
        if intent == "none" or intent == "clarify":
            return _Plan(reply=Reply(t.render("clarify"), self.shown, "clarify"))
        if intent == "reset":
            self._clear()
            return _Plan(reply=Reply(t.render("reset"), [], "reset"))
        if intent == "profile":
            return _Plan(reply=Reply(self._profile_text(), self.shown, "profile"))
        if intent == "help":
            return _Plan(reply=Reply(t.render("help"), self.shown, "help"))
        if intent == "greet":
            return _Plan(reply=Reply(t.render("greet"), self.shown, "greet"))
        if intent == "user":
            reply, acks = self._start_user(parsed.user_id)
            return _Plan(reply=reply, acks=acks, recommend=reply is None)
        if intent == "why":
            return _Plan(reply=self._why(parsed.why if parsed.intent == "why" else Ref(focus=True)))
        if intent in ("more", "reject", "older", "newer"):  # from the embedding fallback
            parsed = Parsed(text=text, more=intent == "more", reject=[Ref(focus=True)] if intent == "reject" else [],
                            shift=intent if intent in ("older", "newer") else None)
        return self._apply(parsed)

    def _embedded_intent(self, text: str, min_sim: float) -> str | None:
        model = self._intent_model
        if model is None:
            return None
        if model == "auto":
            model = getattr(self.recommender, "embedder", None)
            if model is None:
                from recllm.embed import get_embedder

                model = get_embedder()
        try:
            intent, _ = intent_index(model).classify(text, min_sim)
        except RecllmError:
            return None
        return intent

    def _apply(self, parsed: Parsed) -> _Plan:
        """Change the state as `parsed` says; plan a new list (or a reply when nothing can be shown)."""
        t = templates()
        acks: list[str] = []
        labels = lambda ids: join_and([self.catalog.items[i].label for i in ids])  # noqa: E731

        # resolve references to the shown list first (they may name a bad number)
        rejects, likes = [], []
        for refs, out in ((parsed.reject, rejects), (parsed.like, likes)):
            for ref in refs:
                item_id = self._resolve_ref(ref)
                if isinstance(item_id, Reply):
                    return _Plan(reply=item_id)
                _add(out, item_id)

        new_ask = bool(parsed.query or parsed.anchors)
        if new_ask:  # a new ask: positive constraints start over, exclusions stay
            self.query = parsed.query
            self.passed = []
            self.constraints = Constraints(exclude_genres=self.constraints.exclude_genres)
        for item_id in parsed.liked + parsed.anchors:
            _move(item_id, self.liked, self.disliked)
        if parsed.liked:
            acks.append(t.render("ack_liked", titles=labels(parsed.liked)))
        for item_id in parsed.disliked:
            _move(item_id, self.disliked, self.liked)
        if parsed.disliked:
            acks.append(t.render("ack_disliked", titles=labels(parsed.disliked)))
        if parsed.unknown_titles:
            acks.append(t.render("ack_unknown_titles", titles=join_and([f"“{u}”" for u in parsed.unknown_titles])))
        if rejects:
            for item_id in rejects:
                _add(self.rejected, item_id)
                if item_id in self.liked:
                    self.liked.remove(item_id)
            self._drop_shown(rejects)
            acks.append(t.render("ack_rejected", titles=labels(rejects)))
        if likes:
            for item_id in likes:
                _move(item_id, self.liked, self.disliked)
            acks.append(t.render("ack_anchor", titles=labels(likes)))
        if parsed.more:
            for card in self.shown:
                _add(self.passed, card.item_id)
            acks.append(t.render("ack_more"))

        c = self.constraints
        genres, exclude, year_min, year_max = c.genres, c.exclude_genres, c.year_min, c.year_max
        if parsed.clear_genres:
            genres, exclude = (), ()
        if parsed.clear_years:
            year_min = year_max = None
        if parsed.clear_genres or parsed.clear_years:
            acks.append(t.render("ack_cleared"))
        if parsed.only_genres:
            genres = parsed.only_genres
            exclude = tuple(g for g in exclude if g not in genres)
        elif parsed.want_genres:
            genres = parsed.want_genres
        if parsed.exclude_genres:
            exclude = _merge(exclude, parsed.exclude_genres)
            genres = tuple(g for g in genres if g not in parsed.exclude_genres)
        if parsed.allow_genres:
            exclude = tuple(g for g in exclude if g not in parsed.allow_genres)
        if parsed.years_set:
            year_min, year_max = parsed.year_min, parsed.year_max
        if parsed.shift and not parsed.years_set:  # an era named outright wins over "older"
            years = [card.year for card in self.shown if card.year]
            if not years and self.result is None and not parsed.years_set:
                if parsed.shift == "older":  # nothing shown yet: "older" means old
                    year_max = OLD_BEFORE - 1
                elif self.parser.max_year:
                    year_min = self.parser.max_year - RECENT_YEARS + 1
            elif not years:
                return _Plan(reply=Reply(t.render("no_shift"), self.shown, "clarify"))
            elif parsed.shift == "older":
                year_max = min(years) - 1
                if year_min is not None and year_min > year_max:
                    year_min = None
                acks.append(t.render("ack_older", year=year_max))
            else:
                year_min = max(years) + 1
                if year_max is not None and year_max < year_min:
                    year_max = None
                acks.append(t.render("ack_newer", year=year_min))
        self.constraints = Constraints(genres=tuple(genres), exclude_genres=tuple(exclude),
                                       year_min=year_min, year_max=year_max)
        if likes or parsed.anchors:
            self.focus = None
        if not (self.user or self.liked or self.query) and (self.constraints.genres or parsed.years_set):
            # cold start on filters alone ("only comedies", "something from the 90s"): the wanted genres, else
            # the message, become the ask (never words of an exclusion: "no horror" would find horror)
            self.query = " ".join(self.constraints.genres) or parsed.text
        if not (self.user or self.liked or self.query):
            acks.append(t.render("need_basis"))
            return _Plan(reply=Reply(" ".join(acks), self.shown, "clarify"))
        return _Plan(acks=acks, recommend=True)

    def _resolve_ref(self, ref: Ref) -> str | Reply:
        t = templates()
        if ref.item_id is not None:
            return ref.item_id
        if not self.shown:
            return Reply(t.render("nothing_shown"), self.shown, "clarify")
        if ref.focus:
            if self.focus and (self.focus in {c.item_id for c in self.shown} or self.focus in self._results):
                return self.focus
            return self.shown[0].item_id
        rank = len(self.shown) if ref.rank == -1 else ref.rank
        if rank is None or not 1 <= rank <= len(self.shown):
            return Reply(t.render("bad_ref", n=ref.rank, count=len(self.shown)), self.shown, "clarify")
        return self.shown[rank - 1].item_id

    def _start_user(self, user_id: str | None) -> tuple[Reply | None, list[str]]:
        t = templates()
        interactions = getattr(self.recommender, "interactions", None)
        if interactions is None:
            return Reply(t.render("user_no_interactions"), self.shown, "error"), []
        try:
            history = interactions.history(user_id)
        except UnknownUser as exc:
            return Reply(t.render("error", message=str(exc)), self.shown, "error"), []
        self._clear()
        self.user = str(user_id)
        recent = join_and([self.catalog.items[i].label for i in history[-3:][::-1] if i in self.catalog.items])
        acks = [t.render("user_started", user=self.user, n=len(history), recent=recent)]
        if self.memory is not None:
            liked, disliked = self.memory.feedback(self.user)
            self.liked = [i for i in liked if i in self.catalog.items]
            self.disliked = [i for i in disliked if i in self.catalog.items]
            if self.liked or self.disliked:
                acks.append(t.render("memory_restored", liked=len(self.liked), disliked=len(self.disliked)))
        return None, acks

    def _drop_shown(self, item_ids) -> None:
        drop = set(item_ids)
        self.shown = [card for card in self.shown if card.item_id not in drop]
        for rank, card in enumerate(self.shown, start=1):
            card.rank = rank
        if self.focus in drop:
            self.focus = None

    # -- answers -------------------------------------------------------------------------------------

    def _why(self, ref: Ref | None) -> Reply:
        t = templates()
        if self.result is None and not self._results:
            return Reply(t.render("nothing_shown"), self.shown, "clarify")
        if ref is None:
            return Reply(t.render("why_unknown"), self.shown, "clarify")
        item_id = self._resolve_ref(ref)
        if isinstance(item_id, Reply):
            return item_id
        result = self._results.get(item_id, self.result)
        try:
            text = self.recommender.why(item_id, result)
        except RecllmError as exc:
            return Reply(t.render("error", message=str(exc)), self.shown, "error")
        self.focus = item_id
        return Reply(text, self.shown, "why")

    def _profile_text(self) -> str:
        t = templates()
        label = lambda ids: join_and([self.catalog.items[i].label for i in ids[-PROFILE_TITLES:]])  # noqa: E731
        lines = []
        if self.user:
            interactions = self.recommender.interactions
            history = interactions.history(self.user)
            lines.append(t.render("profile_user", user=self.user, n=len(history),
                                  recent=join_and([self.catalog.items[i].label for i in history[-3:][::-1]
                                                   if i in self.catalog.items])))
        if self.liked:
            lines.append(t.render("profile_liked", titles=label(self.liked)))
        if self.disliked:
            lines.append(t.render("profile_disliked", titles=label(self.disliked)))
        if self.rejected:
            lines.append(t.render("profile_rejected", titles=label(self.rejected)))
        if self.query:
            lines.append(t.render("profile_query", query=self.query))
        parts = self.constraints.parts()
        if parts:
            lines.append(t.render("profile_filters", parts="; ".join(parts)))
        if not lines:
            return t.render("profile_empty")
        return "\n".join([t.render("profile_intro"), *lines])

    # -- recommending ----------------------------------------------------------------------------------

    def request(self):
        """The engine `Request` this session would send now."""
        from recllm.engine import Request

        exclude = set(self.disliked) | set(self.rejected) | set(self.passed)
        return Request(user=self.user, history=list(self.liked), query=self.query, k=self.k,
                       filters=self.constraints.filters(exclude), explain=0)


    def _recommend_stream(self, acks: list[str]) -> Iterator[Reply]:
        t = templates()
        with self._lock:
            request = self.request()
            try:
                result = self.recommender.recommend(request)
            except RecllmError as exc:
                result = None
                failed = Reply(" ".join([*acks, t.render("error", message=str(exc))]), self.shown, "error")
        if result is None:
            yield self._say(failed)
            return
        with self._lock:
            cards = []
            for rec in result.recommendations[: self.k]:
                item = self.catalog.items.get(rec.item_id)
                if item is None:  # the engine only returns catalog items; skip anything else
                    continue
                cards.append(Card(item.item_id, len(cards) + 1, item.label, item.title, item.year, item.genres,
                                  reason=rec.explanation or ""))
            ranks = {rec.item_id: rec.rank for rec in result.recommendations}
            filters = self._filters_text()
            empty = not cards
            if empty:
                self.shown, self.result = [], result
            else:
                self.shown, self.result, self.focus = cards, result, None
                for card in cards:
                    self._results[card.item_id] = result
                self._recent = [*self._recent, result][-KEEP_RESULTS:]
                recent = {id(r) for r in self._recent}
                self._results = {i: r for i, r in self._results.items() if id(r) in recent}
                head = " ".join([*acks, self._intro(len(cards), filters)])
                self.messages.append({"role": "assistant", "content": ""})
                message = self.messages[-1]
        if empty:
            yield self._say(Reply(" ".join([*acks, t.render("no_results", filters=filters)]), [], "recommend"))
            return
        reply = Reply(_render_list(head, cards), list(cards), "recommend", done=False)
        message["content"] = reply.text
        yield reply
        for card in cards[: self.explain]:
            if card.reason:
                continue
            rank = ranks[card.item_id]
            try:
                for piece in self.recommender.explain_stream(result, rank):
                    # a piece starting with a newline replaces the draft (the engine's grounded fallback)
                    card.reason = piece.strip() if piece.startswith("\n") else card.reason + piece
                    reply = Reply(_render_list(head, cards), list(cards), "recommend", done=False)
                    message["content"] = reply.text
                    yield reply
            except RecllmError:
                pass
            final = result.recommendations[rank - 1].explanation if rank <= len(result.recommendations) else ""
            card.reason = (final or card.reason).strip()
        reply = Reply(_render_list(head, cards), list(cards), "recommend", done=True)
        message["content"] = reply.text
        self._remember({"kind": "message", "role": "assistant", "content": reply.text})
        yield reply

    def _intro(self, n: int, filters: str) -> str:
        t = templates()
        if self.query:
            return t.render("intro_query", n=n, query=self.query, filters=filters)
        titles = join_and([self.catalog.items[i].label for i in self.liked[-3:]])
        if self.user and self.liked:
            basis = t.render("basis_both", user=self.user, titles=titles)
        elif self.user:
            basis = t.render("basis_user", user=self.user)
        elif self.liked:
            basis = t.render("basis_liked", titles=titles)
        else:
            return t.render("intro_filters", n=n, filters=filters)
        return t.render("intro_history", n=n, basis=basis, filters=filters)

    def _filters_text(self) -> str:
        parts = self.constraints.parts()
        return templates().render("filters", parts="; ".join(parts)) if parts else ""

    def _say(self, reply: Reply) -> Reply:
        """Record a finished reply in the transcript."""
        with self._lock:
            self.messages.append({"role": "assistant", "content": reply.text})
            del self.messages[:-KEEP_MESSAGES]
            self._remember({"kind": "message", "role": "assistant", "content": reply.text})
        return reply

    def _remember(self, record: dict) -> None:
        """Keep `record` in the chosen user's memory (nothing for an anonymous session or without memory)."""
        if self.memory is not None and self.user:
            try:
                self.memory.add(self.user, record)
            except OSError as exc:  # a full or read-only disk must not break the conversation
                log.warning("could not record the chat of user %s: %s", self.user, exc)


def _render_list(head: str, cards: list[Card]) -> str:
    t = templates()
    lines = [head]
    for card in cards:
        lines.append(t.render("item_line", rank=card.rank, title=card.title, genres=", ".join(card.genres) or "–"))
        if card.reason:
            lines.append(t.render("item_reason", reason=card.reason))
    return "\n".join(lines)


def _move(item_id: str, into: list, out_of: list) -> None:
    if item_id in out_of:
        out_of.remove(item_id)
    if item_id in into:
        into.remove(item_id)
    into.append(item_id)  # most recent last
