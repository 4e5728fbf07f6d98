"""Measure explanations: do they cite the user's own evidence, and is every claim true?

`recllm eval-explanations` samples users (`sample_users`: a seeded sample of the interactions' users), asks the
engine for k items per user (`recommend(explain=0)`), then explains all k in ONE batched generation
(`Recommender.explain_many`, as the chat and batch do) and judges every explanation (`judge`):

- names_liked: it names one of the user's items in its evidence (`Evidence.titles`: the liked items it is
  most like, and the item of the collaborative fact), by title (with or without a leading article / year);
- names_evidence: names_liked, or it names a genre/tag of the evidence's shared ones (`Evidence.shared`);
- contradiction: it asserts a genre or era the item's data does not support (`claims.contradictions`);
- praise: praise nothing in our data backs ("acclaimed", "captivated audiences": `claims.unsupported_praise`);
- filler: it names no evidence (not names_evidence) and no attribute of the recommended item either: none of
  its genres (by name, or a genre word of `claims.GENRE_WORDS` that the item's genres support), none of its tags,
  not its year or decade ("1995", "1990s", "'90s") — e.g. "It has captivated audiences worldwide." The item's
  own title does not count;
- fallback: the validator rejected the model's text (or there was no model) and the plain sentence was shown;
- cut_off: the text does not end a sentence, or holds "...".

Summary: each of those as a share of all explanations, distinct-2 (distinct word bigrams / all bigrams over
all texts), mean length in words, and seconds per explanation = the user's batched generation time / the
number of items in it (`seconds_per_explanation`: all explanation time / all explanations;
`seconds_per_explanation_median`: the median over users). Report: `write_report` (report.json + report.md).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recllm.catalog import normalize_title
from recllm.claims import GENRE_WORDS, contradictions, strip_titles, unsupported_praise
from recllm.errors import InputError, RecllmError

METRICS = ("names_liked", "names_evidence", "contradiction", "praise", "filler", "fallback", "cut_off")
_END_RE = re.compile(r"[.!?][\"')\]]*$")
_WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclass
class Judged:
    """One explanation and what it claims."""

    user: str
    item_id: str
    text: str
    source: str
    seconds: float
    names_liked: bool
    names_evidence: bool
    contradiction: list[str] = field(default_factory=list)
    praise: list[str] = field(default_factory=list)
    cut_off: bool = False
    filler: bool = False
    rejected: str | None = None  # why the model's text was replaced by the plain sentence (fallbacks)

    def flags(self) -> dict[str, bool]:
        return {"names_liked": self.names_liked, "names_evidence": self.names_evidence,
                "contradiction": bool(self.contradiction), "praise": bool(self.praise), "filler": self.filler,
                "fallback": self.source == "fallback", "cut_off": self.cut_off}


def _forms(title: str) -> set[str]:
    """Normalised ways a title may be written in a sentence ("The Matrix", "Matrix", "Matrix, The")."""
    base = normalize_title(re.sub(r"\s*\(\d{4}\)$", "", title))
    forms = {base, re.sub(r"^(?:the|a|an) ", "", base)}
    return {f for f in forms if len(f) >= 2}


def names_any(text: str, titles: Sequence[str]) -> bool:
    padded = f" {normalize_title(text)} "
    return any(f" {form} " in padded for title in titles for form in _forms(title))


def _has_phrase(text: str, phrase: str) -> bool:
    return bool(phrase) and re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, re.IGNORECASE) is not None


def names_attribute(text: str, item) -> bool:
    """The text names a genre, tag, year or decade of catalog `item` (its own title removed first)."""
    body = strip_titles(text, [item.title, item.label])
    genres = {g.lower() for g in item.genres}
    words = set(_WORD_RE.findall(body.lower().replace("’", "'")))
    if any(_has_phrase(body, g) for g in item.genres if g != "(no genres listed)"):
        return True
    if any(w in words for genre, forms in GENRE_WORDS.items() if genre.lower() in genres for w in forms):
        return True
    if any(_has_phrase(body, t) for t in item.tags):
        return True
    if item.year:
        decade = item.year // 10 * 10
        forms = {str(item.year), f"{decade}s", f"{decade % 100:02d}s", f"'{decade % 100:02d}s"}
        return any(_has_phrase(body, f) for f in forms)
    return False


def judge(user: str, item, explanation, seconds: float) -> Judged:
    """The claims of one `explain.Explanation` about catalog `item`."""
    text = explanation.text
    ev = explanation.evidence
    liked = names_any(text, ev.titles)
    evidence = liked or any(_has_phrase(text, s) for s in ev.shared)
    return Judged(user, item.item_id, text, explanation.source, seconds, liked, evidence,
                  contradictions(text, item, titles=ev.titles), unsupported_praise(text, titles=ev.titles),
                  cut_off=not _END_RE.search(text.strip()) or "..." in text,
                  filler=not evidence and not names_attribute(text, item), rejected=explanation.rejected)


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams / all word bigrams over the texts (1.0: nothing repeated)."""
    bigrams = [tuple(pair) for t in texts for pair in zip(t.lower().split(), t.lower().split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def summarize(judged: Sequence[Judged], *, users: int, errors: int = 0, seconds: float = 0.0,
              per_user: Sequence[float] = ()) -> dict:
    """The shares of `METRICS`, distinct-2, mean words and seconds per explanation over `judged`."""
    n = max(1, len(judged))
    summary = {name: round(sum(j.flags()[name] for j in judged) / n, 4) for name in METRICS}
    summary.update(explanations=len(judged), users=users, errors=errors,
                   distinct_2=round(distinct_2([j.text for j in judged]), 4),
                   mean_words=round(sum(len(j.text.split()) for j in judged) / n, 2),
                   seconds_per_explanation=round(seconds / n, 4) if judged else 0.0,
                   seconds_per_explanation_median=round(statistics.median(per_user), 4) if per_user else 0.0)
    return summary


def measure(recommender, users: Sequence[str], *, k: int = 5, progress: bool = True) -> dict:
    """Recommend `k` items to each user and explain all of them in one batched generation per user; the summary
    and every judged explanation. A user the engine refuses (`RecllmError`) is counted in `errors`."""
    from recllm.request import Request

    judged: list[Judged] = []
    errors, total, per_user = 0, 0.0, []
    bar = progress_bar(progress, len(users))
    for user in users:
        try:
            result = recommender.recommend(Request(user=user, k=k, explain=0))
            asks = [(result, rec.rank) for rec in result.recommendations]
            t0 = time.perf_counter()
            for _ in recommender.explain_many(asks):
                pass
            seconds = time.perf_counter() - t0
        except RecllmError:
            errors += 1
            bar.update(1)
            continue
        if asks:
            total += seconds
            per_user.append(seconds / len(asks))
        for rec in result.recommendations:
            judged.append(judge(user, recommender.catalog.get(rec.item_id), rec.reason, seconds / len(asks)))
        bar.update(1)
    bar.close()
    summary = summarize(judged, users=len(users), errors=errors, seconds=total, per_user=per_user)
    return {"summary": summary, "explanations": [asdict(j) for j in judged]}


def progress_bar(enabled: bool, total: int):
    """A tqdm bar on stderr, as `recllm eval` draws them (gone when done)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="explaining", unit="user", file=sys.stderr, leave=False)


def sample_users(interactions, n: int, seed: int = 0) -> list[str]:
    """`n` users of the interactions (all when fewer), a seeded sample, sorted."""
    users = sorted(interactions.users, key=str)
    return sorted(random.Random(seed).sample(users, min(n, len(users))), key=str)


ROWS = (("names a liked item of the user's", "names_liked"), ("names any evidence", "names_evidence"),
        ("contradicts the catalog (genre/era)", "contradiction"), ("unsourced praise", "praise"),
        ("filler (no evidence, no attribute of the item)", "filler"),
        ("fell back to the plain sentence", "fallback"), ("cut-off sentence", "cut_off"))


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Explanation quality — {report.get('system', '')}", "",
             f"{s['explanations']} explanations for {s['users']} users ({s['errors']} errors); "
             f"command: `{report.get('command', '')}`", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {s[key]:.1%} |" for name, key in ROWS]
    lines += [f"| distinct-2 | {s['distinct_2']:.3f} |", f"| mean length (words) | {s['mean_words']:.1f} |",
              f"| seconds per explanation (batched; all time / all explanations) | "
              f"{s['seconds_per_explanation']:.3f} |",
              f"| seconds per explanation (median over users) | {s['seconds_per_explanation_median']:.3f} |", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json (summary, settings and every judged explanation) and report.md under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    paths["md"].write_text(to_markdown(report))
    return paths


def run(recommender, *, users: int = 100, k: int = 5, seed: int = 0, progress: bool = True,
        command: str = "") -> dict:
    """The whole measurement on `recommender`'s interactions: the report (see `write_report`)."""
    if recommender.interactions is None:
        raise InputError("eval-explanations needs interactions (users to recommend to): give --interactions")
    if users < 1 or k < 1:
        raise InputError(f"--users and --k must be at least 1, not {users} and {k}")
    chosen = sample_users(recommender.interactions, users, seed)
    measured = measure(recommender, chosen, k=k, progress=progress)
    described = recommender.describe()  # after the run: the model is loaded by then
    system = described.get("model") or "no model (plain sentences)"
    if described.get("adapter"):
        system += f" + {described['adapter']}"
    return {"system": system, "command": command,
            "settings": {"users": len(chosen), "k": k, "seed": seed, "catalog": described.get("catalog")},
            **measured}
