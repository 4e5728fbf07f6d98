"""Chat sessions: a conversation turned into recommendation requests, with refinements and "why" answers.

    lexicon      defaults of a session, genre words, the rules (regular expressions) of the chat
    parse        MessageParser.parse(message) -> Parsed: what one message asks (no state)
    intents      IntentIndex: the embedding fallback for messages the rules miss (prompts/chat_intents.txt)
    constraints  Constraints: the filters a session keeps between turns
    replies      Reply, Card and the reply sentences (prompts/chat_replies.txt)
    session      ChatSession: one person's conversation with an engine (`recllm.request.Engine`)
Titles in messages are found by `recllm.titles`, references and "why" questions read by `recllm.refs`.
"""

from recllm.chat.constraints import Constraints
from recllm.chat.intents import IntentIndex, intent_index
from recllm.chat.lexicon import DEFAULT_K, KIDS_GENRES, VIOLENT_GENRES
from recllm.chat.parse import MessageParser, Parsed
from recllm.chat.replies import Card, Reply
from recllm.chat.session import ChatSession
from recllm.refs import Ref
from recllm.request import DEFAULT_EXPLAIN
from recllm.titles import TitleSpotter, title_spotter

__all__ = [
    "DEFAULT_EXPLAIN", "DEFAULT_K", "KIDS_GENRES", "VIOLENT_GENRES", "Card", "ChatSession", "Constraints",
    "IntentIndex", "MessageParser", "Parsed", "Ref", "Reply", "TitleSpotter", "intent_index", "title_spotter",
]
