"""recllm.explain_train + the explanation task of `recllm train`: examples from the train split only, targets
that are true and cite the evidence in varied words, and one adapter that learns both tasks."""

from __future__ import annotations

import random

import numpy as np

from recllm import llm, split
from recllm.catalog import load_catalog, load_interactions
from recllm.explain import Evidence, Explainer
from recllm.explain_train import build_explain_examples, target_text, train_side_interactions
from recllm.prompts import load_prompt
from tests.test_train import _run, tiny_data  # noqa: F401 - fixture


def test_targets_name_the_evidence_and_vary():
    ev = Evidence("9", (("1", "Heat", 0.9), ("2", "Ronin", 0.8)), ("Crime", "Thriller"), ("3", "Casino", 41), "1990s",
                  ("a Crime title, as you asked",))
    rng = random.Random(0)
    texts = {target_text(ev, rng) for _ in range(60)}
    assert len(texts) >= 6  # several phrasings, not one template
    for text in texts:
        assert text.startswith(" ") and text.rstrip().endswith(".")
        assert "Heat" in text or "Casino" in text  # always names one of the user's own items
        assert "41" in text or "Casino" not in text  # the collaborative fact comes with its count
    assert any("41 people who liked Casino" in t for t in texts) and any("as you asked" in t for t in texts)
    assert target_text(Evidence("9", (), ("Crime",)), rng) is None  # nothing of the user's to name: no example


def test_examples_come_from_the_train_split_only(tiny_data, tiny_lm):  # noqa: F811
    catalog = load_catalog(tiny_data[0])
    interactions = load_interactions(tiny_data[1])
    data = split.prepare(catalog, interactions)
    train_side = train_side_interactions(interactions, data)
    held = {(u, data.item_ids[int(d[i])]) for d in (data.valid, data.test) for i, u in enumerate(data.user_ids)}
    assert len(train_side) == len(interactions) - len(held)
    assert not held & {(r[0], r[1]) for r in train_side.rows}
    vectors = np.random.default_rng(0).random((data.n_items, 8)).astype(np.float32)
    explainer = Explainer(tiny_lm)
    examples, stats = build_explain_examples(data, catalog, train_side, vectors, explainer, n=10, seed=1)
    assert len(examples) == stats["examples"] == 10
    prefix = load_prompt("explain").messages(item="x", era="-", liked="-", shared="-", co="-", meets="-")[-1]["content"]
    for prompt, completion in examples:
        assert prompt.endswith(prefix.replace("x", prompt.rsplit("You may enjoy ", 1)[1].split(" because")[0]))
        named = prompt.split("Titles the user liked that it is like: ", 1)[1].split("\n", 1)[0]
        assert any(t.strip() in completion for t in named.replace(" and ", ",").split(",")) or "people who" in completion


def test_one_adapter_learns_both_tasks(tiny_data, tiny_lm, tmp_path):  # noqa: F811
    first = _run(tiny_data, tiny_lm, tmp_path / "a" / "rank", tmp_path / "w1", max_steps=1, test_metrics=False)
    folder = _run(tiny_data, tiny_lm, tmp_path / "a" / "both", tmp_path / "w2", max_steps=4, explain_examples=6,
                  init_adapter=str(first), test_metrics=False, eval_steps=2)
    meta = llm.read_adapter_metadata(folder)
    assert meta["tasks"] == ["rank", "explain"]
    assert meta["explain"]["examples"]["examples"] == 6
    assert meta["explain"]["prompt"]["sha256"] == load_prompt("explain").sha256
    assert meta["training"]["global_step"] == 4
    from safetensors.torch import load_file

    before, after = (load_file(str(f / llm.ADAPTER_WEIGHTS)) for f in (first, folder))
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)
