"""Explanation examples for `recllm train` (the second task of the one adapter): the model learns to phrase the
evidence, so it names the user's own items and the attributes they share.

An example comes from the TRAIN split only: for a user's train sequence s and a cut t, the history is s[:t] and the
item to explain is s[t] (a real next item of that user). Its evidence is built exactly as the engine builds it
(`explain.evidence`: content vectors, the collaborative fact counted from train-side interactions only, the
item's era) and, for some examples, a constraint the item meets as if the person had asked for it. The prompt is
the explainer's own (`Explainer.messages`, prompts/explain.txt); the target continues its answer prefix with one
of several phrasings (prompts/explain_targets.txt) filled with that evidence, so every target is true and cites
the evidence, in varied words.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence

import numpy as np

from recllm import split
from recllm.explain import Evidence, Explainer, constraints_met, evidence
from recllm.errors import InputError
from recllm.prompts import join_and, load_prompt, load_sections, sanitize
from recllm.retrieve import Filters

CONSTRAINT_SHARE = 0.25  # examples whose prompt carries a constraint the item meets


def train_side_interactions(interactions, data: split.EvalData):
    """`interactions` less every evaluation user's validation and test items (what training may count)."""
    held = {(user, data.item_ids[int(items[u])]) for items in (data.valid, data.test)
            for u, user in enumerate(data.user_ids)}
    return interactions.without(held)


def target_text(ev: Evidence, rng: random.Random, config=None) -> str | None:
    """One phrasing (prompts/explain_targets.txt) filled with `ev`, chosen among those whose facts `ev` has;
    None when it has no liked item to name."""
    chars = 60 if config is None else config.title_chars
    liked = [sanitize(t, chars) for _, t, _ in ev.liked]
    if not liked:
        return None
    values = {"liked": join_and(liked), "one": liked[0], "shared": join_and(list(ev.shared)), "era": ev.era,
              "meets": ev.meets[0] if ev.meets else "", "people": "", "co_title": ""}
    if ev.co_liked:
        values.update(people=str(ev.co_liked[2]), co_title=sanitize(ev.co_liked[1], chars))
    fits = [p for p in load_sections("explain_targets").values() if all(values[v] for v in p.variables)]
    special = [p for p in fits if {"people", "meets"} & p.variables]
    pool = special if special and rng.random() < 0.7 else fits  # the rarer facts get said when present
    chosen = rng.choice(pool)
    return " " + chosen.render(**{v: values[v] for v in chosen.variables}).strip()


def build_explain_examples(data: split.EvalData, catalog, interactions, vectors: np.ndarray, explainer: Explainer,
                           *, n: int, cuts_per_user: int = 2, min_history: int = 3, history_len: int = 50,
                           seed: int = 0) -> tuple[list[tuple[str, str]], dict]:
    """Up to `n` explanation examples `(prompt, completion)` from the train split, and counts for the metadata.

    vectors: (N, D) item vectors aligned to `data.item_ids` (`split.content_matrix`); interactions: train-side
    (`train_side_interactions`)."""
    rng = random.Random(seed)
    users = list(range(data.n_users))
    rng.shuffle(users)
    items = [catalog.get(i) for i in data.item_ids]
    examples: list[tuple[str, str]] = []
    counts = {"tried": 0, "no_liked_evidence": 0, "with_collaborative_fact": 0, "with_constraint": 0}
    for u in users:
        seq = data.train[u]
        for t in range(len(seq) - 1, max(min_history, len(seq) - cuts_per_user) - 1, -1):
            if len(examples) >= n:
                break
            counts["tried"] += 1
            hist = [int(i) for i in seq[max(0, t - history_len):t]]
            item = items[int(seq[t])]
            meets = _asked(item, rng) if rng.random() < CONSTRAINT_SHARE else ()
            ev = evidence(item, [items[i] for i in hist], vectors[hist], vectors[int(seq[t])],
                          interactions=interactions, meets=meets)
            completion = target_text(ev, rng, explainer.config)
            if completion is None:
                counts["no_liked_evidence"] += 1
                continue
            counts["with_collaborative_fact"] += ev.co_liked is not None
            counts["with_constraint"] += bool(meets)
            examples.append((explainer.lm.chat_text(explainer.messages(item, ev)), completion))
    counts["examples"] = len(examples)
    return examples, counts


def _asked(item, rng: random.Random) -> Sequence[str]:
    """A constraint `item` meets, as if the person had asked for it (a genre it has, or a year bound)."""
    genres = [g for g in item.genres if g and g != "(no genres listed)"]
    if genres and (item.year is None or rng.random() < 0.5):
        return constraints_met(item, Filters(genres=(rng.choice(genres),)))
    if item.year is None:
        return ()
    bound = item.year + rng.randint(0, 5) if rng.random() < 0.5 else None
    return constraints_met(item, Filters(year_max=bound) if bound else Filters(year_min=item.year - rng.randint(0, 5)))


def examples_for_training(data: split.EvalData, catalog, interactions, lm, cfg, progress: bool = True,
                          ) -> tuple[list[tuple[str, str]], dict]:
    """The explanation examples of a `recllm train` run (`train.TrainConfig`: explain_examples,
    explain_cuts_per_user, min_history, seed) for `lm`, with their counts; InputError when there are none."""
    t = time.monotonic()
    vectors = split.content_matrix(data, catalog, interactions, progress=progress)
    examples, stats = build_explain_examples(
        data, catalog, train_side_interactions(interactions, data), vectors, Explainer(lm),
        n=cfg.explain_examples, cuts_per_user=cfg.explain_cuts_per_user, min_history=cfg.min_history, seed=cfg.seed)
    if not examples:
        raise InputError("No explanation examples: no train-split item had a similar liked item to name")
    stats["build_seconds"] = round(time.monotonic() - t, 1)
    print(f"recllm: {len(examples)} explanation examples", file=sys.stderr)
    return examples, stats


def explain_metadata(stats: dict) -> dict:
    """What the adapter metadata records about the explanation task (the prompt it was taught with)."""
    prompt = load_prompt("explain")
    return {"prompt": {"name": prompt.name, "sha256": prompt.sha256}, "examples": stats,
            "targets": "prompts/explain_targets.txt phrasings filled with each example's evidence (train split)",
            "loss": "next-token cross-entropy on the completion"}
