"""The LLM reads the conversation: dialogue ranking examples and the `eval-conversations --llm` row (tiny LM)."""

from __future__ import annotations

import json

import pytest

from recllm import conversations as cv
from recllm import convllm
from test_conversations import TITLES, dialogue_json, title_only


def write_data(tmp_path, n: int = 30):
    """movies.csv and `n` dialogues whose seeker names the dialogue ("d7"), so a prompt tells where it came from;
    "1" is followed by "2" then "3", "4" by "5" then "7"."""
    movies = tmp_path / "movies.csv"
    movies.write_text("movieId,movieName\n" + "".join(f"{i},{t}\n" for i, t in TITLES.items()))
    lines = []
    for d in range(n):
        a, b, c = ("1", "2", "3") if d % 2 else ("4", "5", "7")
        lines.append(json.dumps(dialogue_json(f"d{d}", [(1, f"I loved @{a}, says d{d}"), (2, f"then try @{b}"),
                                                        (1, f"seen it d{d}"), (2, f"or @{c}")], {})))
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("\n".join(lines) + "\n")
    return dialogues, movies


def asked_by(query: str) -> str:
    return next(w for w in query.replace(",", " ").split() if w.startswith("d") and w[1:].isdigit())


def test_dialogue_examples_come_from_the_tune_half_and_point_at_the_true_movie(tmp_path):
    dialogues, movies = write_data(tmp_path)
    tune, held = cv.split_ids(cv.read_dialogues(dialogues))
    targets = {(p.dialogue, frozenset(p.mentioned)): p.targets for d in tune for p in cv.eval_points(d)}
    label_of = {i.label: i.item_id for i in title_only()}
    prompts = []

    def build_prompt(history, candidates, query):
        prompts.append((history, candidates, query))
        return f"prompt {len(prompts) - 1}"

    examples, stats = convllm.dialogue_examples(dialogues, movies, build_prompt, seed=3, progress=False)
    assert stats["points"] == 2 * len(tune) and stats["pairs"] == 2 * len(tune)
    assert stats["target_in_top20"] == 1.0 and stats["examples"] == len(examples) == stats["pairs"]
    held_ids = {d.id for d in held}
    letters = set()
    for prompt, label, n in examples:
        history, candidates, query = prompts[int(prompt.split()[1])]
        dialogue = asked_by(query)
        assert dialogue not in held_ids  # never a held-out dialogue
        seen = frozenset(label_of[h.title] for h in history)
        assert n == len(candidates) and label_of[candidates[label].title] in targets[(dialogue, seen)]
        assert not seen & {label_of[c.title] for c in candidates}  # mentioned movies are not candidates
        letters.add(label)
    assert len(letters) > 2  # shuffled: the answer is not always on one letter
    few, _ = convllm.dialogue_examples(dialogues, movies, lambda h, c, q: "p", max_examples=5, progress=False)
    assert len(few) == 5


def test_llm_request_leaves_dislikes_out_and_keeps_the_ranking_order():
    from recllm.convrank import Reading

    cat = title_only()
    reading = Reading([("1", 1.0), ("4", 0.1), ("3", 0.5)], ["1", "4", "3"], disliked=["4"], query="more like it")
    history, candidates, query = convllm.llm_request(reading, cat, ["2", "5"])
    assert [h.title for h in history] == ["Super Troopers (2001)", "The Matrix (1999)"]
    assert [(c.title, c.band) for c in candidates] == [("Police Academy (1984)", 1), ("Toy Story (1995)", 2)]
    assert query == "more like it"


@pytest.fixture
def tiny_base(monkeypatch, tiny_lm):
    """`--llm base` loads the tiny LM (the real tokenizer) instead of SmolLM2."""
    from recllm import llm

    def load_model(model=None, adapter=None, allow_mismatch=False):
        assert model is None and adapter is None
        return tiny_lm

    monkeypatch.setattr(llm, "load_model", load_model)
    return tiny_lm


def test_eval_conversations_llm_row(tmp_path, capsys, monkeypatch, tiny_base):
    from recllm.cli import main
    from recllm.rank import LLMRanker
    from recllm.fusion import FUSION_GRID

    dialogues, movies = write_data(tmp_path, 40)
    tune, held = cv.split_ids(cv.read_dialogues(dialogues))
    labels = {i.label for i in title_only()}
    asked, chosen_on = [], []
    score = LLMRanker.score

    def spy_score(self, requests, deadline=None):
        for history, candidates, query in requests:
            assert {c.title for c in candidates} <= labels and len(candidates) <= 20  # catalog items only
            assert not {h.title for h in history} & {c.title for c in candidates}
            asked.append(asked_by(query))
        return score(self, requests, deadline)

    choose = convllm.choose_weight

    def spy_choose(scored, probe, grid=None):
        chosen_on.extend(p.dialogue for p in scored.points)
        return choose(scored, probe, grid)

    monkeypatch.setattr(LLMRanker, "score", spy_score)
    monkeypatch.setattr(convllm, "choose_weight", spy_choose)
    assert main(["eval-conversations", str(dialogues), "--llm", "base", "--llm-users", "6", "--json", "-q",
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["systems"]["all knowledge + LLM"]
    tune_ids, held_ids = {d.id for d in tune}, {d.id for d in held}
    assert chosen_on and set(chosen_on) <= tune_ids  # the weight is chosen on the tune half only
    assert len(set(chosen_on)) == 6 and row["tune_points"] == 12
    assert row["weights"]["llm"] in FUSION_GRID and row["base"] == "all knowledge"
    assert set(asked) - tune_ids <= held_ids and len(set(asked) - tune_ids) == 6  # then 6 held-out dialogues
    strict = row["strict"]
    assert strict["points"] == 12 and strict["pairs"] == 12 and strict["errors"] == 0
    assert strict["query_shown"] == 12  # the base model reads the seeker's words
    assert strict["recall@50"]["mean"] == 1.0  # 8 movies: every target stays in the top 50
    assert {"vs_floor", "vs_base", "all knowledge (same pairs)", "llm_alone"} <= set(strict)
    assert strict["seconds_per_point"] > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## all knowledge + LLM" in md and "fusion weight" in md


def test_weight_zero_keeps_the_system_order(tmp_path, tiny_base):
    """With w = 0 the fused top 20 is the system's own order: the LLM row reproduces the system's ranks."""
    from recllm import conversation_eval as ce
    from recllm.convrank import target_ranks
    from recllm.rank import LLMRanker

    dialogues, movies = write_data(tmp_path, 20)
    t = ce.prepare(dialogues, movies, systems=["all knowledge"], progress=False)
    _, weights, _ = t.weights(t.systems["all knowledge"])
    scores = t.probe.scores({k: t.signals[k] for k in t.systems["all knowledge"]}, weights)
    scored = convllm.Scored(LLMRanker(tiny_base, catalog=t.probe.catalog), t, t.points, scores)
    pos = [[t.probe.pos[i] for i in p.targets] for p in t.points]
    exc = [[t.probe.pos[i] for i in p.mentioned] for p in t.points]
    expected = [r for row in target_ranks(scores, pos, exc) for r in row]
    assert list(scored.ranks(t.probe, 0.0)) == expected
    assert scored.shown == len(t.points)


def test_bad_llm_adapter_is_a_one_line_error(tmp_path, capsys):
    from recllm.cli import main

    dialogues, _ = write_data(tmp_path, 4)
    assert main(["eval-conversations", str(dialogues), "--llm", "no-such-adapter", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Adapter not found: no-such-adapter") and "\n" not in err
    assert main(["eval-conversations", str(dialogues), "--llm-users", "3", "-q"]) == 1
    assert "--llm-users needs --llm" in capsys.readouterr().err
