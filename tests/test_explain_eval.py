"""`recllm eval-explanations` (recllm.explain_eval): the measures on hand-made explanations, and the command on
the tiny in-process model writing report.json and report.md."""

from __future__ import annotations

import json

import pytest

from recllm.catalog import Item
from recllm.explain import Evidence, Explanation
from recllm.explain_eval import distinct_2, judge, names_attribute, summarize

HEAT = Item("6", "Heat", 1995, ("Action", "Crime", "Thriller"), ("heist", "Al Pacino"))
EV = Evidence("6", (("1", "Ronin", 0.9), ("2", "The Matrix", 0.7)), ("Action", "Crime"),
              co_liked=("3", "Casino", 9))


def judged(text: str, source: str = "llm", item: Item = HEAT, seconds: float = 0.5):
    return judge("u", item, Explanation(text, source, EV), seconds)


@pytest.mark.parametrize("text, liked, evidence, filler", [
    ("You may enjoy Heat because you liked Ronin.", True, True, False),
    ("You may enjoy Heat because, like Matrix, it is tense.", True, True, False),  # without its article
    ("9 people who liked Casino also liked Heat.", True, True, False),  # the collaborative fact's item
    ("You may enjoy Heat because it is a tense crime story.", False, True, False),  # a shared genre
    ("You may enjoy Heat because it is a suspenseful heist.", False, False, False),  # its genre words / tags
    ("You may enjoy Heat because it is a film from the 1990s.", False, False, False),  # its decade
    ("You may enjoy Heat because it has captivated audiences worldwide.", False, False, True),
    ("You may enjoy Heat because it is great.", False, False, True),
])
def test_what_an_explanation_names(text, liked, evidence, filler):
    j = judged(text)
    assert (j.names_liked, j.names_evidence, j.filler) == (liked, evidence, filler)


def test_attributes_are_the_items_own_and_its_title_does_not_count():
    assert names_attribute("A gripping thriller.", HEAT) and names_attribute("Al Pacino at his best.", HEAT)
    assert not names_attribute("A scary horror film.", HEAT)  # genres it lacks are no attribute of it
    assert not names_attribute("Heat is great.", Item("9", "Action Jackson", 1988, ("Comedy",)))
    assert not names_attribute("Action Jackson is great.", Item("9", "Action Jackson", 1988, ("Action",)))
    assert names_attribute("A 1988 film.", Item("9", "Action Jackson", 1988, ("Action",)))


def test_contradictions_praise_cut_off_and_the_summary():
    rows = [judged("You may enjoy Heat because you liked Ronin."),
            judged("You may enjoy Heat because it is a classic horror movie.", seconds=1.5),
            judged("It has the Action of Ronin, which you liked.", source="fallback"),
            judged("You may enjoy Heat, an acclaimed film that How I Learned to Stop Worrying and Lo...")]
    assert rows[1].contradiction == ["horror", "classic"] and rows[3].praise == ["acclaimed"] and rows[3].cut_off
    s = summarize(rows, users=2, errors=1, seconds=4.0, per_user=[1.0, 3.0])
    assert s["names_liked"] == 0.5 and s["names_evidence"] == 0.5 and s["contradiction"] == 0.25
    assert s["praise"] == 0.25 and s["fallback"] == 0.25 and s["cut_off"] == 0.25 and s["filler"] == 0.5
    assert s["explanations"] == 4 and s["users"] == 2 and s["errors"] == 1
    assert s["seconds_per_explanation"] == 1.0 and s["seconds_per_explanation_median"] == 2.0
    assert s["mean_words"] == sum(len(r.text.split()) for r in rows) / 4
    assert distinct_2(["a b c", "a b d"]) == 3 / 4 and distinct_2([]) == 0.0


def test_the_command_writes_both_reports_on_the_tiny_model(tmp_path, monkeypatch, capsys, tiny_lm, indexed_home,
                                                           small_catalog_files):
    from recllm.cli import main

    folder = tmp_path / "tiny-model"
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    catalog, interactions = small_catalog_files
    out = tmp_path / "report"
    code = main(["eval-explanations", "--users", "3", "--k", "2", "--seed", "1", "--ranker", "llm", "--model",
                 str(folder), "--adapter", "none", "--catalog", str(catalog), "--interactions", str(interactions),
                 "--out", str(out), "-q"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["users"] == 3 and summary["explanations"] + 2 * summary["errors"] == 6
    assert len(report["explanations"]) == summary["explanations"] and summary["seconds_per_explanation"] > 0
    assert report["settings"]["k"] == 2 and report["settings"]["seed"] == 1 and report["settings"]["users"] == 3
    assert str(folder) in report["system"] and report["command"]
    assert all(0.0 <= summary[m] <= 1.0 for m in ("names_liked", "names_evidence", "filler", "fallback"))
    markdown = (out / "report.md").read_text()
    assert markdown == printed.rstrip("\n") + "\n" or markdown.strip() == printed.strip()
    assert "| filler (no evidence, no attribute of the item) |" in markdown


def test_bad_options_are_one_line_errors(capsys):
    from recllm.cli import main

    with pytest.raises(SystemExit):
        main(["eval-explanations", "--users", "0"])
    assert "not positive" in capsys.readouterr().err
