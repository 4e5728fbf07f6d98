"""The language model wrapper: a causal LM with its tokenizer, chat prompts, batched next-token logits (the
verbalizer ranker's letters) and greedy streaming generation. Loading lives in `load.py`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from recllm.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LETTERS = "ABCDEFGHIJKLMNOPQRST"  # at most 20 candidates per prompt


class LM:
    """A loaded causal LM with its tokenizer: batched next-token logits and greedy streaming generation."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, *, adapter_id: str | None = None,
                 adapter_metadata: dict | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id  # what adapters record as their base model
        self.adapter_id = adapter_id  # adapter folder name, or None
        self.adapter_metadata = adapter_metadata or {}
        self.device = next(model.parameters()).device
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._letters: dict[tuple[int, str], list[int]] = {}

    def __repr__(self) -> str:
        return f"LM(model_id={self.model_id!r}, adapter_id={self.adapter_id!r}, device={str(self.device)!r})"

    def describe(self) -> dict:
        """What produced an output, for traces: model id, adapter id, device."""
        return {"model": self.model_id, "adapter": self.adapter_id, "device": str(self.device)}

    # -- prompts -------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """Messages (`[{"role", "content"}]`, see `Prompt.messages`) as the text the model reads.

        Uses the tokenizer's chat template; a final assistant message is an answer prefix the model continues.
        Without a chat template the contents are joined by blank lines.
        """
        messages = list(messages)
        prefix = messages[-1]["role"] == "assistant" if messages else False
        if not self.has_chat_template:
            return "\n\n".join(m["content"] for m in messages) + ("" if prefix else "\n\n")
        if prefix and not messages[-1]["content"]:
            messages, prefix = messages[:-1], False
        if prefix:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids, right-padded: (ids (B, T), lengths (B,)).

        Right padding needs no attention mask: under causal attention a row's real tokens never see the pads
        that follow them, and positions stay 0..len-1. Without a mask PyTorch's fused causal attention runs;
        with one, a 380-token forward of SmolLM2 on 2 CPU cores took 2.3x longer (3.2 s vs 1.4 s).
        """
        enc = self.tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt",
                             add_special_tokens=not self.has_chat_template)
        return enc["input_ids"].to(self.device), enc["attention_mask"].sum(-1)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"])

    # -- scoring -------------------------------------------------------------------------------------------
    def letter_token_ids(self, n: int = 20, prefix: str = "(") -> list[int]:
        """Token ids of the letters A.. (first `n`) as they follow `prefix` (the end of a rank prompt).

        Each letter must add exactly one token to `prefix` and not change its tokens; ModelError otherwise
        (the verbalizer could not score that letter with one next-token logit).
        """
        if not 1 <= n <= len(LETTERS):
            raise ModelError(f"Between 1 and {len(LETTERS)} lettered candidates are supported, not {n}")
        key = (n, prefix)
        if key not in self._letters:
            add = not self.has_chat_template
            base = self.tokenizer(prefix, add_special_tokens=add)["input_ids"]
            ids = []
            for letter in LETTERS[:n]:
                full = self.tokenizer(prefix + letter, add_special_tokens=add)["input_ids"]
                if len(full) != len(base) + 1 or full[: len(base)] != base:
                    raise ModelError(
                        f"The tokenizer of {self.model_id} does not encode letter {letter!r} after {prefix[-12:]!r} "
                        f"as one token, so it cannot rank lettered candidates; use another model"
                    )
                ids.append(full[-1])
            if len(set(ids)) != n:
                raise ModelError(f"The tokenizer of {self.model_id} maps two candidate letters to one token")
            self._letters[key] = ids
        return list(self._letters[key])

    def next_token_logits(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Logits of the token after each prompt: (B, vocab) float32 on CPU, `batch_size` prompts per forward
        pass (right-padded, see `encode`). Deterministic under inference mode."""
        import torch

        if not prompts:
            return torch.empty(0, 0)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
        out: list[torch.Tensor | None] = [None] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + batch_size]
                ids, lengths = self.encode([prompts[i] for i in chunk])  # (b, T), (b,)
                last = (lengths - 1).to(self.device)
                keep = torch.unique(last)  # sorted positions whose logits are needed (<= b of them)
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # (b, k, V)
                logits = logits[torch.arange(len(chunk), device=self.device), torch.searchsorted(keep, last)]
                for row, i in enumerate(chunk):
                    out[i] = logits[row].float().cpu()
        return torch.stack(out)  # (B, V)

    # -- generation ----------------------------------------------------------------------------------------
    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {i for i in ids if i is not None}

    def stream(self, prompt: str, max_new_tokens: int = 60, *, stop: Sequence[str] = (),
               repetition_penalty: float = 1.0, banned: Sequence[Sequence[int]] = ()) -> Iterator[str]:
        """Greedy generation of one prompt, yielding text pieces as they are decoded (see `stream_many`)."""
        for _, piece in self.stream_many([prompt], max_new_tokens, stop=stop, repetition_penalty=repetition_penalty,
                                         banned=[banned]):
            if piece is not None:
                yield piece

    def stream_many(self, prompts: Sequence[str], max_new_tokens: int = 60, *, stop: Sequence[str] = (),
                    repetition_penalty: float = 1.0, banned: Sequence[Sequence[Sequence[int]]] | None = None,
                    ) -> Iterator[tuple[int, str | None]]:
        """Greedy generation of several prompts in ONE batch with a KV cache (left padding, one forward pass per
        step for all rows still going). Yields `(row, text piece)` as pieces are decoded and `(row, None)` when
        a row is finished; deterministic, and each row's text is what `stream` gives for that prompt alone.

        A row stops at an end-of-sequence token, after `max_new_tokens`, or at the first of the `stop` strings
        (not yielded). `banned[row]`: token sequences that row may not produce (a one-token sequence is never
        chosen; for a longer one, its last token is ruled out right after the rest was generated).
        Closing the iterator stops the computation.
        """
        import torch

        n = len(prompts)
        if n == 0:
            return
        banned = [list(b) for b in banned] if banned is not None else [[] for _ in range(n)]
        stop_ids = self._stop_ids()
        enc = self.tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt",
                             add_special_tokens=not self.has_chat_template)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = list(range(n))  # prompt index of each batch row still generating
        generated: list[list[int]] = [[] for _ in range(n)]
        emitted = [""] * n
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)  # (B, 1, V): no prompt logits
            past = out.past_key_values
            for _ in range(max_new_tokens):
                logits = out.logits[:, -1].float()  # (B, V)
                tokens, keep = [], []
                for b, row in enumerate(rows):
                    token = self._next_token(logits[b], generated[row], repetition_penalty, banned[row])
                    done = token in stop_ids
                    if not done:
                        generated[row].append(token)
                        piece, done = self._piece(generated[row], emitted[row], stop)
                        if piece:
                            emitted[row] += piece
                            yield row, piece
                    if done:
                        yield row, None
                    else:
                        tokens.append(token)
                        keep.append(b)
                if not keep:
                    return
                if len(keep) < len(rows):  # drop finished rows from the batch and its cache
                    index = torch.tensor(keep, device=self.device)
                    past.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    rows = [rows[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                                 position_ids=positions, past_key_values=past, use_cache=True)
                past = out.past_key_values
        for row in rows:  # max_new_tokens reached
            yield row, None

    @staticmethod
    def _next_token(logits, generated: list[int], repetition_penalty: float, banned: Sequence[Sequence[int]]) -> int:
        """Greedy choice for one row: repetition penalty on tokens already generated, banned sequences ruled out."""
        import torch

        if repetition_penalty != 1.0 and generated:
            seen = torch.tensor(sorted(set(generated)), device=logits.device)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
        for seq in banned:
            if seq and (len(seq) == 1 or generated[-(len(seq) - 1):] == list(seq[:-1])):
                logits[seq[-1]] = -math.inf
        return int(torch.argmax(logits))

    def _piece(self, generated: list[int], emitted: str, stop: Sequence[str]) -> tuple[str, bool]:
        """(new text since `emitted`, whether a stop string ended the row)."""
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            return "", False  # in the middle of a multi-byte character
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            return text[len(emitted):cut] if cut > len(emitted) else "", True
        return text[len(emitted):], False

    def generate(self, prompt: str, max_new_tokens: int = 60, **kwargs: Any) -> str:
        """The whole greedy completion of `prompt` (see `stream`)."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    # -- the ranking seam (issue 16): the ranker's one call, also served by `llm.remote.RemoteLM` -----------
    def letter_scores(self, prompts: Sequence[str], letter_ids: Sequence[int], batch_size: int = 8):
        """Scores of the tokens `letter_ids` right after each prompt, (B, n) float64: their next-token logits
        (`next_token_logits`, `batch_size` prompts per forward pass)."""
        import numpy as np

        if not prompts:
            return np.zeros((0, len(letter_ids)))
        return self.next_token_logits(prompts, batch_size=batch_size)[:, list(letter_ids)].double().numpy()
