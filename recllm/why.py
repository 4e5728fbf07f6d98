""""Why (not) X?" answers in plain words, built only from the facts of one request (`request.Result`).

The first sentence says what happened to the item; the reasons come from the trace:

- recommended: its place ("#2 of 5, out of 20 candidates") and its evidence (`explain.Evidence`): the user's
  items it is like and what it has in common with them, the collaborative fact ("12 people who liked Heat also
  liked it"), the request's constraints it meets, or (no history) the words the person asked with;
- not recommended, in this order: already in the history; removed by the person (a thumbs down, "not that one",
  "something else": `Filters.exclude_reasons`, else a plain exclusion); removed by a constraint of the request
  (which one: genres asked for, genres ruled out, years, a metadata filter); a candidate ranked below the shown
  ones (its place of how many); never retrieved;
- not in the catalog at all (`not_in_catalog`).

Raw scores (language model, retriever, combined) are added only with `details=True` (`recllm why --details`, or
a question that says "details" or "scores": `asks_details`); without them the only
numbers are places in the ranking, counts of people and years. Every sentence is a template in
prompts/why*.txt (why.txt, why_not_recommended.txt, why_not_candidate.txt, why_in_history.txt, why_scores.txt,
and the small parts in why_parts.txt). The chat, `recllm why`, batch `question` rows and `Recommender.why` all
answer through `why_answer`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from recllm.prompts import Prompt, join_and, load_prompt, load_sections, sanitize

if TYPE_CHECKING:  # pragma: no cover
    from recllm.catalog import Catalog, Item
    from recllm.explain import Evidence
    from recllm.request import Result
    from recllm.retrieve import Filters

TITLE_CHARS = 80  # titles named in an answer are cut to this
MAX_SHARED = 3  # genres/tags named


_DETAILS_RE = re.compile(r"\b(?:details?|scores?)\b", re.IGNORECASE)


def asks_details(question: str) -> bool:
    """The question asks for the raw scores too ("why #2, with details?", "why #1 scores")."""
    return bool(_DETAILS_RE.search(question or ""))


def _parts() -> dict[str, Prompt]:
    return load_sections("why_parts")


def _say(name: str, **values: object) -> str:
    return _parts()[name].render(**values)


def _fmt(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(number) else f"{number:.2f}"


def _title(text: str) -> str:
    return sanitize(text, TITLE_CHARS)


def evidence_sentences(evidence: Evidence | None, result: Result | None = None,
                       catalog: Catalog | None = None) -> list[str]:
    """The reasons an item fits, one sentence each, from its evidence (liked items and what it shares with them,
    the collaborative fact, the constraints it meets) or, with no history, from the words asked with.

    With `catalog`, the shared genres/tags are said of only those liked items that have one of them, so no
    sentence gives a title a genre it lacks; a liked item with none of them is named by the collaborative fact,
    or as "like" the item when no other liked item is named.
    """
    out: list[str] = []
    if evidence is not None:
        co = getattr(evidence, "co_liked", None)
        co = (co,) if co and isinstance(co[0], str) else tuple(co or ())  # one fact, or several
        shared = evidence.shared[:MAX_SHARED]
        having, like = [], []
        for item_id, title, _ in evidence.liked:
            item = catalog.items.get(item_id) if catalog is not None else None
            if item is None or not shared or {*item.genres, *item.tags} & set(shared):
                having.append(title)
            elif item_id not in {c[0] for c in co}:
                like.append(title)
        names, shared_text = join_and([_title(t) for t in having]), join_and([sanitize(s, 40) for s in shared])
        if names and shared_text:
            out.append(_say("liked_shared", liked=names, shared=shared_text))
        elif names:
            out.append(_say("liked", liked=names))
        elif shared_text:
            out.append(_say("shared", shared=shared_text))
        if like and not having:  # a liked item sharing nothing is named only when nothing better is
            out.append(_say("liked", liked=join_and([_title(t) for t in like])))
        out += [_say("co_liked", people=int(people), title=_title(title)) for _, title, people in co]
        out += [_say("meets", meets=sanitize(m)) for m in getattr(evidence, "meets", ()) or ()]
    if result is not None and not result.history and (result.request.query or "").strip():
        out.append(_say("query", query=sanitize(result.request.query, 120)))
    return out


def not_in_catalog(name: str, catalog: str) -> str:
    """The answer for something that is no item of the catalog."""
    return _say("not_in_catalog", title=sanitize(name, TITLE_CHARS) or "?", catalog=sanitize(catalog))


def exclusion(item_id: str, title: str, filters: Filters | None) -> str | None:
    """Why the request's filters removed the item ("you gave it a thumbs down"), or None when they did not."""
    if filters is None or item_id not in filters.exclude_ids:
        return None
    reason = (getattr(filters, "exclude_reasons", None) or {}).get(item_id)
    name = f"excluded_{reason}" if f"excluded_{reason}" in _parts() else "excluded"
    return _say(name, title=_title(title))


def failed_constraint(item: Item, filters: Filters | None) -> str | None:
    """The constraint of `filters` (genres, years, metadata) that `item` does not meet, in words, else None."""
    if filters is None:
        return None
    genres = {g.lower() for g in item.genres}
    own = join_and(list(item.genres)) or "-"
    if filters.genres and genres.isdisjoint(g.lower() for g in filters.genres):
        return _say("only_genres", wanted=join_and(list(filters.genres)), genres=own)
    banned = [g for g in filters.exclude_genres if g.lower() in genres]
    if banned:
        return _say("no_genres", banned=join_and(banned))
    if (filters.year_min is not None or filters.year_max is not None) and item.year is None:
        return _say("no_year")
    if filters.year_min is not None and item.year < filters.year_min:
        return _say("year_min", year=filters.year_min, item_year=item.year)
    if filters.year_max is not None and item.year > filters.year_max:
        return _say("year_max", year=filters.year_max, item_year=item.year)
    meta = item.metadata()
    for key, value in (filters.where or {}).items():
        allowed = value if isinstance(value, (list, tuple, set, frozenset)) else (value,)
        if meta.get(key) not in allowed:
            return _say("where", field=sanitize(key, 40), value=sanitize(join_and([str(v) for v in allowed]), 80),
                        actual=sanitize(meta.get(key, "-"), 80))
    return None


def why_answer(item_id: str, title: str, result: Result, *, item: Item | None = None,
               evidence: Evidence | None = None, catalog: Catalog | None = None, details: bool = False) -> str:
    """Plain-text answer to "why (not) <title>?" from the facts of `result` (see the module doc).

    `item`: the catalog item (needed to name a constraint it fails); `evidence`: its `explain.Evidence` (default:
    that of its explanation in `result`, when it has one); `catalog`: to say shared genres only of the liked
    items that have them (`evidence_sentences`); `details`: add the raw scores (prompts/why_scores.txt).
    """
    name = _title(title)
    filters = result.request.filters
    rows = result.candidate_rows()
    row = next((r for r in rows if r["item_id"] == item_id), None)
    if item_id in set(result.history):
        text = load_prompt("why_in_history", {"title"}).render(title=name)
    elif row is None:
        text = exclusion(item_id, name, filters)
        constraint = failed_constraint(item, filters) if text is None and item is not None else None
        if constraint:
            text = _say("constraint", title=name, why=constraint)
        elif text is None:
            text = load_prompt("why_not_candidate", {"title", "n_candidates"}).render(
                title=name, n_candidates=len(rows))
    else:
        shown = len(result.recommendations)
        values = {"title": name, "rank": row["rank"], "shown": shown, "n_candidates": len(rows)}
        if row["rank"] <= shown:
            rec = result.recommendation(item_id)
            if evidence is None and rec is not None and rec.reason is not None:
                evidence = rec.reason.evidence
            reason = " ".join(evidence_sentences(evidence, result, catalog))
            text = load_prompt("why").render(reason=reason, **values)
        else:
            text = load_prompt("why_not_recommended").render(**values)
        if details:
            text += " " + load_prompt("why_scores").render(
                llm_score=_fmt(row["llm_score"]), retriever_score=_fmt(row["retriever_score"]),
                fused_score=_fmt(row["fused_score"]))
    return " ".join(text.split())
