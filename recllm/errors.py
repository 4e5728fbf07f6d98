"""Errors whose message is safe to show a user (the CLI prints it as one line, no traceback)."""


class RecllmError(Exception):
    """Base class: `str(error)` is a one-line message meant for the person using recllm."""


class CatalogError(RecllmError):
    """A catalog or interactions file cannot be read or fails validation."""


class EmptyHistory(RecllmError):
    """No usable history items remain after resolving the ones given."""


class UnknownUser(RecllmError):
    """A user id that is not in the interactions."""


class UnknownItem(RecllmError):
    """An item id or title that is not in the catalog."""


class StoreError(RecllmError):
    """The item store (Chroma) is missing, corrupted or unreachable."""


class ModelError(RecllmError):
    """A language or embedding model cannot be loaded or used."""


class AdapterError(ModelError):
    """A LoRA adapter is missing, truncated or does not match the base model / prompt."""


class PromptError(RecllmError):
    """A prompt template is missing or rendered with wrong variables."""


class InputError(RecllmError):
    """A request is malformed or exceeds a documented limit."""


class RequestTimeout(InputError):
    """A request ran past its time limit (`engine.Limits.timeout_s`) and was stopped."""
