"""Measure explanations: do they cite the user's own evidence, and is every claim true?

`recllm eval-explanations` asks the engine for k items per sampled user with every item explained and counts,
over all explanations: the share that name one of the user's liked evidence items, the share that name any
evidence (a liked item or a shared genre/tag), the contradiction rate (`claims.contradictions`: genre or era
words the item's data does not support), unsourced praise (`claims.unsupported_praise`), the fallback rate,
cut-off sentences, distinct-2, mean length in words and seconds per explanation. Report: JSON + Markdown.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recllm.catalog import normalize_title
from recllm.claims import contradictions, unsupported_praise

METRICS = ("names_liked", "names_evidence", "contradiction", "praise", "fallback", "cut_off")
_END_RE = re.compile(r"[.!?][\"')\]]*$")


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

    def flags(self) -> dict[str, bool]:
        return {"names_liked": self.names_liked, "names_evidence": self.names_evidence,
                "contradiction": bool(self.contradiction), "praise": bool(self.praise),
                "fallback": self.source == "fallback", "cut_off": self.cut_off}


def _forms(title: str) -> set[str]:
    """Normalised ways a title may be written in a sentence ("The Matrix", "Matrix", "Matrix, The")."""
    base = normalize_title(re.sub(r"\s*\(\d{4}\)$", "", title))
    forms = {base, re.sub(r"^(?:the|a|an) ", "", base)}
    return {f for f in forms if len(f) >= 2}


def names_any(text: str, titles: Sequence[str]) -> bool:
    padded = f" {normalize_title(text)} "
    return any(f" {form} " in padded for title in titles for form in _forms(title))


def judge(user: str, item, explanation, seconds: float) -> Judged:
    """The claims of one `explain.Explanation` about catalog `item`."""
    text = explanation.text
    ev = explanation.evidence
    liked = names_any(text, ev.titles)
    shared = any(re.search(rf"(?<!\w){re.escape(s)}(?!\w)", text, re.IGNORECASE) for s in ev.shared)
    return Judged(user, item.item_id, text, explanation.source, seconds, liked, liked or shared,
                  contradictions(text, item, titles=ev.titles), unsupported_praise(text, titles=ev.titles),
                  cut_off=not _END_RE.search(text.strip()) or "..." in text)


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams / all word bigrams over the texts (1.0: nothing repeated)."""
    bigrams = [tuple(pair) for t in texts for pair in zip(t.lower().split(), t.lower().split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def measure(recommender, users: Sequence[str], *, k: int = 5, progress: bool = True) -> dict:
    """Recommend `k` items to each user with all `k` explained; the summary and every judged explanation."""
    from recllm.request import Request

    judged: list[Judged] = []
    errors = 0
    bar = _bar(progress, len(users))
    for user in users:
        try:
            result = recommender.recommend(Request(user=user, k=k, explain=0))
        except Exception:  # noqa: BLE001 - counted, never stops the measurement
            errors += 1
            bar.update(1)
            continue
        for rec in result.recommendations:
            t0 = time.perf_counter()
            for _ in recommender.explain_stream(result, rec.rank):
                pass
            judged.append(judge(user, recommender.catalog.get(rec.item_id), rec.reason, time.perf_counter() - t0))
        bar.update(1)
    bar.close()
    n = max(1, len(judged))
    summary = {name: round(sum(j.flags()[name] for j in judged) / n, 4) for name in METRICS}
    summary.update(explanations=len(judged), users=len(users), errors=errors,
                   distinct_2=round(distinct_2([j.text for j in judged]), 4),
                   mean_words=round(sum(len(j.text.split()) for j in judged) / n, 2),
                   seconds_per_explanation=round(sorted(j.seconds for j in judged)[len(judged) // 2], 3)
                   if judged else 0.0)
    return {"summary": summary, "explanations": [j.__dict__ for j in judged]}


def _bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="explaining", unit="user", leave=False)


def sample_users(interactions, n: int, seed: int = 0) -> list[str]:
    users = sorted(interactions.users, key=str)
    return sorted(random.Random(seed).sample(users, min(n, len(users))), key=str)


def to_markdown(report: dict) -> str:
    s = report["summary"]
    rows = [("names a liked item of the user's", s["names_liked"]), ("names any evidence", s["names_evidence"]),
            ("contradicts the catalog (genre/era)", s["contradiction"]), ("unsourced praise", s["praise"]),
            ("fell back to the plain sentence", s["fallback"]), ("cut-off sentence", s["cut_off"])]
    lines = [f"# Explanation quality — {report.get('system', '')}", "",
             f"{s['explanations']} explanations for {s['users']} users ({s['errors']} errors); "
             f"command: `{report.get('command', '')}`", "", "| measure | share |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in rows]
    lines += [f"| distinct-2 | {s['distinct_2']:.3f} |", f"| mean length (words) | {s['mean_words']:.1f} |",
              f"| seconds per explanation (median) | {s['seconds_per_explanation']:.2f} |", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return out
