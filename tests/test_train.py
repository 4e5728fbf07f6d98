"""recllm.train: LoRA training on the tiny in-process model, adapter folder, reload, resume, metadata checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recllm import llm, train
from recllm.errors import AdapterError, InputError

N_ITEMS = 14
N_USERS = 16


class StubRetriever:
    """Deterministic stand-in for a fitted retriever: a fixed random score per item (no SASRec fit)."""

    weights = {"stub": 1.0}
    meta: dict = {}

    def __init__(self, n_items: int, seed: int = 0):
        self.item_scores = np.random.default_rng(seed).random(n_items).astype(np.float32)

    def scores_idx(self, histories):
        return np.tile(self.item_scores, (len(histories), 1))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(catalog CSV, interactions CSV): 14 items, 16 users with 9 interactions each (all survive the 5-core)."""
    folder = tmp_path_factory.mktemp("train-data")
    catalog = folder / "items.csv"
    with catalog.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres"])
        for i in range(N_ITEMS):
            w.writerow([f"m{i}", f"Movie number {i}", "Drama"])
    interactions = folder / "ratings.csv"
    rng = np.random.default_rng(0)
    with interactions.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "rating"])
        for u in range(N_USERS):
            for t, i in enumerate(rng.permutation(N_ITEMS)[:9]):
                w.writerow([f"u{u}", f"m{i}", 1000 + t, 4.0])
    return catalog, interactions


def _config(**kw) -> train.TrainConfig:
    values = dict(cuts_per_user=1, max_steps=2, batch_size=2, eval_steps=1, eval_users=4, lr=1e-2, warmup_steps=0,
                  max_history=5, title_chars=20)
    values.update(kw)
    return train.TrainConfig(**values)


def _run(tiny_data, tiny_lm, out, work, **kw):
    catalog, interactions = tiny_data
    resume, finish = kw.pop("resume", False), kw.pop("finish", False)
    return train.train(catalog, interactions, model=tiny_lm, out=out, work_dir=work, config=_config(**kw),
                       retriever=StubRetriever(N_ITEMS), resume=resume, finish=finish, progress=False)


def _letter_logits(lm):
    from recllm.rank import LLMRanker

    ranker = LLMRanker(lm)
    return ranker.score([(["Movie number 1", "Movie number 2"], ["Movie number 3", "Movie number 4", "Movie number 5"])])[0]


def test_examples_are_lettered_uniformly_and_keep_only_retrieved_targets(tiny_data, tiny_lm):
    from recllm import evaluate
    from recllm.catalog import load_catalog, load_interactions
    from recllm.rank import LLMRanker

    catalog = load_catalog(tiny_data[0])
    data = evaluate.prepare(catalog, load_interactions(tiny_data[1]))
    titles = [catalog.get(i).label for i in data.item_ids]
    ranker = LLMRanker(tiny_lm)
    cfg = train.TrainConfig(cuts_per_user=3, n_candidates=4)
    examples, stats = train.build_examples(data, StubRetriever(data.n_items).scores_idx, titles, ranker.build_prompt, cfg)
    assert 0 < len(examples) <= stats["cuts_tried"]
    assert all(0 <= label < n <= 4 for _, label, n in examples)
    assert len({label for _, label, _ in examples}) > 1  # shuffled: the answer is not always (A)
    assert all(p.endswith(ranker.build_prompt(["x"], ["y"])[-10:]) for p, _, _ in examples)


def test_two_step_training_writes_an_adapter_that_reloads_and_changes_logits(tiny_data, tiny_lm, tmp_path):
    folder = _run(tiny_data, tiny_lm, tmp_path / "adapters" / "tiny", tmp_path / "work")
    for name in (llm.ADAPTER_CONFIG, llm.ADAPTER_WEIGHTS, llm.ADAPTER_METADATA):
        assert (folder / name).is_file()
    meta = llm.read_adapter_metadata(folder)
    assert meta["base_model"] == tiny_lm.model_id
    assert meta["prompt"]["name"] == "rank" and len(meta["prompt"]["sha256"]) == 64
    assert meta["training"]["global_step"] == 2
    assert 0.0 <= meta["fusion_weight"] <= 1.0
    assert meta["rank_config"]["max_history"] == 5
    assert {"valid", "test"} <= set(meta["metrics"]) and meta["metrics"]["eval_history"]
    assert meta["hyperparameters"]["r"] == 8 and meta["seed"] == 0 and meta["default"] is False
    assert meta["training_data"]["examples"] > 0
    assert not list((tmp_path / "adapters").glob(".*tmp*"))  # written atomically, nothing left behind

    tuned = llm.apply_adapter(tiny_lm, folder)
    assert tuned.adapter_id == "tiny" and tuned.adapter_metadata["fusion_weight"] == meta["fusion_weight"]
    assert not np.allclose(_letter_logits(tuned), _letter_logits(tiny_lm), atol=1e-6)

    with pytest.raises(InputError, match="already exists"):
        _run(tiny_data, tiny_lm, folder, tmp_path / "work2")


def test_resume_continues_from_the_last_checkpoint(tiny_data, tiny_lm, tmp_path):
    work = tmp_path / "work"
    first = _run(tiny_data, tiny_lm, tmp_path / "a1", work)
    assert (work / "checkpoints" / "checkpoint-2").is_dir()
    second = _run(tiny_data, tiny_lm, tmp_path / "a2", work, resume=True, max_steps=4)
    m1, m2 = llm.read_adapter_metadata(first), llm.read_adapter_metadata(second)
    assert m1["training"]["global_step"] == 2
    assert m2["training"]["global_step"] == 4
    assert m2["training"]["resumed_from"].endswith("checkpoint-2")


def test_finish_stops_a_run_early_at_its_best_step(tiny_data, tiny_lm, tmp_path):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    _run(tiny_data, tiny_lm, tmp_path / "a1", work, max_steps=3, eval_steps=1)
    state = json.loads((work / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    finished = _run(tiny_data, tiny_lm, tmp_path / "a2", work, max_steps=50, eval_steps=1, finish=True)
    meta = llm.read_adapter_metadata(finished)
    assert meta["training"]["global_step"] == 3 and meta["training"]["stopped_early"] is True  # no step trained
    assert not (work / "checkpoints" / "checkpoint-4").exists()
    saved = load_file(str(finished / llm.ADAPTER_WEIGHTS))
    at_best = load_file(str(best / llm.ADAPTER_WEIGHTS))
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)


def test_resume_without_checkpoints_is_refused(tiny_data, tiny_lm, tmp_path):
    with pytest.raises((InputError, AdapterError), match="Nothing to resume"):
        _run(tiny_data, tiny_lm, tmp_path / "a", tmp_path / "missing", resume=True)


def test_metadata_mismatches_are_refused(tiny_data, tiny_lm, tmp_path):
    folder = _run(tiny_data, tiny_lm, tmp_path / "a", tmp_path / "work", max_steps=1, test_metrics=False)
    other_base = llm.tiny_lm(seed=1)
    with pytest.raises(AdapterError, match="base model"):
        llm.apply_adapter(other_base, folder)
    meta = json.loads((folder / llm.ADAPTER_METADATA).read_text())
    meta["prompt"]["sha256"] = "0" * 64
    (folder / llm.ADAPTER_METADATA).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="prompt"):
        llm.apply_adapter(tiny_lm, folder)
    with pytest.warns(UserWarning):
        llm.apply_adapter(tiny_lm, folder, allow_mismatch=True)


def test_config_from_args_and_unknown_keys(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--max-steps", "3", "--lr", "0.01", "--no-test"])
    cfg = train.config_from_args(args)
    assert cfg.max_steps == 3 and cfg.lr == 0.01 and cfg.test_metrics is False
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(InputError, match="learning_rate"):
        train.config_from_args(parser.parse_args(["--config", str(bad)]))


def test_an_adapter_that_learned_rich_lines_and_conversations_pins_both(tiny_data, tiny_lm, tmp_path):
    """--genres/--show-band and --dialogues: the prompt shows genres and retriever ranks, conversation examples
    (rank_chat, tune dialogues only) join the ranking examples, and the metadata pins every template learned."""
    from test_convllm import write_data

    from recllm.llm.adapters import check_adapter
    from recllm.prompts import load_prompt
    from recllm.rank import Line, LLMRanker

    dialogues, movies = write_data(tmp_path)
    folder = _run(tiny_data, tiny_lm, tmp_path / "adapters" / "rich", tmp_path / "work", genres=2, show_band=True,
                  dialogues=str(dialogues), dialogue_movies=str(movies), test_metrics=False)
    meta = llm.read_adapter_metadata(folder)
    assert meta["rank_config"]["genres"] == 2 and meta["rank_config"]["show_band"] is True
    assert meta["chat_prompt"] == {"name": "rank_chat", "sha256": load_prompt("rank_chat").sha256}
    assert meta["prompt_parts"] == [{"name": "rank_lines", "sha256": load_prompt("rank_lines").sha256}]
    assert meta["tasks"] == ["rank", "rank_chat"] and meta["conversations"]["examples"] > 0
    assert check_adapter(meta, tiny_lm.model_id) == []
    ranker = LLMRanker(llm.apply_adapter(tiny_lm, folder))
    text = ranker.build_prompt([Line("Movie number 1", ("Drama",))], [Line("Movie number 2", ("Drama",), 1)],
                               query="something sad")
    assert "Movie number 1 (Drama)" in text and "retriever #1" in text and "something sad" in text
    with pytest.raises(InputError, match="--dialogue-movies"):
        _run(tiny_data, tiny_lm, tmp_path / "adapters" / "bad", tmp_path / "work3", dialogues=str(dialogues))
