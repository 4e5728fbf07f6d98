"""Grounded explanations: evidence from the user's own history, LLM phrasing, a validator, a plain fallback
(the "why" answers built from a request's result are in `recllm.why`).

Evidence for a recommended item = the `n` history items whose vectors are most similar to it (cosine) plus the
genres/tags it shares with them. The LLM phrases one sentence from that evidence (prompts/explain.txt); the
validator rejects text that is empty, degenerate (repetition), too long, or names a catalog title other than
the recommended item and the evidence titles, and then the fallback sentence (prompts/explain_fallback*.txt)
is used: it is built only from the evidence, so it never claims an item the user does not have.

Titles named in generated text are found by `recllm.titles.TitleMatcher` (the rules are documented there).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from recllm.errors import ModelError
from recllm.prompts import has_role_tag, join_and, load_prompt, load_sections, sanitize
from recllm.titles import TitleMatcher, named_titles_outside  # noqa: F401 - re-exported for callers
from recllm.titles import words as _words

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Interactions, Item
    from recllm.retrieve import Filters
    from recllm.llm import LM

EXPLAIN_VARIABLES = frozenset({"item", "liked", "shared", "era", "co", "meets"})
MAX_SHARED = 3  # genres/tags named in an explanation


@dataclass
class ExplainConfig:
    """Limits for LLM explanations."""

    max_new_tokens: int = 48  # generation budget (one or two sentences)
    max_chars: int = 280  # longer text is rejected
    max_sentences: int = 2  # text is cut after this many sentences
    title_chars: int = 100  # titles inserted into the prompt are cut to this
    shared_chars: int = 40  # each genre/tag inserted into the prompt is cut to this
    repetition_penalty: float = 1.2  # greedy decoding of small models loops without it


@dataclass(frozen=True)
class Evidence:
    """Why an item fits, all from data the engine has: the history items it is most like (id, title, cosine),
    the genres/tags it shares with them, the collaborative fact (a history item and how many people liked both),
    its era, and the constraints of the request it meets (in words)."""

    item_id: str
    liked: tuple[tuple[str, str, float], ...] = ()  # (item_id, title, similarity), most similar first
    shared: tuple[str, ...] = ()
    co_liked: tuple[str, str, int] | None = None  # (history item id, title, people who liked both)
    era: str = ""  # the item's decade ("1990s"), from its year
    meets: tuple[str, ...] = ()  # the request's constraints it meets ("a Comedy", "from 1989 or earlier")

    @property
    def titles(self) -> tuple[str, ...]:
        """The user's items named in the evidence (liked, then the collaborative one)."""
        named = [title for _, title, _ in self.liked]
        if self.co_liked and self.co_liked[1] not in named:
            named.append(self.co_liked[1])
        return tuple(named)

    def to_dict(self) -> dict:
        out = {"item_id": self.item_id, "shared": list(self.shared),
               "liked": [{"item_id": i, "title": t, "similarity": round(s, 4)} for i, t, s in self.liked]}
        if self.co_liked:
            out["co_liked"] = dict(zip(("item_id", "title", "people"), self.co_liked))
        if self.era:
            out["era"] = self.era
        if self.meets:
            out["meets"] = list(self.meets)
        return out


@dataclass
class Explanation:
    """An explanation: `source` is "llm" (validated model text) or "fallback" (plain sentence from evidence)."""

    text: str
    source: str
    evidence: Evidence
    rejected: str | None = None  # why the model's text was not used (None when it was, or no model)
    draft: str | None = None  # the model's text when rejected
    meta: dict = field(default_factory=dict)  # model / adapter / prompt sha256

    def to_dict(self) -> dict:
        out = asdict(self)
        out["evidence"] = self.evidence.to_dict()
        return out


MIN_CO_LIKED = 3  # the collaborative fact is stated from this many people up


def evidence(item: Item, history_items: Sequence[Item], history_vectors: np.ndarray | None,
             item_vector: np.ndarray | None, n: int = 2, max_shared: int = MAX_SHARED, *,
             interactions: Interactions | None = None, meets: Sequence[str] = ()) -> Evidence:
    """The evidence for recommending `item` to someone with `history_items` (chronological; the rows of
    `history_vectors` in the same order).

    liked: the history item most similar to `item` (cosine of the vectors, > 0; ties: the more recent), then
      the one most people liked together with it (`interactions.co_liked`, when given and different), then the
      next most similar, up to `n`. Without vectors: the most recent history items sharing a genre with it.
    shared: the genres (then tags) `item` shares with them; when none, those most common in the history.
    co_liked: the history item most often liked together with `item`, with the count (from MIN_CO_LIKED).
    """
    history = [h for h in history_items if h.item_id != item.item_id]
    rows = [i for i, h in enumerate(history_items) if h.item_id != item.item_id]
    era = f"{item.year // 10 * 10}s" if item.year else ""
    if not history or n <= 0:
        return Evidence(item.item_id, (), _shared(item, [], history, max_shared), era=era, meets=tuple(meets))
    if history_vectors is not None and item_vector is not None and len(history_vectors):
        vectors = np.asarray(history_vectors, dtype=np.float64)[rows]
        target = np.asarray(item_vector, dtype=np.float64).reshape(-1)
        norms = np.linalg.norm(vectors, axis=1) * (np.linalg.norm(target) or 1.0)
        sims = vectors @ target / np.where(norms > 0, norms, 1.0)
    else:
        genres = set(item.genres)
        sims = np.array([len(genres & set(h.genres)) / (len(genres) or 1) for h in history], dtype=np.float64)
    order = [i for i in sorted(range(len(history)), key=lambda i: (-sims[i], -i)) if sims[i] > 0]
    co = None
    if interactions is not None:
        position = {h.item_id: i for i, h in enumerate(history)}
        top = interactions.co_liked(item.item_id, [h.item_id for h in history])
        if top and top[0][1] >= MIN_CO_LIKED:
            best = position[top[0][0]]
            co = (history[best].item_id, history[best].title, int(top[0][1]))
            order = order[:1] + [best] + order[1:] if best not in order[:1] else order
    order = list(dict.fromkeys(order))[:n]
    chosen = [history[i] for i in order]
    liked = tuple((h.item_id, h.title, float(sims[i])) for h, i in zip(chosen, order))
    return Evidence(item.item_id, liked, _shared(item, chosen, history, max_shared), co, era, tuple(meets))


def _shared(item: Item, chosen: Sequence[Item], history: Sequence[Item], limit: int) -> tuple[str, ...]:
    own = list(dict.fromkeys(list(item.genres) + list(item.tags)))
    with_evidence = {x for h in chosen for x in (*h.genres, *h.tags)}
    shared = [x for x in own if x in with_evidence]
    if not shared and history:
        counts = Counter(x for h in history for x in (*h.genres, *h.tags))
        shared = sorted((x for x in own if counts[x]), key=lambda x: (-counts[x], own.index(x)))
    return tuple(x for x in shared if x and x != "(no genres listed)")[:limit]


def constraints_met(item: Item, filters: Filters | None) -> tuple[str, ...]:
    """The request's constraints `item` meets, in words (prompts/explain_meets.txt): a genre asked for that it
    has, the year bounds when its year is inside them."""
    if filters is None:
        return ()
    words = load_sections("explain_meets")
    met = []
    wanted = {g.lower() for g in filters.genres}
    met += [words["genre"].render(genre=g) for g in item.genres if g.lower() in wanted][:1]
    if item.year is None or not (filters.year_min or item.year) <= item.year <= (filters.year_max or item.year):
        return tuple(met)  # the year bounds are not met (or cannot be told): none is claimed
    if filters.year_min is not None and filters.year_max is not None:
        met.append(words["years"].render(first=filters.year_min, last=filters.year_max))
    elif filters.year_max is not None:
        met.append(words["year_max"].render(year=filters.year_max))
    elif filters.year_min is not None:
        met.append(words["year_min"].render(year=filters.year_min))
    return tuple(met)


# -- validation ------------------------------------------------------------------------------------------------
def is_degenerate(text: str) -> bool:
    """Repetition or junk: a repeated 4-word run, a word 3 times in a row, few distinct words, little text."""
    words = [w.lower() for w in _words(text)]
    letters = sum(c.isalpha() for c in text)
    if not words or letters < 0.6 * len(text.replace(" ", "")):
        return True
    if any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        return True
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    if grams and max(grams.values()) > 1:
        return True
    return len(words) >= 10 and len(set(words)) / len(words) < 0.5


_SENTENCE_RE = re.compile(r"[^.!?]*[.!?]+(?:[\"')\]]+)?(?=\s|$)")


def tidy(text: str, max_sentences: int = 2, titles: Collection[str] = ()) -> tuple[str, bool]:
    """(one-line text cut after `max_sentences` sentences, whether it ends a sentence). Full stops inside the
    given `titles` ("Dr. Strangelove", "Independence Day (a.k.a. ID4)") end no sentence."""
    text = sanitize(text)
    kept: dict[str, str] = {}
    for title in sorted({t for t in titles if t and re.search(r"[.!?]", t)}, key=len, reverse=True):
        mark = f"\x00{len(kept)}\x00"
        if title in text:
            kept[mark] = title
            text = text.replace(title, mark)
    sentences = _SENTENCE_RE.findall(text)
    if sentences:
        text = "".join(sentences[:max_sentences]).strip()
    for mark, title in kept.items():
        text = text.replace(mark, title)
    return text, bool(sentences)


_CLAIM_VERBS = frozenset({"liked", "loved", "enjoyed", "watched", "saw", "rated", "like", "love", "enjoy"})
_CLAIM_FILLERS = frozenset({"have", "ve", "already", "really", "also", "once", "previously", "clearly"})


def claims_liked(text: str, titles: Collection[str]) -> list[str]:
    """`titles` the text says the user liked/watched ("you liked X", "you've already seen X")."""
    words = [w.lower() for w in _words(text)]
    keys = {t: tuple(w.lower() for w in _words(t)) for t in titles}
    found = []
    for i, word in enumerate(words):
        if word != "you":
            continue
        j = i + 1
        while j < len(words) and words[j] in _CLAIM_FILLERS:
            j += 1
        if j >= len(words) or words[j] not in _CLAIM_VERBS:
            continue
        for title, key in keys.items():  # the title within the next few words ("you liked the film X")
            if key and any(tuple(words[k:k + len(key)]) == key for k in range(j + 1, min(j + 5, len(words)))):
                found.append(title)
    return list(dict.fromkeys(found))


def validate(text: str, *, allowed: Collection[str], matcher: TitleMatcher | None,
             max_chars: int = 280, complete: bool = True, not_liked: Collection[str] = ()) -> str | None:
    """Why `text` cannot be shown (None when it can): empty, degenerate, too long, names another title, or
    says the user liked one of `not_liked` (the recommended item is not in their history)."""
    if len(_words(text)) < 3:
        return "empty"
    if len(text) > max_chars or not complete:
        return "too long"
    if is_degenerate(text):
        return "degenerate"
    if matcher is not None:
        outside = named_titles_outside(text, allowed, matcher)
        if outside:
            return "names a title not in the evidence: " + ", ".join(outside[:3])
    claimed = claims_liked(text, not_liked)
    if claimed:
        return "claims the user liked " + ", ".join(claimed[:3])
    return None


# -- the explainer -------------------------------------------------------------------------------------------
def fallback_text(evidence: Evidence, config: ExplainConfig | None = None) -> str:
    """The plain sentence built only from the evidence (titles and genres/tags cut as in the prompt), plus the
    collaborative fact when there is one."""
    config = config or ExplainConfig()
    liked = join_and([sanitize(t, config.title_chars) for _, t, _ in evidence.liked])
    shared = join_and([sanitize(s, config.shared_chars) for s in evidence.shared])
    if liked and shared:
        text = load_prompt("explain_fallback", {"liked", "shared"}).render(liked=liked, shared=shared)
    elif liked:
        text = load_prompt("explain_fallback_liked", {"liked"}).render(liked=liked)
    elif shared:
        text = load_prompt("explain_fallback_shared", {"shared"}).render(shared=shared)
    elif not evidence.co_liked:
        return load_prompt("explain_fallback_none", set()).render()
    else:
        text = ""
    if evidence.co_liked:
        _, title, people = evidence.co_liked
        text += " " + load_prompt("explain_fallback_co", {"people", "title"}).render(
            people=people, title=sanitize(title, config.title_chars))
    return text.strip()


class Explainer:
    """Phrases explanations with an LM (or only the fallback when `lm` is None) and validates them.

    `titles`: every catalog title (or a ready `TitleMatcher`), for the validator; without it only emptiness,
    repetition and length are checked.
    """

    def __init__(self, lm: LM | None, prompt: str = "explain", *,
                 titles: Iterable[str] | TitleMatcher | None = None, config: ExplainConfig | None = None) -> None:
        self.lm = lm
        self.config = config or ExplainConfig()
        self.prompt = load_prompt(prompt, EXPLAIN_VARIABLES)
        self.matcher = titles if isinstance(titles, TitleMatcher) or titles is None else TitleMatcher(titles)
        self._banned: dict[str, list[list[int]]] = {}  # item id -> banned token sequences

    def describe(self) -> dict:
        base = self.lm.describe() if self.lm is not None else {"model": None, "adapter": None}
        return {**base, "prompt": self.prompt.name, "prompt_sha256": self.prompt.sha256}

    def messages(self, item: Item, evidence: Evidence) -> list[dict[str, str]]:
        chars = self.config.title_chars
        co = evidence.co_liked
        values = {
            "item": sanitize(item.title, chars),
            "era": evidence.era or "-",
            "liked": join_and([sanitize(t, chars) for t in evidence.titles]) or "-",
            "shared": ", ".join(sanitize(s, self.config.shared_chars) for s in evidence.shared) or "-",
            "co": load_prompt("explain_co", {"people", "title"}).render(
                people=co[2], title=sanitize(co[1], chars)) if co else "-",
            "meets": "; ".join(evidence.meets) or "-",
        }
        return self.prompt.messages(**values)

    def build_prompt(self, item: Item, evidence: Evidence) -> str:
        """The exact text the model continues."""
        return self.lm.chat_text(self.messages(item, evidence))

    def stream(self, item: Item, evidence: Evidence, deadline: float | None = None) -> Iterator[str | Explanation]:
        """Yield text pieces as they come, then one final `Explanation` (see `stream_many`)."""
        for _, piece in self.stream_many([(item, evidence)], deadline):
            yield piece

    def stream_many(self, asks: Sequence[tuple[Item, Evidence]], deadline: float | None = None,
                    ) -> Iterator[tuple[int, str | Explanation]]:
        """Explain several items in ONE batched generation: yields `(i, text piece)` as pieces come and, once per
        item, `(i, Explanation)` as soon as that item is done (checked, or replaced by the fallback).

        The template's answer prefix (e.g. "You may enjoy X because") comes first, then the model's tokens.
        When the final explanation is a fallback, the streamed pieces were rejected: show `.text` instead.
        Words that would contradict the item's data (`claims.banned_words`) are never generated, and the
        finished text is checked again. Past `deadline` (a `time.monotonic()` value) generation stops between
        tokens and the unfinished items get the fallback.
        """
        meta = self.describe()
        if self.lm is None:
            for i, (_, ev) in enumerate(asks):
                yield i, self._fallback(ev, meta)
            return
        prompts, drafts = [], []
        for i, (item, ev) in enumerate(asks):
            messages = self.messages(item, ev)
            prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
            prompts.append(self.lm.chat_text(messages))
            drafts.append(prefix)
            if prefix:
                yield i, prefix
        prefixes = list(drafts)
        late = deadline is not None and time.monotonic() > deadline
        failed = None
        finished: set[int] = set()
        if not late:
            generated = self._generate(prompts, [item for item, _ in asks])
            try:
                for i, piece in generated:
                    if piece is None:
                        finished.add(i)
                        yield i, self._finish(asks[i], drafts[i], prefixes[i], meta)
                        continue
                    drafts[i] += piece
                    yield i, piece
                    if deadline is not None and time.monotonic() > deadline:
                        late = True
                        break
            except ModelError as exc:  # e.g. the LLM server went away mid-stream: the plain sentences instead
                failed = f"the model failed: {exc}"
            finally:
                generated.close()  # no more tokens are computed
        for i, (item, ev) in enumerate(asks):
            if i in finished:
                continue
            if late or failed:
                yield i, self._fallback(ev, meta, rejected=failed or "stopped: past the time limit", draft=drafts[i])
            else:
                yield i, self._finish((item, ev), drafts[i], prefixes[i], meta)

    def _generate(self, prompts: list[str], items: list[Item]) -> Iterator[tuple[int, str | None]]:
        cfg = self.config
        banned = [self.banned_tokens(item) for item in items]
        if len(prompts) == 1:  # one item: the plain stream (what any LM-like object offers)
            pieces = self.lm.stream(prompts[0], cfg.max_new_tokens, stop=("\n",),
                                    repetition_penalty=cfg.repetition_penalty, banned=banned[0])
            rows = ((0, piece) for piece in pieces)
        else:
            pieces = rows = self.lm.stream_many(prompts, cfg.max_new_tokens, stop=("\n",),
                                                repetition_penalty=cfg.repetition_penalty, banned=banned)
        try:
            yield from rows
            if len(prompts) == 1:
                yield 0, None
        finally:
            getattr(pieces, "close", lambda: None)()  # stop the model's generator: no more tokens are computed

    def banned_tokens(self, item: Item) -> list[list[int]]:
        """Token sequences of the words the model may not write about `item` (`claims.banned_words`), as
        they appear after a space, lower-case and capitalised."""
        from recllm.claims import banned_words

        if item.item_id not in self._banned:
            tokenizer = self.lm.tokenizer
            forms = {f" {w}" for w in banned_words(item)} | {f" {w.capitalize()}" for w in banned_words(item)}
            self._banned[item.item_id] = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in sorted(forms)]
        return self._banned[item.item_id]

    def _finish(self, ask: tuple[Item, Evidence], draft: str, prefix: str, meta: dict) -> Explanation:
        """The checked explanation of a finished draft, else the fallback (with the reason it was rejected)."""
        from recllm.claims import contradictions, unsupported_praise

        item, evidence = ask
        cfg = self.config
        titles = [sanitize(t, cfg.title_chars) for t in (item.title, *evidence.titles)]
        text, complete = tidy(draft, cfg.max_sentences, titles)
        if not complete and text and not self._hit_token_limit(draft[len(prefix):]):
            text, complete = text.rstrip(",;:- ") + ".", True  # the model stopped without a full stop
        allowed = [item.title, item.label, *evidence.titles, *evidence.shared]  # genres may be titles too
        problem = validate(text, allowed=allowed, matcher=self.matcher, max_chars=cfg.max_chars, complete=complete,
                           not_liked=[item.title])
        if problem is None and has_role_tag(draft):
            problem = "contains a chat role tag"  # e.g. echoed from an injected catalog title
        if problem is None:
            wrong = contradictions(text, item, titles=evidence.titles)
            praise = unsupported_praise(text, titles=[item.title, *evidence.titles])
            if wrong:
                problem = "contradicts the item's data: " + ", ".join(wrong[:3])
            elif praise:
                problem = "praise with no source: " + ", ".join(praise[:3])
        if problem is None:
            return Explanation(text, "llm", evidence, meta=meta)
        return self._fallback(evidence, meta, rejected=problem, draft=draft)

    def _fallback(self, evidence: Evidence, meta: dict, **why: str) -> Explanation:
        """The plain sentence from the evidence, as a final `Explanation` (`why`: rejected=..., draft=...)."""
        return Explanation(fallback_text(evidence, self.config), "fallback", evidence, meta=meta, **why)

    def _hit_token_limit(self, generated: str) -> bool:
        count = getattr(self.lm, "token_count", None)
        if count is None:
            return False
        return count(generated) >= self.config.max_new_tokens - 1

    def explain(self, item: Item, evidence: Evidence) -> Explanation:
        """The validated explanation (model text, or the fallback)."""
        final = None
        for final in self.stream(item, evidence):
            pass
        assert isinstance(final, Explanation)
        return final
