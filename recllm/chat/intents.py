"""The embedding fallback of the chat: a message the rules make nothing of (or only free text of) takes the
intent of its nearest example message (`prompts/chat_intents.txt`, one `[intent]` section of examples each)
when the cosine similarity is high enough."""

from __future__ import annotations

import threading

from recllm.chat.lexicon import INTENT_MIN_SIM
from recllm.prompts import load_sections


class IntentIndex:
    """Nearest example message by embedding cosine, for what the rules miss."""

    def __init__(self, embedder, name: str = "chat_intents"):
        examples = [(intent, line.strip()) for intent, prompt in load_sections(name).items()
                    for line in prompt.text.splitlines() if line.strip()]
        self.labels = [intent for intent, _ in examples]
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
