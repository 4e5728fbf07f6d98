"""What a chat turn hands to a UI: `Reply` (text, the cards shown, the intent) and `Card` (one item), and the
reply sentences, read from `prompts/chat_replies.txt` (one `[name]` section each, `recllm.prompts.load_sections`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from recllm.prompts import Prompt, load_sections, prompt_path

REPLIES = "chat_replies"  # the prompt file of the chat's sentences


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
    """One answer of the session. While streaming, `done` is False and `text`/`items` grow. `items` are
    copies: a reply never changes after it is handed out."""

    text: str
    items: list[Card] = field(default_factory=list)
    intent: str = "note"  # recommend | why | profile | reset | feedback | clarify | help | greet | error | thinking
    done: bool = True


@functools.lru_cache(maxsize=4)
def _sentences(path: Path) -> dict[str, Prompt]:
    return load_sections(REPLIES)


def say(name: str, **values: object) -> str:
    """Reply sentence `name` with its `$variables` filled in (the file is read once per process)."""
    return _sentences(prompt_path(REPLIES))[name].render(**values)


def render_list(head: str, cards: list[Card]) -> str:
    """The text of a list reply: `head`, then one line per card and its reason."""
    lines = [head]
    for card in cards:
        lines.append(say("item_line", rank=card.rank, title=card.title, genres=", ".join(card.genres) or "–"))
        if card.reason:
            lines.append(say("item_reason", reason=card.reason))
    return "\n".join(lines)
