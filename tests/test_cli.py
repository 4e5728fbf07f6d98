"""`recllm` command line: index, recommend, items search, and one-line errors (exit 1) for bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recllm.catalog import load_catalog
from recllm.cli import main, parse_years
from recllm.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def indexed(monkeypatch, indexed_home, small_catalog_files):
    """RECLLM_HOME pointing at the already indexed small catalog; returns (catalog path, interactions path)."""
    monkeypatch.setenv("RECLLM_HOME", str(indexed_home))
    return small_catalog_files


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert "Traceback" not in err


def test_recommend_history_json(capsys, indexed):
    catalog_path, _ = indexed
    code, out, err = run(capsys, "recommend", "--history", "Toy Story|Heat (1995)|Not A Real Film Xyz", "-k", "5",
                         "--json", "--catalog", catalog_path)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 5 and all({"item_id", "title", "score"} <= set(r) for r in rows)
    assert not {"1", "6"} & {r["item_id"] for r in rows}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert "Not A Real Film Xyz" in err and "skipped" in err  # reported on stderr, not stdout


def test_recommend_user_text_output_with_filters(capsys, indexed):
    catalog_path, interactions_path = indexed
    code, out, err = run(capsys, "recommend", "--user", "1", "-k", "4", "--genre", "Comedy", "--years", "1990-1999",
                         "--catalog", catalog_path, "--interactions", interactions_path)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("    ")]  # items, not reasons
    assert len(lines) == 4 and lines[0].startswith(" 1. ")
    assert len([line for line in out.splitlines() if line.startswith("    ")]) == 3  # top 3 explained
    catalog = load_catalog(catalog_path)
    for line in lines:
        item = catalog.get(line.rsplit("[id ", 1)[1].split(",")[0])
        assert "Comedy" in item.genres and 1990 <= item.year <= 1999


def test_recommend_user_excludes_history(capsys, indexed):
    from recllm.catalog import load_interactions

    catalog_path, interactions_path = indexed
    code, out, _ = run(capsys, "recommend", "--user", "1", "-k", "30", "--json", "--catalog", catalog_path,
                       "--interactions", interactions_path)
    assert code == 0
    seen = set(load_interactions(interactions_path).history("1"))
    assert not seen & {r["item_id"] for r in json.loads(out)}


def test_items_search(capsys, indexed):
    code, out, err = run(capsys, "items", "search", "animated toys come to life", "-k", "3", "--json",
                         "--catalog", indexed[0])
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3 and "1" in [r["item_id"] for r in rows]


def test_index_is_incremental_and_recommend_auto_indexes(capsys, tmp_path, small_catalog_files):
    """A fresh home: `recommend` indexes first (note on stderr); `index` afterwards has nothing to do."""
    code, out, err = run(capsys, "recommend", "--history", "Heat", "-k", "2", "--catalog", small_catalog_files[0], "-q",
                         "--explain", "0")
    assert code == 0, err
    assert "indexing it first" in err and len(out.strip().splitlines()) == 2
    code, out, err = run(capsys, "index", "--catalog", small_catalog_files[0], "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["embedded"] == 0 and stats["unchanged"] == stats["total"] == len(load_catalog(small_catalog_files[0]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recommend", "--user", "no-such-user"], "unknown user 'no-such-user'"),
        (["recommend", "--history", "Qwxz Not A Film|Zzyzx Nothing"], "none of the history items"),
        (["recommend", "--history", "Heat", "--years", "199x"], "bad --years '199x'"),
        (["recommend", "--history", "Heat", "--years", "2000-1990"], "2000 is after 1990"),
        (["recommend", "--history", "Heat", "--genre", "Polka"], "unknown genre 'Polka'"),
        (["items", "search", "  "], "empty search text"),
    ],
)
def test_bad_input_is_one_line_exit_1(capsys, indexed, argv, message):
    catalog_path, interactions_path = indexed
    extra = ["--catalog", catalog_path] + (["--interactions", interactions_path] if argv[0] == "recommend" else [])
    code, out, err = run(capsys, *argv, *extra)
    assert_one_line_error(code, err, message)
    assert out == ""


def test_bad_catalog_is_a_catalog_error_and_writes_nothing(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,title\n1,Alpha\n1,Beta\n3,\n")
    code, _, err = run(capsys, "index", "--catalog", bad)
    assert_one_line_error(code, err, str(bad))
    assert "duplicate item_id" in err
    assert not (Path(os.environ["RECLLM_HOME"]) / "chroma").exists()  # validated before anything is written
    code, _, err = run(capsys, "recommend", "--history", "Alpha", "--catalog", tmp_path / "missing.csv")
    assert_one_line_error(code, err, "no such file")


def test_unreachable_chroma_server(capsys, small_catalog_files):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run(capsys, "index", "--catalog", small_catalog_files[0], "--chroma-url", f"http://127.0.0.1:{port}")
    assert_one_line_error(code, err, "cannot reach the Chroma server")


def test_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, small_catalog_files):
    import recllm.embed

    class Interrupted:
        model_id, dim = "interrupted-embedder", 4

        def encode(self, texts, batch_size=64, progress=True):
            raise KeyboardInterrupt

    monkeypatch.setattr(recllm.embed, "get_embedder", lambda *a, **k: Interrupted())
    code, out, err = run(capsys, "index", "--catalog", small_catalog_files[0], "-q")
    assert code == 130 and err.strip() == "error: interrupted" and out == ""


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["recommend", "-k", "3"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["recommend", "--user", "1", "--history", "Heat"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["recommend", "--user", "1", "-k", "0"])
    assert info.value.code == 2


@pytest.mark.parametrize("text, expected", [("1990-1999", (1990, 1999)), ("1995", (1995, 1995)),
                                            ("1990-", (1990, None)), ("-1999", (None, 1999)), (" 1990 - 1999 ", (1990, 1999)),
                                            (None, (None, None))])
def test_parse_years(text, expected):
    assert parse_years(text) == expected


@pytest.mark.parametrize("text", ["", "-", "90-99", "1990-1999-2000", "19901999", "abc", "1990 1999"])
def test_parse_years_rejects(text):
    with pytest.raises(InputError):
        parse_years(text)


def test_python_dash_m_entry_point(indexed):
    """The real process: results on stdout, an error as one line on stderr with exit 1."""
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "recllm", "recommend", "--history", "Heat", "-k", "2", "--json",
                         "--catalog", str(indexed[0])], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 2
    bad = subprocess.run([sys.executable, "-m", "recllm", "recommend", "--user", "nobody", "--catalog", str(indexed[0]),
                          "--interactions", str(indexed[1])], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown user") and "Traceback" not in bad.stderr


def test_why_answers_for_recommended_and_not_recommended(capsys, indexed):
    catalog_path, interactions_path = indexed
    common = ["--user", "1", "-k", "3", "--catalog", catalog_path, "--interactions", interactions_path]
    code, out, err = run(capsys, "recommend", *common, "--json")
    assert code == 0, err
    top = json.loads(out)[0]
    code, out, err = run(capsys, "why", "#1", *common)
    assert code == 0, err
    assert top["title"] in out and "#1" in out and "which you liked" in out
    code, out, err = run(capsys, "why", "Toy Story", *common)  # in user 1's history: never recommended
    assert code == 0, err
    assert "Toy Story" in out and "#1" not in out
    code, out, err = run(capsys, "why", "#9", *common)
    assert_one_line_error(code, err, "there is no #9")


@pytest.mark.slow
def test_recommend_with_the_real_default_model_and_trace(capsys, indexed):
    """The default path: the packaged SmolLM2 ranks the candidates; the trace names model and prompt."""
    catalog_path, interactions_path = indexed
    code, out, err = run(capsys, "recommend", "--user", "1", "-k", "5", "--ranker", "llm", "--adapter", "none",
                         "--explain", "1", "--json", "--trace", "--catalog", catalog_path,
                         "--interactions", interactions_path)
    assert code == 0, err
    result = json.loads(out)
    trace = result["trace"]
    candidate_ids = [c["item_id"] for c in trace["candidates"]]
    recs = result["recommendations"]
    assert len(recs) == 5 and all(r["item_id"] in candidate_ids for r in recs)
    assert not {r["item_id"] for r in recs} & {h["item_id"] for h in trace["history"]}
    assert trace["ranker"]["model"] and trace["ranker"]["prompt_sha256"]
    assert recs[0]["explanation"]


def test_eval_baselines_on_the_bundled_data(capsys, tmp_path):
    """`recllm eval` on the LlamaRec protocol: the cheap baselines, all 610 users, with report files."""
    code, out, err = run(capsys, "eval", "--systems", "popularity", "transition", "--json", "-q",
                         "--out", tmp_path / "report")
    assert code == 0, err
    report = json.loads(out)
    text = json.dumps(report)
    assert "popularity" in text and "transition" in text and "610" in text
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.json", "report.md", "report.png"}
    code, _, err = run(capsys, "eval", "--catalog", tmp_path / "x.csv")
    assert_one_line_error(code, err, "needs --interactions")


def test_only_serve_passes_unknown_options_on():
    with pytest.raises(SystemExit) as info:
        main(["index", "--bogus-option"])
    assert info.value.code == 2
