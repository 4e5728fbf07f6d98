"""recllm — a conversational recommender driven by a language model.

`from recllm import Recommender` gives the engine (imported lazily, so `import recllm` stays fast).
"""

__version__ = "0.1.0"
__all__ = ["Recommender", "Request", "Result", "ChatSession"]


def __getattr__(name):
    if name in ("Recommender", "Request", "Result"):
        from recllm import engine

        return getattr(engine, name)
    if name == "ChatSession":
        from recllm.chat import ChatSession

        return ChatSession
    raise AttributeError(f"module 'recllm' has no attribute {name!r}")
