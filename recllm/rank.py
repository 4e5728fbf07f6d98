"""LLM ranking by verbalizer (LlamaRec): one forward pass scores up to 20 lettered candidates.

The prompt (prompts/rank.txt) lists the user's history as numbered titles (the most recent `max_history`,
oldest first) and the candidates as options (A)..(T), and ends with the answer prefix `Answer: (`. The score of
candidate i is the next-token logit of its letter: nothing is generated or parsed, so the output is always a
permutation of the candidates given. The model is asked through ONE method, `letter_scores(prompts, letter_ids)`:
`llm.LM` (in-process) returns the logits, `llm.remote.RemoteLM` (an OpenAI-compatible server, `--llm-url`) the
log-probabilities, which differ from the logits by one constant per prompt that the z-score below removes.

Fusion: `fused = w * z(llm) + (1 - w) * z(retriever)`, z = z-score over the candidates of one request
(0 when all scores are equal). w comes from the `fusion_weight` argument, else the adapter's metadata, else
`DEFAULT_FUSION_WEIGHT`. w = 1 ranks by the LLM alone, w = 0 keeps the retriever order. Ties keep the
retriever order.

Letter bias (`RankConfig.calibration`): a small model prefers some letters whatever they label (the shipped
adapter picked B or M for 135 of 150 users). "none" scores by the raw letter logits. "prior" subtracts the letter
prior, the mean log-probability of each letter on content-free prompts (`letter_prior`),
from the log-probabilities over the candidates' letters (contextual calibration). "reverse" also scores the
candidates in reversed order (2 forward passes) and averages each candidate's two log-probabilities;
"prior+reverse" does both. The prior comes from the adapter metadata (`letter_prior`, measured once per adapter
at training time by `measure_letter_prior`, from train-split prompts with shuffled candidates or random catalog
titles), else it is measured on first use on "N/A" prompts (2 prompts, no catalog needed; it over-corrects the
shipped adapter) and kept. bench/letter_bias.py measures the bias and each option; on the shipped adapter no
option raised validation NDCG@10 (docs/eval/llm-ranker/letter-bias.md), so the default is "none".
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from recllm.errors import AdapterError, InputError, RequestTimeout
from recllm.llm import LETTERS
from recllm.prompts import load_prompt, load_sections, sanitize

if TYPE_CHECKING:  # pragma: no cover
    from recllm.llm import LM
    from recllm.retrieve import Candidate

DEFAULT_FUSION_WEIGHT = 0.5  # LLM share of the fused score when neither the caller nor the adapter sets one
RANK_VARIABLES = frozenset({"history", "candidates"})
CHAT_PROMPT = "rank_chat"  # the rank template that also shows the user's latest words (`query`)
CHAT_VARIABLES = RANK_VARIABLES | {"query"}
CALIBRATIONS = ("none", "prior", "reverse", "prior+reverse")
CONTENT_FREE = "N/A"  # the title of every line of a content-free prompt (letter prior without a catalog)
PRIOR_PROMPTS = 32  # random-title prompts the letter prior is averaged over
_YEAR_RE = re.compile(r"\s*\(\d{4}\)\s*$")


@dataclass
class RankConfig:
    """How rank prompts are built and run."""

    max_history: int = 20  # most recent history titles shown to the model
    max_candidates: int = 20  # candidates per prompt (letters A..T); more are cut, retriever order
    title_chars: int = 40  # each title cut to this many characters (keeps a trailing "(1995)")
    show_year: bool = False  # keep a trailing " (1995)": SmolLM2 spends 6 tokens on it (digits are single tokens)
    batch_size: int = 8  # prompts per forward pass
    calibration: str = "none"  # letter-bias correction: one of CALIBRATIONS (see module doc)
    genres: int = 0  # genres shown after each title (0: the title only; prompts/rank_lines.txt [genres])
    show_band: bool = False  # each candidate's place in the retriever's order (prompts/rank_lines.txt [band])
    query_chars: int = 300  # the user's words shown by the rank_chat template, cut to this many characters

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "batch_size"}


class Line(NamedTuple):
    """One title as the rank prompt may show it: with genres and, for a candidate, its retriever rank (1-based).
    Plain strings are accepted wherever a Line is (a title alone)."""

    title: str
    genres: tuple[str, ...] = ()
    band: int | None = None

    @classmethod
    def of(cls, item, band: int | None = None) -> Line:
        """From a catalog `Item` (its label and genres)."""
        return cls(item.label, tuple(item.genres), band)


def _line(value) -> Line:
    return value if isinstance(value, Line) else Line(str(value))


class LetterScorer(Protocol):
    """What the ranker needs of a model (`llm.LM` in-process, `llm.remote.RemoteLM` on an LLM server)."""

    adapter_metadata: dict
    adapter_id: str | None

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str: ...
    def letter_token_ids(self, n: int = 20, prefix: str = "(") -> list[int]: ...
    def letter_scores(self, prompts: Sequence[str], letter_ids: Sequence[int], batch_size: int = 8) -> np.ndarray: ...
    def describe(self) -> dict: ...


class Ranked(NamedTuple):
    """One ranked candidate: unpacks as `(candidate, llm_score, fused_score)`."""

    candidate: Candidate
    llm_score: float  # the candidate's letter score: next-token logit (in-process) or log-probability (LLM server);
    # with a calibration, its calibrated log-probability among the candidates (the same on both)
    fused_score: float  # the order key (see module doc)


def _config_from(values: dict) -> RankConfig:
    known = {k: v for k, v in values.items() if k in RankConfig.__dataclass_fields__}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AdapterError(f"Adapter rank_config has unknown keys {', '.join(unknown)}: update recllm or retrain")
    known.setdefault("calibration", "none")  # adapters from before calibration: raw logits, as they were tuned
    return RankConfig(**known)


def _prior_from(values, adapter_id: str | None) -> np.ndarray | None:
    if values is None:
        return None
    prior = np.asarray(values, dtype=np.float64)
    if prior.ndim != 1 or not 1 <= prior.size <= len(LETTERS) or not np.isfinite(prior).all():
        raise AdapterError(f"Adapter {adapter_id} has a malformed letter_prior (want up to {len(LETTERS)} "
                           "finite numbers): update recllm or retrain")
    return prior


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())


def calibrate(forward: Sequence[float], reverse: Sequence[float] | None = None,
              prior: Sequence[float] | None = None) -> np.ndarray:
    """Calibrated scores of n candidates from their letter scores (logits or log-probabilities).

    forward: the scores of letters A.. with the candidates in the given order; reverse: with them in reversed
    order (letter A = the last candidate), or None; prior: each letter's log-probability on content-free
    prompts (its first n entries are used), or None. Each pass becomes log-probabilities over the n letters,
    minus the prior of the letter the candidate had; with `reverse`, the two are averaged.
    """
    n = len(forward)
    shift = np.zeros(n) if prior is None else np.asarray(prior, dtype=np.float64)[:n]
    if shift.size != n:
        raise InputError(f"the letter prior has {shift.size} letters, {n} candidates were scored")
    out = _log_softmax(forward) - shift
    if reverse is not None:
        out = (out + (_log_softmax(reverse) - shift)[::-1]) / 2.0
    return out


def zscore(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """(x - mean) / std over one request; zeros when all values are equal; non-finite values count as the minimum."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, x[finite].min() if finite.any() else 0.0)
    std = x.std()
    return np.zeros_like(x) if std < 1e-12 else (x - x.mean()) / std


def fuse(llm_scores: Sequence[float], retriever_scores: Sequence[float], weight: float) -> np.ndarray:
    """`weight * z(llm) + (1 - weight) * z(retriever)`."""
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"Fusion weight must be between 0 and 1, not {weight}")
    return weight * zscore(llm_scores) + (1.0 - weight) * zscore(retriever_scores)


class LLMRanker:
    """Scores and orders retriever candidates with a causal LM (see module doc)."""

    def __init__(self, lm: LM | LetterScorer, prompt: str = "rank", fusion_weight: float | None = None,
                 config: RankConfig | None = None, catalog=None) -> None:
        self.lm = lm
        self.catalog = catalog  # where candidates' genres come from (`rank_many`), when config.genres asks for them
        meta = lm.adapter_metadata
        if config is None and meta and meta.get("rank_config"):
            config = _config_from(meta["rank_config"])  # prompts built exactly as in training
        self.config = replace(config) if config else RankConfig()  # a copy: adapters may lower limits
        self.prompt = load_prompt(prompt, RANK_VARIABLES)
        self.lines = load_sections("rank_lines")
        self.lines_sha256 = load_prompt("rank_lines").sha256  # pinned in adapters that show genres or bands
        # The user's words are shown only to a model that learned that template: the base model, or an adapter
        # whose metadata names it (`chat_prompt`, checked against the file at load like `prompt`).
        chat = (meta.get("chat_prompt") or {}).get("name") if meta else CHAT_PROMPT
        self.chat_prompt = load_prompt(chat, CHAT_VARIABLES) if chat else None
        if meta:
            trained = meta.get("prompt", {}).get("name")
            if trained != self.prompt.name:
                raise AdapterError(f"Adapter {lm.adapter_id} was trained with prompt {trained!r}, "
                                   f"not {self.prompt.name!r}: rank with --prompt {trained} or retrain it")
            self.config.max_candidates = min(self.config.max_candidates, int(meta.get("max_candidates", 20)))
        if fusion_weight is None:
            fusion_weight = meta.get("fusion_weight") if meta else None
        self.fusion_weight = DEFAULT_FUSION_WEIGHT if fusion_weight is None else float(fusion_weight)
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise InputError(f"Fusion weight must be between 0 and 1, not {self.fusion_weight}")
        if not 1 <= self.config.max_candidates <= len(LETTERS):
            raise InputError(f"max_candidates must be between 1 and {len(LETTERS)}")
        if self.config.calibration not in CALIBRATIONS:
            raise InputError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {self.config.calibration!r}")
        self.letter_prior = _prior_from(meta.get("letter_prior") if meta else None, lm.adapter_id)
        # Every letter must be one token right where the prompt ends (ModelError otherwise).
        sample = self.build_prompt(["x"], ["y"])
        self.letter_ids = lm.letter_token_ids(len(LETTERS), prefix=sample)

    def describe(self) -> dict:
        """For traces (and adapter metadata): model, adapter, device, prompt name + sha256, fusion weight,
        prompt settings."""
        return {**self.lm.describe(), "prompt": self.prompt.name, "prompt_sha256": self.prompt.sha256,
                "fusion_weight": self.fusion_weight, "rank_config": self.config.to_dict()}

    def build_prompt(self, history_titles: Sequence[str | Line], candidate_titles: Sequence[str | Line],
                     query: str | None = None) -> str:
        """The exact text the model reads for one user (ends where the candidate letter is expected).

        Titles are strings or `Line`s (genres and retriever rank shown as `config` asks). `query`: the user's
        latest words; shown with the rank_chat template when this model knows it (`chat_prompt`), else unused.
        """
        cfg = self.config
        if not candidate_titles:
            raise InputError("Nothing to rank: no candidates")
        if len(candidate_titles) > cfg.max_candidates:
            raise InputError(f"At most {cfg.max_candidates} candidates per prompt, got {len(candidate_titles)}")
        history = list(history_titles)[-cfg.max_history:] if cfg.max_history > 0 else []
        history_lines = "\n".join(f"{i}. {self.format_line(t)}" for i, t in enumerate(history, 1))
        option_lines = "\n".join(f"({LETTERS[i]}) {self.format_line(t, band=True)}"
                                  for i, t in enumerate(candidate_titles))
        said = sanitize(query, cfg.query_chars).replace('"', "'") if query and self.chat_prompt else ""
        if said:
            messages = self.chat_prompt.messages(query=said, history=history_lines or "-", candidates=option_lines)
        else:
            messages = self.prompt.messages(history=history_lines or "-", candidates=option_lines)
        return self.lm.chat_text(messages)

    def reads_query(self, query: str | None) -> bool:
        """Whether `build_prompt` shows this query to the model."""
        return bool(self.chat_prompt is not None and query and sanitize(query, self.config.query_chars))

    def format_line(self, value: str | Line, band: bool = False) -> str:
        """One history or candidate line: the title (`format_title`), then genres / retriever rank per config."""
        line = _line(value)
        text = self.format_title(line.title)
        if self.config.genres and line.genres:
            genres = ", ".join(sanitize(g, 20) for g in line.genres[: self.config.genres])
            text = self.lines["genres"].render(title=text, genres=genres)
        if band and self.config.show_band and line.band is not None:
            text = self.lines["band"].render(line=text, band=int(line.band))
        return text

    def format_title(self, title: str) -> str:
        """A title as shown in the prompt: year dropped (unless show_year), sanitized, cut to title_chars."""
        if not self.config.show_year:
            title = _YEAR_RE.sub("", str(title))
        return sanitize(title, self.config.title_chars)

    def score(self, requests: Sequence[tuple], deadline: float | None = None) -> list[np.ndarray]:
        """LLM scores per request `(history_titles, candidate_titles[, query])`: float64 arrays, one per candidate
        (the raw letter scores, or calibrated ones per `config.calibration`, see the module doc). Candidates
        come in retriever order: a candidate `Line` without a band gets its place in that order.

        All prompts go through the model in padded batches (with "reverse", the reversed prompts too); an empty
        candidate list scores as an empty array.
        Past `deadline` (a `time.monotonic()` value) no further batch is started: `RequestTimeout`.
        """
        mode = self.config.calibration
        live = [(r[0], _banded(r[1]), r[2] if len(r) > 2 else None) for r in requests if len(r[1])]
        prompts = [self.build_prompt(h, c, q) for h, c, q in live]
        if "reverse" in mode:
            prompts += [self.build_prompt(h, c[::-1], q) for h, c, q in live]
        letters = self._letter_scores(prompts, deadline)
        prior = self.prior() if "prior" in mode and live else None
        out, row = [], 0
        for request in requests:
            candidates = request[1]
            if not len(candidates):
                out.append(np.zeros(0))
                continue
            n = len(candidates)
            if mode == "none":
                out.append(letters[row][:n])
            else:
                out.append(calibrate(letters[row][:n], letters[row + len(live)][:n] if "reverse" in mode else None,
                                     prior))
            row += 1
        return out

    def content_free_prompts(self, titles: Sequence[str] | None = None, n: int = PRIOR_PROMPTS,
                             seed: int = 1) -> list[str]:
        """The prompts the letter prior is measured on. With `titles` (a catalog's): `n` prompts of random titles
        (history and candidates drawn independently, so no candidate fits its history; fixed `seed`). Without:
        every title "N/A", the history full and half full."""
        cfg = self.config
        if titles is None:
            lengths = sorted({cfg.max_history, cfg.max_history // 2})
            return [self.build_prompt([CONTENT_FREE] * h, [CONTENT_FREE] * cfg.max_candidates) for h in lengths]
        titles = list(titles)
        if len(titles) < cfg.max_candidates:
            raise InputError(f"the letter prior needs at least {cfg.max_candidates} titles, got {len(titles)}")
        rng = np.random.default_rng(seed)
        return [self.build_prompt([titles[i] for i in rng.choice(len(titles), cfg.max_history)],
                                  [titles[i] for i in rng.choice(len(titles), cfg.max_candidates, replace=False)])
                for _ in range(n)]

    def measure_letter_prior(self, titles: Sequence[str] | None = None,
                             requests: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None,
                             seed: int = 1) -> np.ndarray:
        """Each letter's mean log-probability (over the candidate letters): what the model gives a letter whatever
        it labels. `.tolist()` is the adapter metadata's `letter_prior`.

        Measured on `content_free_prompts(titles)`, or, with `requests` (`(history titles, candidate titles)` of
        real users, e.g. the train split's, each with `max_candidates` candidates), on their prompts with the
        candidates shuffled (fixed `seed`): the true item then sits on every letter alike, so the mean is the
        letter bias of real prompts (the prior that evened the letters best in bench/letter_bias.py).
        """
        n = self.config.max_candidates
        if requests is None:
            prompts = self.content_free_prompts(titles)
        else:
            rng = np.random.default_rng(seed)
            full = [(h, list(c)) for h, c in requests if len(c) == n]
            if not full:
                raise InputError(f"the letter prior needs requests with {n} candidates")
            prompts = [self.build_prompt(h, [c[i] for i in rng.permutation(n)]) for h, c in full]
        rows = self._letter_scores(prompts, None)
        return np.mean([_log_softmax(r[:n]) for r in rows], axis=0)

    def prior(self) -> np.ndarray:
        """The letter prior in use: the adapter's stored one, else measured now (once per ranker)."""
        if self.letter_prior is None:
            self.letter_prior = self.measure_letter_prior()
        return self.letter_prior

    def _letter_scores(self, prompts: list[str], deadline: float | None) -> list[np.ndarray]:
        """The scores of all letters per prompt through the model's one ranking call, `lm.letter_scores`
        (in-process: next-token logits; on an LLM server: log-probabilities, the same up to one constant per
        prompt). `batch_size` prompts per call, shortest first (as `LM.next_token_logits` groups them), checking
        `deadline` before each call."""
        size = max(1, self.config.batch_size)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows: list = [None] * len(prompts)
        for start in range(0, len(order), size):
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeout("ranking stopped: the request ran past its time limit")
            chunk = order[start:start + size]
            scores = self.lm.letter_scores([prompts[i] for i in chunk], self.letter_ids, batch_size=size)
            for row, i in enumerate(chunk):
                rows[i] = np.asarray(scores[row], dtype=np.float64)
        return rows

    def rank_many(self, requests: Sequence[tuple], fusion_weight: float | None = None,
                  deadline: float | None = None) -> list[list[Ranked]]:
        """`rank` for many users in batched forward passes (`RequestTimeout` past `deadline`, see `score`).
        A request is `(history titles or Lines, candidates[, query])`; candidates' genres come from `catalog`."""
        cut = [list(r[1])[: self.config.max_candidates] for r in requests]
        scores = self.score([(r[0], [self.candidate_line(c, i) for i, c in enumerate(cands)], *r[2:3])
                             for r, cands in zip(requests, cut)], deadline)
        weight = self.fusion_weight if fusion_weight is None else fusion_weight
        return [self.order(cands, s, weight) for cands, s in zip(cut, scores)]

    def rank(self, history_titles: Sequence[str], candidates: Sequence[Candidate],
             fusion_weight: float | None = None) -> list[Ranked]:
        """Candidates (the first `max_candidates`, in retriever order) re-ordered by fused score, best first."""
        return self.rank_many([(history_titles, candidates)], fusion_weight)[0]

    def candidate_line(self, candidate: Candidate, position: int) -> Line:
        """A retrieved candidate as a prompt line: its title, genres (from `catalog`, when shown) and place."""
        genres = ()
        if self.config.genres and self.catalog is not None and candidate.item_id in self.catalog:
            genres = tuple(self.catalog.get(candidate.item_id).genres)
        return Line(candidate.title, genres, position + 1)

    @staticmethod
    def order(candidates: Sequence[Candidate], llm_scores: np.ndarray, weight: float) -> list[Ranked]:
        """Fuse and sort (stable: ties keep the given order)."""
        fused = fuse(llm_scores, [c.score for c in candidates], weight)
        order = sorted(range(len(candidates)), key=lambda i: (-fused[i], i))
        return [Ranked(candidates[i], float(llm_scores[i]), float(fused[i])) for i in order]


def _banded(candidates: Sequence[str | Line]) -> list[Line]:
    """Candidates in retriever order as Lines; one without a band gets its place in that order."""
    return [line if line.band is not None else line._replace(band=i + 1)
            for i, line in enumerate(_line(c) for c in candidates)]


def ranking_trace(ranked: Sequence[Ranked], prompt_order: Sequence[str] = ()) -> list[dict]:
    """Trace rows, best first: item_id, title, rank (1-based), letter shown to the model (None when the model
    did not see the item), retriever score, signals, LLM score and fused score. `prompt_order`: the item ids
    in the order the model read them."""
    position = {item_id: i for i, item_id in enumerate(prompt_order)}
    rows = []
    for rank, (cand, llm_score, fused) in enumerate(ranked, 1):
        i = position.get(cand.item_id)
        rows.append({
            "item_id": cand.item_id, "title": cand.title, "rank": rank,
            "letter": LETTERS[i] if i is not None and i < len(LETTERS) else None,
            "retriever_score": float(cand.score), "signals": dict(cand.signals or {}),
            "llm_score": llm_score, "fused_score": fused,
        })
    return rows
