"""One in-process model shared by many threads: calls that arrive together run as ONE model call.

`shared(lm)` gives the `Scheduler` of an `LM` (one per model, made once). It offers what the engine uses of an
`LM` (`letter_scores`, `stream`, `stream_many`, `generate`; everything else is the LM's own: `chat_text`,
`tokenizer`, `token_count`, `letter_token_ids`, `describe`, ...). One worker thread owns the model:

- Ranking: the `letter_scores` prompts of every caller waiting when the worker is free are scored in one
  batched call (`max_score_rows` prompts at most per round, callers first come first served); each caller
  gets its own rows back.
- Generation, continuous-batching style: one decode batch with a KV cache. A `stream_many` / `stream` call
  that arrives while the batch decodes is prefilled (its prompts left-padded as `LM.stream_many` does, in
  forward passes of similar lengths) and its rows join the batch at the next step: the caches are left-padded
  with masked zeros to one length and stacked. Each row stops on its own (end of sequence, its stop strings,
  its token limit) and leaves the batch; its banned tokens and repetition penalty are its own. Each caller
  reads its rows' pieces as they are decoded. Waiting calls join first come first served while the batch has
  room (`max_rows`); a call larger than that runs when the batch is empty.
- A caller that stops reading (closes the generator: a deadline, a dropped card) frees its rows at the next
  step; a call that was not admitted yet is never started. An exception reaches the caller whose call raised
  it (a failed merged call is retried call by call to find it).
Between two decode steps the worker runs the waiting ranking calls, so ranking never waits for a whole
generation. Greedy decoding picks the same tokens as each call alone (tests/test_scheduler.py); scores of a
merged ranking call equal the call alone up to float32 rounding (the kernels' blocking depends on the batch
shape: at most 3e-5 apart on the packaged model), as `LM.next_token_logits` batches already do. Callers check
their deadlines between pieces: a call waiting for room gets its first piece once the batch has room.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from recllm.llm.model import LM

IDLE_EXIT_S = 30.0  # the worker thread ends after this long without work (a new call starts it again)
_SCHEDULERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """End idle workers before the interpreter tears torch down (a daemon thread still inside torch at exit
    can abort the process: "terminate called without an active exception")."""
    for scheduler in list(_SCHEDULERS):
        with scheduler._cond:
            scheduler._closing = True
            worker = scheduler._worker
            scheduler._cond.notify_all()
        if worker is not None:
            worker.join(timeout=5)
_END = object()  # the last item of a generation call's queue

_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared(lm: Any) -> Any:
    """The one `Scheduler` of the in-process `lm` (other objects, e.g. `remote.RemoteLM`, are returned as
    they are: the server batches)."""
    if not isinstance(lm, LM):
        return lm
    with _SHARED_LOCK:
        if lm not in _SHARED:
            _SHARED[lm] = Scheduler(lm)
        return _SHARED[lm]


@dataclass(eq=False)
class _ScoreCall:
    prompts: list[str]
    letter_ids: tuple[int, ...]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(eq=False)
class _GenCall:
    prompts: list[str]
    max_new_tokens: int
    stop: tuple[str, ...]
    repetition_penalty: float
    banned: list[list[list[int]]]
    out: queue.Queue = field(default_factory=queue.Queue)  # (row, piece | None), then an exception or _END
    closed: bool = False  # the caller stopped reading, or the call failed: its rows leave the batch
    left: int = 0  # rows still decoding

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self.out.put(exc)

    def finish_row(self, index: int) -> None:
        self.out.put((index, None))
        self.left -= 1
        if self.left == 0:
            self.out.put(_END)


@dataclass(eq=False)
class _Row:
    call: _GenCall
    index: int  # row of its call
    generated: list[int] = field(default_factory=list)
    emitted: str = ""


class Scheduler:
    """Merges concurrent calls on one `LM` into shared model calls (see the module doc)."""

    def __init__(self, lm: LM, *, max_rows: int = 32, max_score_rows: int = 32, prefill_rows: int = 4) -> None:
        self.lm = lm
        self.max_rows = max_rows  # rows decoded together at most
        self.prefill_rows = prefill_rows  # prompts per prefill forward pass
        self.max_score_rows = max_score_rows  # prompts scored in one round at most
        self.model_calls = {"score": 0, "prefill": 0, "decode": 0}  # forward calls made, for tests and benchmarks
        self.model_seconds = {"score": 0.0, "prefill": 0.0, "decode": 0.0}  # worker time in each (with the
        # token choices and pieces of the decode steps)
        self._cond = threading.Condition()
        self._scores: list[_ScoreCall] = []
        self._waiting: list[_GenCall] = []
        self._worker: threading.Thread | None = None
        self._closing = False  # the interpreter is exiting: the worker ends once idle (`_stop_at_exit`)
        _SCHEDULERS.add(self)
        # the decode batch (worker thread only): rows, KV cache, attention mask, last positions, next logits
        self._rows: list[_Row] = []
        self._past = self._mask = self._positions = self._logits = None

    def __getattr__(self, name: str) -> Any:  # chat_text, tokenizer, token_count, letter_token_ids, describe, ...
        if name == "lm":
            raise AttributeError(name)
        return getattr(self.lm, name)

    def __repr__(self) -> str:
        return f"Scheduler({self.lm!r})"

    # -- the callers' side -----------------------------------------------------------------------------------
    def letter_scores(self, prompts: Sequence[str], letter_ids: Sequence[int], batch_size: int = 8):
        """`LM.letter_scores`, scored together with the other callers' prompts waiting at the same time."""
        import numpy as np

        if not prompts:
            return np.zeros((0, len(letter_ids)))
        call = _ScoreCall(list(prompts), tuple(int(i) for i in letter_ids))
        self._submit(self._scores, call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def stream_many(self, prompts: Sequence[str], max_new_tokens: int = 60, *, stop: Sequence[str] = (),
                    repetition_penalty: float = 1.0, banned: Sequence[Sequence[Sequence[int]]] | None = None,
                    ) -> Iterator[tuple[int, str | None]]:
        """`LM.stream_many`, decoded in the shared batch. Closing the iterator frees its rows."""
        n = len(prompts)
        if n == 0:
            return
        banned = [[list(s) for s in b] for b in banned] if banned is not None else [[] for _ in range(n)]
        if len(banned) != n:
            raise ValueError(f"banned has {len(banned)} rows for {n} prompts")
        call = _GenCall(list(prompts), int(max_new_tokens), tuple(stop), float(repetition_penalty), banned, left=n)
        self._submit(self._waiting, call)
        try:
            while True:
                item = call.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            call.closed = True

    def stream(self, prompt: str, max_new_tokens: int = 60, *, stop: Sequence[str] = (),
               repetition_penalty: float = 1.0, banned: Sequence[Sequence[int]] = ()) -> Iterator[str]:
        """`LM.stream`, decoded in the shared batch."""
        rows = self.stream_many([prompt], max_new_tokens, stop=stop, repetition_penalty=repetition_penalty,
                                banned=[banned])
        try:
            for _, piece in rows:
                if piece is not None:
                    yield piece
        finally:
            rows.close()

    def generate(self, prompt: str, max_new_tokens: int = 60, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def _submit(self, line: list, call: Any) -> None:
        with self._cond:
            line.append(call)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="recllm-model", daemon=True)
                self._worker.start()
            self._cond.notify()

    # -- the worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():  # the cache and logits are inference tensors, changed in place
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not (self._scores or self._waiting or self._rows) and not self._closing:
                    self._cond.wait(IDLE_EXIT_S)
                if not (self._scores or self._waiting or self._rows):
                    self._worker = None
                    return
                scores = self._take_scores()
                joining = self._admit()
            for kind, batch in (("score", scores), ("prefill", joining)):
                if not batch:
                    continue
                t0 = time.perf_counter()
                try:
                    (self._score if kind == "score" else self._prefill)(batch)
                except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
                    self._fail(batch, exc)
                self.model_seconds[kind] += time.perf_counter() - t0
            if self._rows:
                t0 = time.perf_counter()
                try:
                    self._step()
                except BaseException as exc:  # noqa: BLE001 - a failed decode step fails the calls in the batch
                    self._fail([row.call for row in self._rows], exc)
                    self._clear()
                self.model_seconds["decode"] += time.perf_counter() - t0

    def _take_scores(self) -> list[_ScoreCall]:
        """Waiting ranking calls, first come first served, up to `max_score_rows` prompts (at least one call)."""
        taken, rows = [], 0
        while self._scores and (not taken or rows + len(self._scores[0].prompts) <= self.max_score_rows):
            call = self._scores.pop(0)
            taken.append(call)
            rows += len(call.prompts)
        return taken

    def _admit(self) -> list[_GenCall]:
        """Waiting generation calls that join the batch now: first come first served while there is room."""
        joining, rows = [], len(self._rows)
        while self._waiting:
            call = self._waiting[0]
            if call.closed:
                self._waiting.pop(0)
                continue
            if rows and rows + len(call.prompts) > self.max_rows:
                break  # the first in line waits for room; nobody overtakes it
            joining.append(self._waiting.pop(0))
            rows += len(call.prompts)
        return joining

    @staticmethod
    def _fail(calls: list, exc: BaseException) -> None:
        for call in calls:
            if isinstance(call, _ScoreCall):
                if not call.done.is_set():
                    call.error = exc
                    call.done.set()
            else:
                call.fail(exc)

    def _score(self, calls: list[_ScoreCall]) -> None:
        """One `LM.letter_scores` call per set of letter ids for all `calls`; a failure is retried call by call."""
        groups: dict[tuple[int, ...], list[_ScoreCall]] = {}
        for call in calls:
            groups.setdefault(call.letter_ids, []).append(call)
        for ids, group in groups.items():
            prompts = [p for call in group for p in call.prompts]
            try:
                self.model_calls["score"] += 1
                scores = self.lm.letter_scores(prompts, list(ids), batch_size=len(prompts))
            except Exception as exc:  # noqa: BLE001 - handed to the caller that caused it
                if len(group) == 1:
                    self._fail(group, exc)
                else:
                    for call in group:
                        self._score([call])
                continue
            start = 0
            for call in group:
                call.result = scores[start:start + len(call.prompts)]
                start += len(call.prompts)
                call.done.set()

    def _prefill(self, calls: list[_GenCall]) -> None:
        """The prompts of `calls` through the model, left-padded, shortest first in forward passes of up to
        `prefill_rows` similar lengths (prefill is compute-bound: padding costs as much as text); their rows
        then join the batch."""
        calls = [c for c in calls if not c.closed]
        for call in [c for c in calls if c.max_new_tokens <= 0]:
            for i in range(len(call.prompts)):
                call.finish_row(i)
        calls = [c for c in calls if c.max_new_tokens > 0]
        if not calls:
            return
        lm = self.lm
        add = not lm.has_chat_template
        rows = [_Row(c, i) for c in calls for i in range(len(c.prompts))]
        parts = []
        try:
            lengths = [len(ids) for ids in lm.tokenizer([r.call.prompts[r.index] for r in rows],
                                                        add_special_tokens=add)["input_ids"]]
            order = sorted(range(len(rows)), key=lambda j: lengths[j])
            for start in range(0, len(order), self.prefill_rows):
                chunk = [rows[j] for j in order[start:start + self.prefill_rows]]
                enc = lm.tokenizer([r.call.prompts[r.index] for r in chunk], padding=True, padding_side="left",
                                   return_tensors="pt", add_special_tokens=add)
                ids, mask = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                self.model_calls["prefill"] += 1
                out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               logits_to_keep=1)
                parts.append((chunk, out.past_key_values, mask, positions[:, -1:], out.logits[:, -1].float()))
        except Exception as exc:  # noqa: BLE001 - handed to the caller that caused it
            if len(calls) == 1:
                calls[0].fail(exc)
            else:
                for call in calls:
                    self._prefill([call])
            return
        for part in parts:
            self._join(*part)

    def _join(self, rows: list[_Row], past, mask, positions, logits) -> None:
        """Stack new rows under the batch: both caches and masks left-padded (masked zeros) to one length."""
        import torch

        if not self._rows:
            self._rows, self._past, self._mask, self._positions, self._logits = rows, past, mask, positions, logits
            return
        length = max(self._mask.shape[1], mask.shape[1])

        def pad(t, dim):  # left-pad dimension `dim` to `length` with zeros
            extra = length - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._past.layers, past.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, 2), pad(new.keys, 2)], dim=0)
            old.values = torch.cat([pad(old.values, 2), pad(new.values, 2)], dim=0)
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)], dim=0)
        self._positions = torch.cat([self._positions, positions], dim=0)
        self._logits = torch.cat([self._logits, logits], dim=0)
        self._rows = self._rows + rows

    def _clear(self) -> None:
        self._rows, self._past, self._mask, self._positions, self._logits = [], None, None, None, None

    def _step(self) -> None:
        """Each row picks its next token (as `LM.stream_many` does) and hands its piece over; finished rows
        and rows nobody reads leave the batch; one forward pass for the rest."""
        import torch

        lm, stop_ids = self.lm, self.lm._stop_ids()
        keep, tokens = [], []
        for b, row in enumerate(self._rows):
            call = row.call
            if call.closed:
                continue
            try:
                token = lm._next_token(self._logits[b], row.generated, call.repetition_penalty,
                                       call.banned[row.index])
                done = token in stop_ids
                if not done:
                    row.generated.append(token)
                    piece, done = lm._piece(row.generated, row.emitted, call.stop)
                    if piece:
                        row.emitted += piece
                        call.out.put((row.index, piece))
                    done = done or len(row.generated) >= call.max_new_tokens
            except Exception as exc:  # noqa: BLE001 - e.g. a banned token id out of range: that call's error
                call.fail(exc)
                continue
            if done:
                call.finish_row(row.index)
            else:
                keep.append(b)
                tokens.append(token)
        if not keep:
            self._clear()
            return
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, device=lm.device)
            self._past.batch_select_indices(index)
            self._mask, self._positions = self._mask[index], self._positions[index]
            self._rows = [self._rows[b] for b in keep]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(keep), 1)], dim=1)
        self._positions = self._positions + 1
        self.model_calls["decode"] += 1
        out = lm.model(input_ids=torch.tensor(tokens, device=lm.device)[:, None], attention_mask=self._mask,
                       position_ids=self._positions, past_key_values=self._past, use_cache=True)
        self._past, self._logits = out.past_key_values, out.logits[:, -1].float()
