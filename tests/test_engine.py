"""The engine's contracts: how references are read, one score scale per request, typed results whose trace is
made at the edge, and no language model loaded when none is needed."""

from __future__ import annotations

import csv
import json

import pytest

from recllm.catalog import load_catalog
from recllm.cli import main
from recllm.engine import Recommender, Request

# A catalog where "300" is both an item id (Quiz Show) and the title of another film (300, 2007).
AMBIGUOUS_ROWS = [
    ("300", "Quiz Show", 1994, "Drama"),
    ("51662", "300", 2007, "Action|Fantasy|War"),
    ("6", "Heat", 1995, "Action|Crime|Thriller"),
    ("1", "Toy Story", 1995, "Adventure|Animation|Children|Comedy|Fantasy"),
    ("2571", "Matrix, The", 1999, "Action|Sci-Fi|Thriller"),
    ("1721", "Titanic", 1997, "Drama|Romance"),
    ("260", "Star Wars: Episode IV - A New Hope", 1977, "Action|Adventure|Sci-Fi"),
    ("356", "Forrest Gump", 1994, "Comedy|Drama|Romance|War"),
]


@pytest.fixture
def ambiguous_catalog(tmp_path):
    path = tmp_path / "ambiguous.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "year", "genres"])
        writer.writerows(AMBIGUOUS_ROWS)
    return path


def test_a_bare_number_is_a_title_first_and_id_colon_is_an_id():
    catalog = load_catalog()
    found = catalog.lookup("300")
    assert (found.item_id, found.read_as) == ("51662", "title")  # the film 300 (2007), not Quiz Show (id 300)
    assert found.other.startswith("id:300 ")
    assert catalog.lookup("id:300").item_id == "300"
    assert catalog.lookup("1").item_id == "1"  # no film is called "1": the item id
    assert catalog.lookup("id:no-such-id").item_id is None
    ids, unknown, ambiguous = catalog.lookup_many(["300", "Heat", "id:1", "nothing like this at all"])
    assert ids == ["51662", "6", "1"] and unknown == ["nothing like this at all"]
    assert [a.ref for a in ambiguous] == ["300"]


def test_history_300_is_the_film_and_the_trace_says_how_it_was_read(ambiguous_catalog):
    rec = Recommender(ambiguous_catalog, ranker="none", progress=False)
    result = rec.recommend(history=["300"], k=3, explain=0)
    assert result.history == ["51662"]
    trace = result.trace
    assert trace["history"][0]["title"] == "300 (2007)"
    assert trace["ambiguous"] == [{"ref": "300", "item_id": "51662", "read_as": "title",
                                   "other": "id:300 (Quiz Show (1994))"}]
    assert rec.recommend(history=["id:300"], k=3, explain=0).history == ["300"]


def test_cli_history_and_why_read_references_the_same_way(capsys, ambiguous_catalog):
    code = main(["recommend", "--history", "300", "-k", "3", "--json", "--trace", "--catalog", str(ambiguous_catalog)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [h["item_id"] for h in json.loads(out)["trace"]["history"]] == ["51662"]
    assert "'300' read as the title 300 (2007)" in err and "id:300" in err
    code = main(["why", "300", "--history", "Heat", "-k", "3", "--catalog", str(ambiguous_catalog)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("300 (2007)")  # the film, not Quiz Show
    code = main(["why", "id:300", "--history", "Heat", "-k", "3", "--catalog", str(ambiguous_catalog)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("Quiz Show (1994)")


def _scores(result):
    return [r.score for r in result.recommendations]


def test_scores_are_one_scale_that_falls_with_rank(monkeypatch, indexed_home, small_catalog_files, tiny_lm):
    """k past the 20 the model ranks, retriever order, a query with no history: scores always fall with rank."""
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    catalog, interactions = small_catalog_files
    rec = Recommender(catalog, interactions, lm=tiny_lm, progress=False)
    ranked = rec.recommend(user="1", k=30, explain=0)
    assert ranked.ranker["model"] and len(ranked.prompt_order) == 20
    plain = Recommender(catalog, interactions, ranker="none", progress=False)
    for result in (ranked, plain.recommend(user="1", k=30, explain=0),
                   rec.recommend(query="a funny animated movie", k=30, explain=0)):
        scores = _scores(result)
        assert len(scores) == 30
        assert all(a > b for a, b in zip(scores, scores[1:])), scores
        assert [r.rank for r in result.recommendations] == list(range(1, 31))


def test_result_is_typed_and_the_trace_is_made_from_it(monkeypatch, indexed_home, small_catalog_files, tiny_lm):
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    catalog, interactions = small_catalog_files
    rec = Recommender(catalog, interactions, lm=tiny_lm, progress=False)
    result = rec.recommend(Request(history=["Toy Story", "Heat"], k=5, explain=2))
    assert result.history == ["1", "6"]
    assert [r.reason is not None for r in result.recommendations] == [True, True, False, False, False]
    trace = result.trace
    assert [r["explanation"]["text"] for r in trace["recommendations"][:2]] == \
           [r.explanation for r in result.recommendations[:2]]
    assert trace["recommendations"][2]["explanation"] == ""
    trace["history"].clear()  # the trace is a view made at the edge: changing it changes nothing
    assert result.history == ["1", "6"] and len(result.trace["history"]) == 2
    json.dumps(result.to_dict(trace=True), default=str)


def test_the_ranker_reads_the_users_words_next_to_the_history(monkeypatch, indexed_home, small_catalog_files,
                                                               tiny_lm):
    """With a history and a query, the base model's rank prompt carries the query (rank_chat); the trace says so."""
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    catalog, interactions = small_catalog_files
    rec = Recommender(catalog, interactions, lm=tiny_lm, progress=False)
    seen = []
    build = rec.ranker.build_prompt
    monkeypatch.setattr(rec.ranker, "build_prompt", lambda *a, **k: seen.append(build(*a, **k)) or seen[-1])
    said = rec.recommend(Request(history=["Toy Story", "Heat"], query="something funny", k=5, explain=0))
    assert said.ranker["read_query"] is True and 'The user said: "something funny"' in seen[-1]
    quiet = rec.recommend(Request(history=["Toy Story", "Heat"], k=5, explain=0))
    assert quiet.ranker["read_query"] is False and "The user said" not in seen[-1]
    assert {r.item_id for r in said.recommendations} <= set(rec.catalog.items)


def test_no_history_and_no_explanations_never_load_the_model(monkeypatch, indexed_home, small_catalog_files):
    """A query with no history keeps retriever order and explains from evidence alone; `explain=0` with
    ranker none needs no model either: the language model is never loaded."""
    from recllm import llm

    def refuse(*args, **kwargs):
        raise AssertionError("the language model was loaded")

    monkeypatch.setattr(llm, "load_model", refuse)
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    catalog, interactions = small_catalog_files
    rec = Recommender(catalog, interactions, progress=False)  # ranker llm, model not loaded yet
    result = rec.recommend(query="space adventure", k=5, explain=3)
    assert result.recommendations[0].explanation and result.ranker["model"] is None
    assert rec.describe()["model"] == "not loaded yet"
    assert rec.why("#1", result).startswith(result.recommendations[0].title)
