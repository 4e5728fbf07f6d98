"""Causal language models — the only package that imports transformers and peft (inside functions, so
`import recllm.llm` is cheap).

- `model`: `LM`, the wrapper: chat prompts, batched next-token logits of the candidate letters, generation.
- `load`: `load_model` (packaged GGUF default converted once and cached, Hugging Face ids, folders), `tiny_lm`.
- `adapters`: LoRA adapter folders, their `recllm_adapter.json` metadata and its checks, `apply_adapter`,
  `save_adapter`.
- `lora`: LoRA training of the verbalizer ranker (`train_letter_lora`) and its checkpoints.
"""

from recllm.llm.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_METADATA,
    ADAPTER_WEIGHTS,
    apply_adapter,
    read_adapter_metadata,
    save_adapter,
    write_adapter_metadata,
)
from recllm.llm.load import DEFAULT_GGUF_PACKAGE, DEFAULT_MODEL, default_tokenizer, load_model, tiny_lm
from recllm.llm.lora import add_lora, checkpoint_complete, last_complete_checkpoint, train_letter_lora
from recllm.llm.model import LETTERS, LM

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_METADATA", "ADAPTER_WEIGHTS", "DEFAULT_GGUF_PACKAGE", "DEFAULT_MODEL", "LETTERS", "LM",
    "add_lora", "apply_adapter", "checkpoint_complete", "default_tokenizer", "last_complete_checkpoint", "load_model",
    "read_adapter_metadata", "save_adapter", "tiny_lm", "train_letter_lora", "write_adapter_metadata",
]  # fmt: skip
