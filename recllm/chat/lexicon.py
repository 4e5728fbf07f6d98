"""The chat's words: defaults of a session, genre words, and the rules (regular expressions) for intents,
references, likes and dislikes, refinements and eras. Pure data: nothing here holds state or reads files.
Title spotting and its word lists live in `recllm.titles`; item references and "why" in `recllm.refs`.
"""

from __future__ import annotations

import re

DEFAULT_K = 5  # items shown per turn (the engine's own default, `request.DEFAULT_K`, is for other callers)
INTENT_MIN_SIM = 0.72  # cosine to the nearest example message that overrides a free-text reading
INTENT_MIN_SIM_UNCLEAR = 0.60  # ... for a message the rules could make nothing of
RECENT_YEARS = 5  # "recent" = the catalog's newest 5 years
OLD_BEFORE = 1980  # "old" / "classic" = before this year
PROFILE_TITLES = 8  # titles named per line of "what do you know about me?"
KEEP_RESULTS = 10  # results (traces) of the last turns kept for "why X?" about an earlier list
KEEP_MESSAGES = 400  # transcript messages kept per session
VIOLENT_GENRES = ("Horror", "Thriller", "War", "Crime")  # excluded by "less violent"
KIDS_GENRES = ("Children", "Animation")  # required (any) by "for kids"

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
MEDIA = r"(?:\s+(?:movies?|films?|ones|stuff|flicks?|shows?))?"

REJECT_VERBS = (
    r"drop|remove|delete|hide|skip|exclude|ditch|lose|cut|nix|scrap|get\s+rid\s+of|not|no|nope|never|"
    r"seen|watched|saw|hate|hated|dislike|disliked|(?:do|did)\s*n[o']?t\s+(?:like|want|enjoy|care\s+for)|"
    r"not\s+interested\s+in|not\s+a\s+fan\s+of|can'?t\s+stand|without|except|instead\s+of"
)
LIKE_VERBS = (
    r"more\s+like|more\s+of|similar\s+to|closer\s+to|like|love|loved|liked|enjoyed|adore|keep|"
    r"in\s+the\s+vein\s+of|along\s+the\s+lines\s+of|based\s+on"
)
REJECT_BEFORE_RE = re.compile(rf"\b(?:{REJECT_VERBS})\b[\w\s,']{{0,24}}$", re.IGNORECASE)
LIKE_BEFORE_RE = re.compile(rf"\b(?:{LIKE_VERBS})\b[\w\s,']{{0,16}}$", re.IGNORECASE)
NEG_LIKE_RE = re.compile(
    r"\b(?:not|n't|nothing|less|never|un)\s*(?:really\s+)?(?:like|love|liked|loved|enjoyed)\b[\w\s,']{0,16}$",
    re.IGNORECASE)

# Titles: what stands before a spotted title decides whether it is liked, disliked or an anchor.
NEG_TITLE_RE = re.compile(
    r"\b(?:hate|hated|dislike|disliked|(?:do|did)\s*n[o']?t\s+(?:like|love|enjoy|care\s+for)|can'?t\s+stand|"
    r"not\s+a\s+fan\s+of|no\s+more|not|no|never|drop|remove|skip|hide|without|except|instead\s+of|"
    r"bored\s+by|hated\s+watching)\b[\w\s,'&:-]{0,40}$",
    re.IGNORECASE,
)
NEG_AFTER_RE = re.compile(r"^\W{0,3}(?:\s*(?:was|is|were|are)\s+(?:really\s+|so\s+|too\s+)?"
                          r"(?:terrible|awful|boring|bad|dull|overrated|meh|the\s+worst|not\s+good|horrible)|"
                          r"\s*sucked|\s*was\s+not\s+for\s+me)", re.IGNORECASE)
ANCHOR_RE = re.compile(
    r"\b(?:(?:something|anything|movies?|films?|ones?|stuff|things?|more|else)\s+(?:like|similar\s+to)|similar\s+to|"
    r"in\s+the\s+vein\s+of|along\s+the\s+lines\s+of|closer\s+to|such\s+as|if\s+i\s+liked|fans?\s+of|"
    r"recommend(?:ations)?\s+(?:like|based\s+on)|based\s+on)\b[\w\s,'&:-]{0,40}$",
    re.IGNORECASE,
)

# Whole-message intents.
RESET_RE = re.compile(
    r"^\W*(?:ok(?:ay)?\W+|please\W+|let'?s\W+|can\s+we\W+)?(?:start\s+(?:over|again|afresh|fresh|from\s+scratch)|"
    r"reset|restart|clear\s+(?:it\s+all|everything|all|the\s+chat|my\s+(?:profile|history))|clear|"
    r"forget\s+(?:everything|it\s+all|all\s+(?:of\s+)?(?:that|this)|what\s+i\s+(?:said|told\s+you)|about\s+me)|"
    r"new\s+(?:session|conversation|chat)|begin\s+again|wipe\s+(?:everything|it\s+all|the\s+slate))\b",
    re.IGNORECASE,
)
# a message that asks for something to watch without saying what ("what should I watch?", "any suggestions?")
ASK_RE = re.compile(r"\b(?:recommend\w*|suggest\w*|ideas?|watch|movies?|films?|something|anything|"
                    r"what(?:'s|\s+is)\s+good|looking\s+for|in\s+the\s+mood)\b", re.IGNORECASE)
PROFILE_RE = re.compile(
    r"\bwhat\s+(?:do|did|else\s+do)\s+you\s+(?:know|remember|think\s+you\s+know|have)\s+(?:about|on)\s+me\b|"
    r"\bwhat\s+(?:have|did)\s+i\s+(?:told|tell|said|say)\b|\bwhat\s+do\s+i\s+like\b|\bmy\s+(?:profile|taste|preferences)\b|"
    r"\bwhat\s+(?:you\s+)?know\s+about\s+me\b|\bwho\s+am\s+i\b",
    re.IGNORECASE,
)
USER_RE = re.compile(
    r"\b(?:i\s*am|i'?m|use|as|be|start\s+(?:from|with|as)|switch\s+to|load|pick|choose|log\s+in\s+as)\s+"
    r"(?:the\s+)?(?:movielens\s+)?user\s*(?:id)?\s*[#:]?\s*(?P<user>[\w-]{1,40})\b|"
    r"^\W*(?:movielens\s+)?user\s*(?:id)?\s*[#:]?\s*(?P<user2>\d{1,10})\W*$",
    re.IGNORECASE,
)
HELP_RE = re.compile(
    r"^\W*(?:help|what\s+can\s+you\s+do|how\s+does\s+(?:this|it)\s+work|what\s+do\s+i\s+(?:do|say|type))\W*$",
    re.IGNORECASE)
GREET_RE = re.compile(r"^\W*(?:hi|hello|hey|hiya|howdy|yo|good\s+(?:morning|afternoon|evening)|thanks?(?:\s+you)?|"
                      r"ty|cheers|great|cool|nice|ok(?:ay)?|sure)(?:\s+(?:there|so\s+much|a\s+lot|!+))*\W*$",
                      re.IGNORECASE)

# Refinements.
MORE_RE = re.compile(
    r"\b(?:something|anything)\s+else\b|\b(?:show\s+(?:me\s+)?|give\s+(?:me\s+)?|any\s+|some\s+)?"
    r"(?:more|other|others|different|new)\s+(?:ones|options|picks|suggestions|ideas|movies|films|titles)\b|"
    r"^\W*(?:more|others|next|again|no|nope|nah|none|another)\W*(?:please|pls)?\W*$|"
    r"\bnone\s+of\s+(?:these|those|them)\b|\bnot\s+(?:these|those)\b|\b(?:other|different)\s+(?:ones|options)\b|"
    r"\bshow\s+(?:me\s+)?(?:more|others)\b",
    re.IGNORECASE,
)
OLDER_RE = re.compile(r"\b(?:older|earlier|less\s+recent|further\s+back|more\s+classic|not\s+so\s+new|"
                      r"not\s+as\s+new|from\s+further\s+back)\b", re.IGNORECASE)
NEWER_RE = re.compile(r"\b(?:newer|more\s+recent|later\s+ones|more\s+modern|less\s+old|not\s+so\s+old|"
                      r"not\s+as\s+old|nothing\s+(?:too|so)\s+old|fresher)\b", re.IGNORECASE)
OLD_RE = re.compile(r"\b(?:old(?:ies)?|classics?|vintage|golden[- ]age|black[- ]and[- ]white)"
                    r"(?=\s+(?:movies?|films?|ones|stuff|flicks?)|\W*$)|\bclassics\b|\boldies\b", re.IGNORECASE)
RECENT_RE = re.compile(r"\b(?:recent|new|latest|modern|current|contemporary)(?=\s+(?:movies?|films?|ones|stuff|"
                       r"releases?|flicks?)|\W*$)|\bnew\s+releases?\b|\brecent(?:ly)?\b", re.IGNORECASE)
KIDS_RE = re.compile(
    r"\b(?:for|with|watch\s+with|suitable\s+for|ok\s+for|safe\s+for)\s+(?:the\s+|my\s+|our\s+|young\s+|little\s+|small\s+|"
    r"young(?:er)?\s+|the\s+whole\s+)*(?:kids?|children|child|family|toddlers?|little\s+ones|son|daughter|"
    r"nephews?|nieces?|grand(?:kids|children))\b|\b(?:kid|family|child|children)[- ]friendly\b|"
    r"\b\d{1,2}[- ]?(?:year|yr)s?[- ]?olds?\b|\bfamily\s+(?:movies?|films?|night)\b|\bkids?\s+(?:movies?|films?)\b",
    re.IGNORECASE,
)
VIOLENT_RE = re.compile(
    r"\b(?:less|not(?:\s+(?:too|so|that|very))?|non-?|without|no|nothing|fewer|minus|avoid|skip)\s*"
    r"(?:violent|violence|gory|gore|brutal|bloody|grim|bloodshed)\b|\bgentler?\b|\bwholesome\b|\bsofter\b",
    re.IGNORECASE,
)
CLEAR_ALL_RE = re.compile(r"\b(?:no|clear|remove|drop|reset|forget)\s+(?:the\s+|all\s+(?:the\s+)?|any\s+)?"
                          r"(?:filters?|constraints?|restrictions?)\b|\banything\s+goes\b", re.IGNORECASE)
CLEAR_GENRES_RE = re.compile(r"\b(?:any|all)\s+(?:genres?|kinds?|types?)\b|\bgenre\s+doesn'?t\s+matter\b",
                             re.IGNORECASE)
CLEAR_YEARS_RE = re.compile(r"\b(?:any|all)\s+(?:years?|eras?|decades?|periods?|time)\b|"
                            r"\b(?:year|era|age)\s+doesn'?t\s+matter\b", re.IGNORECASE)

YEAR = r"(?:18[89]\d|19\d\d|20[0-4]\d)"
DECADE_WORDS = {"twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
                 "seventies": 1970, "eighties": 1980, "nineties": 1990, "noughties": 2000, "aughts": 2000,
                 "two thousands": 2000}
DECADE = (r"(?:(?P<part>early|mid|late)[- ]?)?(?:the\s+)?(?:(?:['’])?(?P<dec>(?:19|20)?\d0)\s*['’]?s\b|"
           rf"(?P<decw>{'|'.join(DECADE_WORDS)})\b)")
DECADE_RE = re.compile(DECADE, re.IGNORECASE)
YEAR_RANGE_RE = re.compile(
    rf"\b(?:between|from)?\s*(?P<a>{YEAR})\s*(?:-|–|—|to|until|till|through|and)\s*(?P<b>{YEAR})\b", re.IGNORECASE)
YEAR_BOUND_RE = re.compile(
    rf"(?P<neg>\b(?:nothing|none|no|not)\s+(?:\w+\s+)?)?\b(?P<op>before|pre|prior\s+to|older\s+than|earlier\s+than|until|up\s+to|no\s+later\s+than|"
    rf"after|post|since|newer\s+than|later\s+than|more\s+recent\s+than|no\s+earlier\s+than|from)"
    rf"[\s-]*(?:the\s+(?:year\s+)?)?(?P<y>{YEAR})(?P<on>\s+(?:on(?:wards?)?|and\s+(?:later|after|up|newer)|or\s+(?:later|newer)))?\b"
    rf"|\b(?P<y2>{YEAR})\s+(?P<op2>or\s+(?:later|newer|after|earlier|older|before)|and\s+(?:later|up|after|earlier|before))\b",
    re.IGNORECASE,
)
DECADE_BOUND_RE = re.compile(rf"(?P<neg>\b(?:nothing|none|no|not)\s+(?:\w+\s+)?)?"
                             rf"\b(?P<op>before|pre|prior\s+to|older\s+than|after|post|since|newer\s+than|from)"
                             rf"[\s-]*(?:the\s+)?(?P<d>{DECADE})(?P<on>\s+on(?:wards?)?)?", re.IGNORECASE)
YEAR_RE = re.compile(rf"\b(?:in\s+|from\s+)?(?P<y>{YEAR})\b")
