"""Catalog and interactions loading: the bundled MovieLens, generic CSV/JSONL, and a table of bad files."""

import json

import pytest

from recllm.catalog import Item, clean_text, load_catalog, load_interactions, normalize_title
from recllm.errors import CatalogError, UnknownItem, UnknownUser


def test_bundled_movielens_loads():
    catalog = load_catalog()
    assert catalog.name == "ml-latest-small"
    assert len(catalog) == 9742
    toy = catalog.get("1")
    assert (toy.title, toy.year) == ("Toy Story", 1995)
    assert "Animation" in toy.genres and "pixar" in toy.tags
    assert catalog.get("11").title == "The American President"  # trailing article moved to the front
    assert "Toy Story (1995)" in toy.text and "pixar" in toy.text


def test_bundled_interactions():
    interactions = load_interactions()
    assert len(interactions) == 100836
    assert len(interactions.users) == 610
    seq = interactions.sequences()["1"]
    assert [ts for _, ts in seq] == sorted(ts for _, ts in seq)
    with pytest.raises(UnknownUser, match="unknown user"):
        interactions.history("no-such-user")


@pytest.mark.parametrize(
    "ref, expected",
    [("Heat", "6"), ("heat (1995)", "6"), ("1", "1"), ("toy story", "1"), ("Toy Stroy", "1"),
     ("The Matrix", "2571"), ("matrix", "2571"), ("Amelie", "4973"), ("qwertyuiop zxcv", None), ("", None)],
)
def test_resolve_titles(ref, expected):
    assert load_catalog().resolve(ref) == expected


def test_resolve_many_reports_unknown_and_drops_duplicates():
    ids, unknown = load_catalog().resolve_many(["Heat", "heat", "nonexistent film xyz", "1"])
    assert ids == ["6", "1"] and unknown == ["nonexistent film xyz"]


def test_generic_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "books.csv"
    csv_path.write_text("item_id,title,genres,year,author,pages\nb1,Dune,SciFi|Classic,1965,Herbert,412\nb2,Emma,,1815,Austen,\n")
    catalog = load_catalog(csv_path)
    assert [i.item_id for i in catalog] == ["b1", "b2"]
    dune = catalog.get("b1")
    assert dune.genres == ("SciFi", "Classic") and dune.year == 1965
    assert dune.extra == {"author": "Herbert", "pages": 412}
    assert dune.metadata()["author"] == "Herbert"
    catalog.check_filter_columns(["author", "year"])
    with pytest.raises(CatalogError, match="no column publisher"):
        catalog.check_filter_columns(["publisher"])
    with pytest.raises(UnknownItem):
        catalog.get("b9")

    jsonl = tmp_path / "books.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"item_id": 7, "title": "Ulysses", "tags": ["long", "dublin"]}]))
    assert load_catalog(jsonl).get("7").tags == ("long", "dublin")


BAD_CATALOGS = [
    ("dup.csv", b"item_id,title\n1,A\n2,B\n1,C\n2,D\n", r"duplicate item_id at rows 4, 5"),
    ("notitle.csv", b"item_id,title\n1,A\n2,\n", r"missing title at row 3"),
    ("noid.csv", b"item_id,title\n,A\n", r"missing item_id at row 2"),
    ("bytes.csv", b"item_id,title\n1,A\n2,\xff\xfe bad\n", r"undecodable bytes .* row 3"),
    ("empty.csv", b"", r"empty"),
    ("header.csv", b"item_id,title\n", r"no rows"),
    ("cols.csv", b"id,name\n1,A\n", r"missing column item_id, title"),
    ("year.csv", b"item_id,title,year\n1,A,nineteen\n", r"year is not a number at row 2"),
    ("wide.csv", b"item_id,title\n1,A,extra\n", r"more fields than the header names at row 2"),
    ("bad.jsonl", b'{"item_id": "1", "title": "A"}\n{broken\n[1]\n', r"invalid JSON at row 2; not a JSON object at row 3"),
]


@pytest.mark.parametrize("name, content, message", BAD_CATALOGS, ids=[b[0] for b in BAD_CATALOGS])
def test_bad_catalogs_name_file_and_rows(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "nope.csv")
    with pytest.raises(CatalogError, match="without movies.csv"):
        load_catalog(tmp_path)


BAD_INTERACTIONS = [
    (b"user_id,item_id\n1,2\n", r"missing column timestamp"),
    (b"user_id,item_id,timestamp\n1,2,yesterday\n", r"timestamp is not a number or ISO date at row 2"),
    (b"user_id,item_id,timestamp,rating\n1,2,3,good\n", r"rating is not a number at row 2"),
    (b"user_id,item_id,timestamp\n,2,3\n", r"missing user_id or item_id at row 2"),
]


@pytest.mark.parametrize("content, message", BAD_INTERACTIONS)
def test_bad_interactions(tmp_path, content, message):
    path = tmp_path / "events.csv"
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        load_interactions(path)


def test_interactions_ties_break_by_row_order_and_iso_dates(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu,b,5\nu,a,5\nu,c,1\nv,x,2024-01-02T00:00:00Z\n")
    interactions = load_interactions(path)
    assert interactions.history("u") == ["c", "b", "a"]
    assert interactions.history("v") == ["x"]


def test_hostile_text_is_cleaned(tmp_path):
    path = tmp_path / "evil.csv"
    long = "x" * 5000
    path.write_text(f'item_id,title,description\n1,"Bad\x1b[31m\u202eTitle\nnext",{long}\n')
    item = load_catalog(path).get("1")
    assert item.title == "Bad [31m Title next"
    assert len(item.description) <= 2000
    assert clean_text("a\x00b") == "a b"
    assert normalize_title("Amélie!") == "amelie"


def test_content_hash_tracks_content():
    a = Item("1", "A", genres=("X",))
    assert a.content_hash == Item("1", "A", genres=("X",)).content_hash
    assert a.content_hash != Item("1", "A", genres=("Y",)).content_hash
