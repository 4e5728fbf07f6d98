"""A chat session: one person's conversation turned into recommendation requests, refinements and "why" answers.

A `ChatSession` wraps one engine (`recllm.request.Engine`, passed in) and keeps everything the person told it:
titles they like (history gathered from the chat), dislikes, constraints (genres in/out, years), items they
turned down, the current free-text ask, and the last list shown with the `Result` of the turn that made it.
State lives on the session object only, so sessions never mix; every change of it happens under the
session's lock, also while reasons stream in (a thumb during streaming takes effect at once).

One turn:
    parser.parse(message) -> Parsed         what the message asks (pure, no state change; `chat.parse`)
    the session applies it                  history / dislikes / constraints / exclusions updated
    engine.recommend(Request, explain=0)    the ranked list, shown at once
    engine.explain_many([(result, rank)])  reasons of the top `explain` items, streamed together
Every reply sentence comes from `prompts/chat_replies.txt` (`chat.replies.say`). Errors the engine raises
(`RecllmError`) become a short reply; a message nothing can be made of gets a clarifying reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from recllm.catalog import Catalog, clean_text
from recllm.chat.constraints import Constraints
from recllm.chat.intents import intent_index
from recllm.chat.lexicon import (
    ASK_RE, DEFAULT_K, INTENT_MIN_SIM, INTENT_MIN_SIM_UNCLEAR, KEEP_MESSAGES, KEEP_RESULTS, PROFILE_TITLES,
)
from recllm.chat.parse import MessageParser, Parsed, add_new
from recllm.chat.replies import Card, Reply, render_list, say
from recllm.errors import RecllmError, UnknownUser
from recllm.memory import Memory
from recllm.prompts import join_and
from recllm.refs import ID_PREFIX, Ref
from recllm.request import DEFAULT_EXPLAIN, Engine, Request, Result
from recllm.titles import title_spotter

log = logging.getLogger(__name__)


@dataclass
class _Turn:
    """A list being shown: the result it came from, its intro, its transcript message, item id -> rank."""

    result: Result
    head: str
    message: dict
    ranks: dict[str, int]


@dataclass
class _Plan:
    """What a turn does after the state changes: a reply now, or a request to run first."""

    acks: list[str] = field(default_factory=list)
    reply: Reply | None = None
    recommend: bool = False


class ChatSession:
    """One person's conversation with an engine. Not shared between people; safe to call from threads.

    `recommender`: the engine (`recllm.request.Engine`). `k`: items shown per turn. `explain`: how many of them
    get a streamed reason. `intent_model`: an object with `encode(texts, progress=False)` for the embedding
    fallback; "auto" takes the engine's embedder (or the packaged default), None turns the fallback off. `memory`: a `recllm.memory.Memory`;
    a session started from a user id then keeps that person's messages and thumbs there and starts with
    their earlier thumbs.
    """

    def __init__(self, recommender: Engine, *, k: int = DEFAULT_K, explain: int = DEFAULT_EXPLAIN,
                 intent_model="auto", memory: Memory | None = None):
        self.recommender = recommender
        self.memory = memory  # records a chosen user's turns and thumbs (None: nothing is kept after the session)
        self.catalog: Catalog = recommender.catalog
        self.k = k
        self.explain = explain
        self._intent_model = intent_model
        interactions = recommender.interactions
        popularity = interactions.popularity() if interactions is not None else {}
        self.parser = MessageParser(self.catalog, title_spotter(self.catalog, popularity))
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
        self.result: Result | None = None  # the engine Result of the list shown now
        self._results: dict[str, Result] = {}  # item id -> Result of the turn that showed it
        self._recent: list[Result] = []  # the last KEEP_RESULTS results
        self.focus: str | None = None  # the item last discussed ("not that one")
        self.turns = 0

    @property
    def max_message(self) -> int:
        """Characters of one message (`Limits.max_message_chars` of the engine); longer: an error reply."""
        return self.recommender.limits.max_message_chars

    @property
    def history(self) -> list[str]:
        """The history sent with each request (after the chosen user's own), oldest first."""
        return list(self.liked)

    def reset(self) -> Reply:
        """Forget everything (the transcript stays, with a note)."""
        with self._lock:
            self._clear()
            return self._say(self._reply(say("reset"), "reset"))

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
                self.recommender.limits.check_text("your message", full, self.max_message)
                plan = self._plan(text)
            except RecllmError as exc:
                plan = _Plan(reply=self._reply(say("error", message=str(exc)), "error"))
        if plan.reply is not None:
            yield self._say(plan.reply)
            return
        yield self._reply("", "thinking", done=False)  # the message is taken: a UI can show it now
        yield from self._recommend_stream(plan.acks)

    def understand(self, message: str) -> str:
        """Read one message and update the session as `respond` would (likes, dislikes, constraints, the ask),
        without recommending or answering; returns the message's intent ("why", "act", "reset", ...). Batch rows
        replay a conversation's turns with it. A message the chat would answer with an error changes nothing."""
        with self._lock:
            text = clean_text(message, self.max_message)
            intent = self.parser.parse(text, shown=[c.item_id for c in self.shown]).intent
            try:
                self._plan(text)
            except RecllmError:
                pass  # the chat would have answered with this error and gone on
            return intent

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
        yield self._reply("", "thinking", done=False)
        yield from self._recommend_stream(acks)

    def feedback(self, item_id: str, up: bool) -> Reply:
        """Thumbs up (a like: used from the next request on) or down (a dislike: off the list for good)."""
        with self._lock:
            item_id = str(item_id)
            item = self.catalog.items.get(item_id)
            if item is None:
                return self._say(self._reply(say("feedback_unknown"), "feedback"))
            if up:
                _move(item_id, self.liked, self.disliked)
                for card in self.shown:
                    if card.item_id == item_id:
                        card.liked = True
                text = say("feedback_up", title=item.label)
                self.focus = item_id
            else:
                _move(item_id, self.disliked, self.liked)
                self._drop_shown([item_id])
                text = say("feedback_down", title=item.label)
            self._remember({"kind": "feedback", "item_id": item_id, "up": bool(up)})
            return self._say(self._reply(text, "feedback"))

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
        parsed = self.parser.parse(text, shown=[c.item_id for c in self.shown])
        intent = parsed.intent
        if intent == "act" and (parsed.query_only or not parsed.actionable):
            min_sim = INTENT_MIN_SIM if parsed.actionable else INTENT_MIN_SIM_UNCLEAR
            intent = self._embedded_intent(text, min_sim) or ("act" if parsed.actionable else "clarify")
            if intent == "clarify" and not (self.user or self.liked or self.query) and ASK_RE.search(text):
                intent = "act"  # "what should I watch?" before anything is known: popular picks (`_apply`)
        if intent == "none" or intent == "clarify":
            return _Plan(reply=self._reply(say("clarify"), "clarify"))
        if intent == "reset":
            self._clear()
            return _Plan(reply=Reply(say("reset"), [], "reset"))
        if intent == "profile":
            return _Plan(reply=self._reply(self._profile_text(), "profile"))
        if intent == "help":
            return _Plan(reply=self._reply(say("help"), "help"))
        if intent == "greet":
            return _Plan(reply=self._reply(say("greet"), "greet"))
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
            model = self.recommender.embedder
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
        acks: list[str] = []

        # resolve references to the shown list first (they may name a bad number)
        rejects, likes = [], []
        for refs, out in ((parsed.reject, rejects), (parsed.like, likes)):
            for ref in refs:
                item_id = self._resolve_ref(ref)
                if isinstance(item_id, Reply):
                    return _Plan(reply=item_id)
                add_new(out, item_id)

        new_ask = bool(parsed.query or parsed.anchors)
        if new_ask:  # a new ask: positive constraints start over, exclusions stay
            self.query = parsed.query
            self.passed = []
            self.constraints = Constraints(exclude_genres=self.constraints.exclude_genres)
        for item_id in parsed.liked + parsed.anchors:
            _move(item_id, self.liked, self.disliked)
        if parsed.liked:
            acks.append(say("ack_liked", titles=self._labels(parsed.liked)))
        for item_id in parsed.disliked:
            _move(item_id, self.disliked, self.liked)
        if parsed.disliked:
            acks.append(say("ack_disliked", titles=self._labels(parsed.disliked)))
        if parsed.unknown_titles:
            acks.append(say("ack_unknown_titles", titles=join_and([f"“{u}”" for u in parsed.unknown_titles])))
        if rejects:
            for item_id in rejects:
                add_new(self.rejected, item_id)
                if item_id in self.liked:
                    self.liked.remove(item_id)
            self._drop_shown(rejects)
            acks.append(say("ack_rejected", titles=self._labels(rejects)))
        if likes:
            for item_id in likes:
                _move(item_id, self.liked, self.disliked)
            acks.append(say("ack_anchor", titles=self._labels(likes)))
        if parsed.more:
            for card in self.shown:
                add_new(self.passed, card.item_id)
            acks.append(say("ack_more"))

        years = [card.year for card in self.shown if card.year]
        constraints, said = self.constraints.refined(parsed, shown_years=years, started=self.result is not None,
                                                     max_year=self.parser.max_year)
        if constraints is None:
            return _Plan(reply=self._reply(say("no_shift"), "clarify"))
        acks += said
        self.constraints = constraints
        if likes or parsed.anchors:
            self.focus = None
        if not (self.user or self.liked or self.query) and (self.constraints.genres or parsed.years_set):
            # cold start on filters alone ("only comedies", "something from the 90s"): the wanted genres, else
            # the message, become the ask (never words of an exclusion: "no horror" would find horror)
            self.query = " ".join(self.constraints.genres) or parsed.text
        if not (self.user or self.liked or self.query):
            if not (ASK_RE.search(parsed.text) and getattr(self.recommender, "popularity", None)):
                acks.append(say("need_basis"))
                return _Plan(reply=self._reply(" ".join(acks), "clarify"))
            # asked for something with no usable title and no ask ("what should I watch?"): the engine answers
            # with the most popular items inside the constraints; the reply says why
            acks.append(say("ack_popular"))
        return _Plan(acks=acks, recommend=True)

    def _resolve_ref(self, ref: Ref) -> str | Reply:
        if ref.item_id is not None:
            return ref.item_id
        if not self.shown:
            return self._reply(say("nothing_shown"), "clarify")
        if ref.focus:
            if self.focus and (self.focus in {c.item_id for c in self.shown} or self.focus in self._results):
                return self.focus
            return self.shown[0].item_id
        rank = len(self.shown) if ref.rank == -1 else ref.rank
        if rank is None or not 1 <= rank <= len(self.shown):
            return self._reply(say("bad_ref", n=ref.rank, count=len(self.shown)), "clarify")
        return self.shown[rank - 1].item_id

    def _start_user(self, user_id: str | None) -> tuple[Reply | None, list[str]]:
        interactions = self.recommender.interactions
        if interactions is None:
            return self._reply(say("user_no_interactions"), "error"), []
        try:
            history = interactions.history(user_id)
        except UnknownUser as exc:
            return self._reply(say("error", message=str(exc)), "error"), []
        self._clear()
        self.user = str(user_id)
        acks = [say("user_started", user=self.user, n=len(history), recent=self._labels(history[-3:][::-1]))]
        if self.memory is not None:
            liked, disliked = self.memory.feedback(self.user)
            self.liked = [i for i in liked if i in self.catalog.items]
            self.disliked = [i for i in disliked if i in self.catalog.items]
            if self.liked or self.disliked:
                acks.append(say("memory_restored", liked=len(self.liked), disliked=len(self.disliked)))
        return None, acks

    def _labels(self, item_ids) -> str:
        """"A (1995), B (1999) and C (2001)": the labels of the catalog items among `item_ids`."""
        return join_and([self.catalog.items[i].label for i in item_ids if i in self.catalog.items])

    def _drop_shown(self, item_ids) -> None:
        drop = set(item_ids)
        self.shown = [card for card in self.shown if card.item_id not in drop]
        for rank, card in enumerate(self.shown, start=1):
            card.rank = rank
        if self.focus in drop:
            self.focus = None

    # -- answers -------------------------------------------------------------------------------------

    def _why(self, ref: Ref | None) -> Reply:
        """Answer "why (not) X?" (`Recommender.why`; "details"/"scores" in the message add the raw scores)."""
        from recllm.refs import WHY_NOT_RE
        from recllm.why import asks_details, exclusion

        if self.result is None and not self._results:
            return self._reply(say("nothing_shown"), "clarify")
        if ref is None:
            return self._reply(say("why_unknown"), "clarify")
        item_id = self._resolve_ref(ref)
        if isinstance(item_id, Reply):
            return item_id
        if item_id in set(self.disliked) | set(self.rejected) | set(self.passed):  # the person removed it since
            self.focus = item_id
            return self._reply(exclusion(item_id, self.catalog.get(item_id).label, self.request().filters), "why")
        message = self.messages[-1]["content"] if self.messages else ""
        asked_not = WHY_NOT_RE.search(message)
        if asked_not and self.result is not None and item_id not in {c.item_id for c in self.shown}:
            result = self.result  # "why not X?" about an item off the list now: the reason it is off
        else:
            result = self._results.get(item_id, self.result)  # "why X?": from the turn that showed it
        try:
            text = self.recommender.why(f"{ID_PREFIX}{item_id}", result, details=asks_details(message))
        except RecllmError as exc:
            return self._reply(say("error", message=str(exc)), "error")
        self.focus = item_id
        return self._reply(text, "why")

    def _profile_text(self) -> str:
        lines = []
        if self.user:
            history = self.recommender.interactions.history(self.user)
            recent = self._labels(history[-3:][::-1])
            lines.append(say("profile_user", user=self.user, n=len(history), recent=recent))
        for name, ids in (("profile_liked", self.liked), ("profile_disliked", self.disliked),
                          ("profile_rejected", self.rejected)):
            if ids:
                lines.append(say(name, titles=self._labels(ids[-PROFILE_TITLES:])))
        if self.query:
            lines.append(say("profile_query", query=self.query))
        parts = self.constraints.parts()
        if parts:
            lines.append(say("profile_filters", parts="; ".join(parts)))
        if not lines:
            return say("profile_empty")
        return "\n".join([say("profile_intro"), *lines])

    # -- recommending ----------------------------------------------------------------------------------

    def request(self) -> Request:
        """The engine `Request` this session would send now."""
        reasons = {i: why for why, ids in (("passed", self.passed), ("rejected", self.rejected),
                                           ("disliked", self.disliked)) for i in ids}  # the last reason wins
        filters = replace(self.constraints.filters(reasons), exclude_reasons=reasons)  # for "why not X?"
        return Request(user=self.user, history=list(self.liked), query=self.query, k=self.k,
                       filters=filters, explain=0)

    def _recommend_stream(self, acks: list[str]) -> Iterator[Reply]:
        """Ask the engine, show the list at once, then stream the reasons of its top `explain` items. Every
        change of the session happens under the lock; between pieces a thumb or a reset may change the list,
        and the next reply shows the list as it is then (a dropped card never comes back)."""
        with self._lock:
            try:
                result = self.recommender.recommend(self.request())
            except RecllmError as exc:
                reply = self._reply(" ".join([*acks, say("error", message=str(exc))]), "error")
            else:
                turn = self._show(result, acks)
                reply = self._turn_reply(turn, done=False) if turn else self._reply(
                    " ".join([*acks, say("no_results", filters=self._filters_text())]), "recommend")
        if reply.intent != "recommend" or reply.done:
            yield self._say(reply)
            return
        yield reply
        cards = [card for card in reply.items[: self.explain] if not card.reason]
        if cards:
            yield from self._stream_reasons(turn, cards)
        with self._lock:
            reply = self._turn_reply(turn, done=True)
            self._remember({"kind": "message", "role": "assistant", "content": reply.text})
        yield reply

    def _stream_reasons(self, turn: _Turn, cards: list[Card]) -> Iterator[Reply]:
        """The reasons of `cards`, decoded together in one `engine.explain_many` call; a reply per piece. A
        dropped card gets no more pieces; once none of them is shown (or the session moved on) generation stops."""
        result = turn.result
        asks = [(result, turn.ranks[card.item_id]) for card in cards]
        pieces = None
        try:
            pieces = self.recommender.explain_many(asks)
            for i, piece in pieces:
                with self._lock:
                    if all(self._turn_card(turn, card.item_id) is None for card in cards):
                        break  # every card dropped by thumbs, or the session moved on: no more of them
                    shown = self._turn_card(turn, cards[i].item_id)
                    if shown is None:
                        continue
                    # a piece starting with a newline replaces the draft (the engine's grounded fallback)
                    shown.reason = piece.strip() if piece.startswith("\n") else shown.reason + piece
                    reply = self._turn_reply(turn, done=False)
                yield reply
        except RecllmError:
            pass
        finally:
            getattr(pieces, "close", lambda: None)()  # no more tokens are computed for this turn
        with self._lock:
            for card, (_, rank) in zip(cards, asks):
                shown = self._turn_card(turn, card.item_id)
                if shown is not None:
                    final = result.recommendations[rank - 1].explanation if rank <= len(result.recommendations) else ""
                    shown.reason = (final or shown.reason).strip()

    def _show(self, result: Result, acks: list[str]) -> _Turn | None:
        """Make `result` the list shown (under the lock); None when it holds nothing to show."""
        cards = []
        for rec in result.recommendations[: self.k]:
            item = self.catalog.items.get(rec.item_id)
            if item is None:  # the engine only returns catalog items; skip anything else
                continue
            cards.append(Card(item.item_id, len(cards) + 1, item.label, item.title, item.year, item.genres,
                              reason=rec.explanation or ""))
        self.result = result
        self.shown = cards
        if not cards:
            return None
        self.focus = None
        for card in cards:
            self._results[card.item_id] = result
        self._recent = [*self._recent, result][-KEEP_RESULTS:]
        recent = {id(r) for r in self._recent}
        self._results = {i: r for i, r in self._results.items() if id(r) in recent}
        head = " ".join([*acks, self._intro(len(cards), self._filters_text())])
        self.messages.append({"role": "assistant", "content": ""})
        return _Turn(result, head, self.messages[-1], {rec.item_id: rec.rank for rec in result.recommendations})

    def _turn_card(self, turn: _Turn, item_id: str) -> Card | None:
        """The card of `item_id` while `turn`'s list is the one shown and the card is still on it."""
        if self.result is not turn.result:
            return None
        return next((card for card in self.shown if card.item_id == item_id), None)

    def _turn_reply(self, turn: _Turn, *, done: bool) -> Reply:
        """The list reply of `turn` as the list is now (its transcript message follows it)."""
        if self.result is turn.result:
            turn.message["content"] = render_list(turn.head, self.shown)
        return self._reply(turn.message["content"], "recommend", done=done)

    def _intro(self, n: int, filters: str) -> str:
        if self.query:
            return say("intro_query", n=n, query=self.query, filters=filters)
        titles = join_and([self.catalog.items[i].label for i in self.liked[-3:]])
        if self.user and self.liked:
            basis = say("basis_both", user=self.user, titles=titles)
        elif self.user:
            basis = say("basis_user", user=self.user)
        elif self.liked:
            basis = say("basis_liked", titles=titles)
        else:
            return say("intro_filters", n=n, filters=filters)
        return say("intro_history", n=n, basis=basis, filters=filters)

    def _filters_text(self) -> str:
        parts = self.constraints.parts()
        return say("filters", parts="; ".join(parts)) if parts else ""

    def snapshot(self) -> list[Card]:
        """Copies of the cards shown now (for a UI: they never change afterwards)."""
        with self._lock:
            return [replace(card) for card in self.shown]

    def _reply(self, text: str, intent: str, *, done: bool = True) -> Reply:
        """A reply showing the list as it is now."""
        return Reply(text, self.snapshot(), intent, done)

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


def _move(item_id: str, into: list, out_of: list) -> None:
    if item_id in out_of:
        out_of.remove(item_id)
    if item_id in into:
        into.remove(item_id)
    into.append(item_id)  # most recent last
