"""ReDial-format conversations: reading them, turning them into what the recommender sees, and the split.

A ReDial line (`../shared/data/redial-dev/SOURCE.md`) holds `messages` whose `text` writes movies as `@<movieId>`,
`movieMentions` ({id: name}), the seeker (`initiatorWorkerId`) and the seeker's / recommender's labels per movie
(`suggested`, `seen`, `liked`: 0 / 1 / 2 = no / yes / did not say). `read_dialogues` reads them into `Dialogue`s;
`Dialogue.turns` merges consecutive messages of one speaker into a turn (as the published evaluations do) and
writes each `@id` as the movie's name, the way a person would type it; `eval_points` yields every recommender
turn that brings up movies not mentioned before, with the dialogue so far (the protocol's (turn, movies)).
`split_ids` splits dialogues into a tuning part and a held-out part by a fixed seed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recllm.catalog import Catalog, Item
from recllm.errors import InputError
from recllm.knowledge import DISLIKED, LIKED, NEUTRAL

MENTION_RE = re.compile(r"@(\d+)")
SPLIT_SEED = 0  # the fixed seed of the tune / held-out split
HELD_OUT_SHARE = 0.5


@dataclass
class Turn:
    """Consecutive messages of one speaker: `role` "user" (the seeker) or "assistant" (the recommender)."""

    role: str
    text: str  # movies written by name
    mentions: list[str]  # movie ids in order of mention (repeats removed)


@dataclass
class Dialogue:
    id: str
    messages: list[tuple[str, str]]  # (role, raw text with @ids)
    names: dict[str, str] = field(default_factory=dict)  # movie id -> name as ReDial writes it
    labels: dict[str, dict] = field(default_factory=dict)  # movie id -> {"suggested", "seen", "liked"} (seeker's)

    def name(self, movie_id: str, catalog: Catalog | None = None) -> str:
        name = self.names.get(movie_id)
        if not name and catalog is not None and movie_id in catalog:
            name = catalog.get(movie_id).label
        return " ".join((name or f"movie {movie_id}").split())

    def turns(self, catalog: Catalog | None = None, *, years: bool = True) -> list[Turn]:
        """The dialogue as turns, `@id` written as the movie's name (`years`: with its "(2001)")."""
        out: list[Turn] = []
        for role, raw in self.messages:
            ids = list(dict.fromkeys(MENTION_RE.findall(raw)))

            def name(match, _self=self) -> str:
                text = _self.name(match.group(1), catalog)
                return text if years else re.sub(r"\s*\(\d{4}\)\s*$", "", text)

            text = MENTION_RE.sub(name, raw).strip()
            if out and out[-1].role == role:
                out[-1].text = f"{out[-1].text}\n{text}" if text else out[-1].text
                out[-1].mentions += [i for i in ids if i not in out[-1].mentions]
            else:
                out.append(Turn(role, text, ids))
        return out

    def mention_order(self) -> list[str]:
        """Every movie in the order first mentioned."""
        return list(dict.fromkeys(i for _, raw in self.messages for i in MENTION_RE.findall(raw)))

    def rating(self, movie_id: str) -> float:
        """`knowledge.LIKED` / `DISLIKED` from the seeker's label, else `NEUTRAL` (did not say)."""
        liked = self.labels.get(movie_id, {}).get("liked")
        return LIKED if liked == 1 else DISLIKED if liked == 0 else NEUTRAL


def _dialogue(data: dict, line: int) -> Dialogue:
    try:
        seeker = data["initiatorWorkerId"]
        messages = [("user" if m["senderWorkerId"] == seeker else "assistant", str(m.get("text") or ""))
                    for m in data["messages"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"line {line}: not a ReDial dialogue (missing {exc})") from None
    labels = {}
    for key in ("respondentQuestions", "initiatorQuestions"):  # the seeker's own answers win
        if isinstance(data.get(key), dict):
            labels.update({str(k): v for k, v in data[key].items() if isinstance(v, dict)})
    names = {str(k): str(v) for k, v in (data.get("movieMentions") or {}).items() if v}
    return Dialogue(str(data.get("conversationId", line)), messages, names, labels)


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """Dialogues of a ReDial JSONL file (InputError names the first bad line)."""
    path = Path(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        data = json.loads(raw)
                    except ValueError as exc:
                        raise InputError(f"{path}: line {line}: invalid JSON ({exc})") from None
                    out.append(_dialogue(data, line))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not out:
        raise InputError(f"{path}: no dialogues")
    return out


def redial_catalog(path: str | Path) -> Catalog:
    """ReDial's `movies.csv` (`movieId,movieName`, the year inside the name) as a catalog with `item_id,title,
    year`; a CSV that already has `item_id,title` is read as any catalog (years moved out of titles)."""
    from recllm.catalog import load_catalog
    from recllm.knowledge import with_year

    import csv

    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and {"movieId", "movieName"} <= set(reader.fieldnames):
            items = [Item(str(r["movieId"]).strip(), " ".join(str(r["movieName"]).split())) for r in reader
                     if str(r.get("movieId") or "").strip()]
            return with_year(Catalog(items, name="redial-movies", path=path, columns=("item_id", "title")))
    return with_year(load_catalog(path))


# -- evaluation points ----------------------------------------------------------------------------------------


@dataclass
class Point:
    """One recommender turn of the protocol: the dialogue so far and the movies it newly brings up."""

    dialogue: str
    turn: int  # index among the dialogue's turns
    context: list[Turn]  # the turns before this one
    mentioned: list[str]  # movies mentioned before, in order (excluded from the ranking; not targets)
    targets: list[str]  # movies this turn mentions for the first time


def eval_points(dialogue: Dialogue, catalog: Catalog | None = None, *, years: bool = True) -> Iterator[Point]:
    turns = dialogue.turns(catalog, years=years)
    mentioned: list[str] = []
    for n, turn in enumerate(turns):
        new = [i for i in turn.mentions if i not in mentioned]
        if turn.role == "assistant" and new:
            yield Point(dialogue.id, n, turns[:n], list(mentioned), new)
        mentioned += [i for i in turn.mentions if i not in mentioned]


def split_ids(dialogues: list[Dialogue], *, seed: int = SPLIT_SEED,
              held_out_share: float = HELD_OUT_SHARE) -> tuple[list[Dialogue], list[Dialogue]]:
    """(tune, held_out): a fixed random permutation of the dialogues (by `seed`), the last `held_out_share`
    held out. Knowledge (counts, co-mentions) and weights come from the tune part only."""
    order = np.random.default_rng(seed).permutation(len(dialogues))
    cut = len(dialogues) - int(round(held_out_share * len(dialogues)))
    return [dialogues[i] for i in sorted(order[:cut])], [dialogues[i] for i in sorted(order[cut:])]


def mention_counts(dialogues: Iterable[Dialogue], *, role: str | None = None) -> Counter:
    """Dialogues mentioning each movie (each dialogue counts a movie once); `role`: only that speaker's mentions."""
    counts: Counter = Counter()
    for d in dialogues:
        ids = {i for r, raw in d.messages if role is None or r == role for i in MENTION_RE.findall(raw)}
        counts.update(ids)
    return counts
