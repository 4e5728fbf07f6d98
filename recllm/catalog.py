"""Catalog and interactions: loading, validation and title resolution.

A catalog is CSV or JSONL with `item_id,title` and any of `description,genres,tags,year,...`; other
columns are kept as `Item.extra` (usable as filters). A folder holding MovieLens files (`movies.csv`, with
optional `tags.csv`) loads as MovieLens. Interactions are CSV with `user_id,item_id,timestamp[,rating]`
(MovieLens' `ratings.csv` with `userId,movieId,rating,timestamp` loads too).
Every problem found becomes one `CatalogError` naming the file and the rows; nothing is returned half-read.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

from recllm import paths
from recllm.errors import CatalogError, UnknownItem, UnknownUser
from recllm.titles import normalize_title, title_keys  # noqa: F401 - normalize_title: re-exported

KNOWN_COLUMNS = ("item_id", "title", "description", "genres", "tags", "year")
MAX_TEXT = 2000  # characters kept of any one text field; longer text is cut
MAX_ROWS_NAMED = 8  # row numbers named per problem in an error message
TOP_TAGS = 5  # most frequent tags kept per MovieLens item
_YEAR_RE = re.compile(r"\s*\((\d{4})(?:[–-]\d{0,4})?\)\s*$")
_ARTICLE_RE = re.compile(r"^(?P<body>.*), (?P<art>The|A|An|Les|La|Le|L'|Il|El|Das|Der|Die|Los|Las)$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_LIST_SPLIT_RE = re.compile(r"\s*[|;]\s*")


def clean_text(value: object, limit: int = MAX_TEXT) -> str:
    """One line of printable text: control and bidi characters removed, whitespace collapsed, cut to `limit`."""
    text = _CONTROL_RE.sub(" ", str(value if value is not None else ""))
    return " ".join(text.split())[:limit]


@dataclass(frozen=True)
class Item:
    """One catalog item. `title` is the display title without the year."""

    item_id: str
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # most frequent first
    description: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        """The title as shown to people: "Heat (1995)"."""
        return f"{self.title} ({self.year})" if self.year else self.title

    @property
    def text(self) -> str:
        """The text that gets embedded: label, genres, top tags, description."""
        parts = [self.label + "."]
        if self.genres:
            parts.append("Genres: " + ", ".join(self.genres) + ".")
        if self.tags:
            parts.append("Tags: " + ", ".join(self.tags) + ".")
        if self.description:
            parts.append(self.description)
        return " ".join(parts)

    def metadata(self) -> dict:
        """Flat, Chroma-safe metadata (str/int/float/bool values only; no None)."""
        meta: dict = {"title": self.label}
        if self.year is not None:
            meta["year"] = self.year
        meta["genres"] = "|".join(self.genres)
        meta["tags"] = "|".join(self.tags)
        for key, value in self.extra.items():
            if isinstance(value, (str, int, float, bool)) and key not in meta:
                meta[key] = value
        return meta

    @cached_property
    def content_hash(self) -> str:
        """Changes whenever the embedded text or the stored metadata would change."""
        payload = json.dumps([self.text, self.metadata()], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


ID_PREFIX = "id:"  # "id:300" always names the item id 300 (a bare "300" is a title first)


@dataclass(frozen=True)
class Resolved:
    """How one reference was read: the item it names (None: none), as what, and the reading set aside."""

    ref: str
    item_id: str | None
    read_as: str | None  # "id", "title", "near title" or None
    other: str | None = None  # the other reading when the ref was both a title and an id

    def to_dict(self) -> dict:
        return {"ref": self.ref, "item_id": self.item_id, "read_as": self.read_as, "other": self.other}


class Catalog:
    """An ordered set of items with title resolution."""

    def __init__(self, items: list[Item], *, name: str, path: Path | None = None, columns: tuple[str, ...] = ()):
        self.items: dict[str, Item] = {item.item_id: item for item in items}
        self.name = name
        self.path = path
        self.columns = tuple(columns)  # columns present in the source file

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items.values())

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> Item:
        try:
            return self.items[str(item_id)]
        except KeyError:
            raise UnknownItem(f"unknown item id {item_id!r} in catalog {self.name}") from None

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every item's content: equal fingerprints mean an unchanged catalog."""
        digest = hashlib.sha256()
        for item in self:
            digest.update(f"{item.item_id}\0{item.content_hash}\n".encode())
        return digest.hexdigest()[:16]

    @cached_property
    def _title_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for item in self:
            for key in title_keys(item):
                index.setdefault(key, []).append(item.item_id)
        return index

    def lookup(self, ref: str) -> Resolved:
        """How `ref` reads as an item (the one rule for every reference a person types; README "References"):

        - `id:300` is always the item id 300;
        - anything else is a title first (with or without its year, an alternate title, a moved article);
        - when no title matches exactly, an item id (a bare `300` finds id 300 only if no film is called "300");
        - last, a near spelling of a title.
        When `ref` is both a title and an id, the title wins and `other` names the id reading it set aside.
        """
        ref = clean_text(ref, 300)
        if not ref:
            return Resolved(ref, None, None)
        if ref[:3].lower() == ID_PREFIX:
            item_id = ref[3:].strip()
            return Resolved(ref, item_id if item_id in self.items else None, "id")
        key = normalize_title(ref)
        ids = self._title_index.get(key)
        if ids:
            item_id = self._by_year(ids, ref)
            other = None
            if ref in self.items and ref != item_id:
                other = f"{ID_PREFIX}{ref} ({self.items[ref].label})"
            return Resolved(ref, item_id, "title", other)
        if ref in self.items:
            return Resolved(ref, ref, "id")
        close = difflib.get_close_matches(key, self._title_index.keys(), n=1, cutoff=0.88)
        if close:
            return Resolved(ref, self._by_year(self._title_index[close[0]], ref), "near title")
        return Resolved(ref, None, None)

    def _by_year(self, ids: list[str], ref: str) -> str:
        """Several items share the title (remakes): the one the ref's year names, else the first."""
        year = _YEAR_RE.search(ref)
        if year:
            for item_id in ids:
                if self.items[item_id].year == int(year.group(1)):
                    return item_id
        return ids[0]

    def resolve(self, ref: str) -> str | None:
        """The item id `ref` names (see `lookup` for the rule), else None."""
        return self.lookup(ref).item_id

    def resolve_many(self, refs) -> tuple[list[str], list[str]]:
        """(resolved ids in the given order, duplicates dropped; refs that matched nothing)."""
        ids, unknown, _ = self.lookup_many(refs)
        return ids, unknown

    def lookup_many(self, refs) -> tuple[list[str], list[str], list[Resolved]]:
        """(resolved ids in order, duplicates dropped; refs that matched nothing; the refs that could be read
        two ways, with the reading taken)."""
        ids: list[str] = []
        unknown: list[str] = []
        ambiguous: list[Resolved] = []
        for ref in refs:
            found = self.lookup(str(ref))
            if found.item_id is None:
                unknown.append(str(ref))
                continue
            if found.other:
                ambiguous.append(found)
            if found.item_id not in ids:
                ids.append(found.item_id)
        return ids, unknown, ambiguous

    def check_filter_columns(self, columns) -> None:
        """CatalogError if a filter names a column this catalog does not have."""
        available = set(self.columns) | {"year", "genres", "tags", "title"}
        missing = sorted(set(columns) - available)
        if missing:
            raise CatalogError(
                f"{self.path or self.name}: no column {', '.join(missing)} to filter on "
                f"(columns: {', '.join(sorted(available))})"
            )


LIKED_RATING = 4.0  # a rating from this up counts as "liked" (Interactions.co_liked)


class Interactions:
    """User-item events in file order; sequences are chronological with ties broken by row order."""

    def __init__(self, rows: list[tuple[str, str, float, float | None]], *, path: Path | None = None):
        self.rows = rows  # (user_id, item_id, timestamp, rating or None)
        self.path = path

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def _sequences(self) -> dict[str, list[tuple[str, float]]]:
        order = sorted(range(len(self.rows)), key=lambda i: (self.rows[i][2], i))
        sequences: dict[str, list[tuple[str, float]]] = {}
        for i in order:
            user, item, ts, _ = self.rows[i]
            sequences.setdefault(user, []).append((item, ts))
        return sequences

    def sequences(self) -> dict[str, list[tuple[str, float]]]:
        """user -> [(item_id, timestamp)], chronological."""
        return self._sequences

    @property
    def users(self) -> list[str]:
        return list(self._sequences)

    def history(self, user_id: str) -> list[str]:
        """The user's item ids, oldest first."""
        seq = self._sequences.get(str(user_id))
        if seq is None:
            sample = ", ".join(self.users[:3])
            raise UnknownUser(
                f"unknown user {user_id!r} in {self.path or 'the interactions'} "
                f"({len(self._sequences)} users, e.g. {sample})"
            )
        return [item for item, _ in seq]

    def popularity(self) -> Counter:
        """item_id -> number of interactions."""
        return Counter(item for _, item, _, _ in self.rows)

    @cached_property
    def _likers(self) -> dict[str, frozenset[str]]:
        rated = any(rating is not None for *_, rating in self.rows)
        likers: dict[str, set[str]] = {}
        for user, item, _, rating in self.rows:
            if not rated or (rating is not None and rating >= LIKED_RATING):
                likers.setdefault(item, set()).add(user)
        return {item: frozenset(users) for item, users in likers.items()}

    def co_liked(self, item_id: str, others: list[str]) -> list[tuple[str, int]]:
        """`(other, people who liked both)` for each of `others` liked together with `item_id` by anyone, most
        first (ties: the later in `others`). "Liked" = rated at least `LIKED_RATING`; without ratings, any
        interaction."""
        mine = self._likers.get(item_id, frozenset())
        counts = [(o, len(mine & self._likers.get(o, frozenset()))) for o in others if o != item_id]
        order = sorted(range(len(counts)), key=lambda i: (-counts[i][1], -i))
        return [counts[i] for i in order if counts[i][1] > 0]

    def without(self, pairs: set[tuple[str, str]]) -> Interactions:
        """These interactions less the given `(user, item)` pairs (e.g. held-out evaluation targets)."""
        return Interactions([r for r in self.rows if (r[0], r[1]) not in pairs], path=self.path)


# ---------------------------------------------------------------- reading files


class _Problems:
    """Collects validation problems by kind, then raises one CatalogError naming file and rows."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, list[int]] = {}

    def add(self, problem: str, row: int) -> None:
        self.rows.setdefault(problem, []).append(row)

    def raise_if_any(self) -> None:
        if not self.rows:
            return
        parts = []
        for problem, rows in self.rows.items():
            named = ", ".join(map(str, rows[:MAX_ROWS_NAMED])) + (f" (+{len(rows) - MAX_ROWS_NAMED} more)" if len(rows) > MAX_ROWS_NAMED else "")
            parts.append(f"{problem} at row{'s' if len(rows) > 1 else ''} {named}")
        raise CatalogError(f"{self.path}: " + "; ".join(parts))


def _read_text(path: Path) -> str:
    if not path.exists():
        raise CatalogError(f"{path}: no such file")
    if path.is_dir():
        raise CatalogError(f"{path}: is a folder, expected a CSV or JSONL file")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except OSError as exc:
            raise CatalogError(f"{path}: not a valid gzip file ({exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CatalogError(f"{path}: undecodable bytes (not UTF-8) at row {line}") from None
    if not text.strip():
        raise CatalogError(f"{path}: the file is empty")
    return text


def _records(path: Path) -> tuple[list[tuple[int, dict]], tuple[str, ...]]:
    """[(row number in the file, {column: value})], columns. CSV rows count the header as row 1."""
    text = _read_text(path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if suffixes and suffixes[-1] in (".jsonl", ".ndjson", ".json"):
        records, columns, problems = [], {}, _Problems(path)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                problems.add("invalid JSON", number)
                continue
            if not isinstance(obj, dict):
                problems.add("not a JSON object", number)
                continue
            records.append((number, obj))
            columns.update(dict.fromkeys(obj))
        problems.raise_if_any()
        if not records:
            raise CatalogError(f"{path}: no rows")
        return records, tuple(columns)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise CatalogError(f"{path}: no header row")
    columns = tuple(c.strip() for c in reader.fieldnames)
    reader.fieldnames = list(columns)
    records = []
    try:
        for row in reader:
            extra = row.pop(None, None)  # more fields than the header has
            if extra:
                raise CatalogError(f"{path}: more fields than the header names at row {reader.line_num}")
            records.append((reader.line_num, row))
    except csv.Error as exc:
        raise CatalogError(f"{path}: unreadable CSV at row {reader.line_num} ({exc})") from None
    if not records:
        raise CatalogError(f"{path}: no rows after the header")
    return records, columns


def _split_list(value) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    parts = value if isinstance(value, list) else _LIST_SPLIT_RE.split(str(value))
    out = []
    for part in parts:
        part = clean_text(part, 100)
        if part and part != "(no genres listed)" and part not in out:
            out.append(part)
    return tuple(out)


def _coerce(value):
    if isinstance(value, (int, float, bool)):
        return value
    text = clean_text(value, MAX_TEXT)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _catalog_name(path: Path) -> str:
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", path.name.split(".")[0]).strip("-").lower() or "items"
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{stem[:40]}-{digest}"


def _items_from_records(path: Path, records, columns) -> list[Item]:
    missing = [c for c in ("item_id", "title") if c not in columns]
    if missing:
        raise CatalogError(f"{path}: missing column {', '.join(missing)} (need item_id,title; found {', '.join(columns)})")
    problems = _Problems(path)
    items, seen = [], set()
    for number, row in records:
        item_id = clean_text(row.get("item_id"), 200)
        title = clean_text(row.get("title"), 500)
        if not item_id:
            problems.add("missing item_id", number)
            continue
        if item_id in seen:
            problems.add(f"duplicate item_id", number)
            continue
        seen.add(item_id)
        if not title:
            problems.add("missing title", number)
            continue
        year = row.get("year")
        if year not in (None, ""):
            try:
                year = int(float(str(year).strip()))
            except ValueError:
                problems.add("year is not a number", number)
                continue
        else:
            year = None
        extra = {k: _coerce(v) for k, v in row.items() if k not in KNOWN_COLUMNS and v not in (None, "")}
        items.append(
            Item(
                item_id=item_id,
                title=title,
                year=year,
                genres=_split_list(row.get("genres")),
                tags=_split_list(row.get("tags")),
                description=clean_text(row.get("description"), MAX_TEXT),
                extra=extra,
            )
        )
    problems.raise_if_any()
    return items


def _movielens_title(raw: str) -> tuple[str, int | None]:
    """'American President, The (1995)' -> ('The American President', 1995)."""
    raw = clean_text(raw, 500)
    year = None
    match = _YEAR_RE.search(raw)
    if match:
        year = int(match.group(1))
        raw = raw[: match.start()].strip()
    main, sep, alt = raw.partition(" (")
    article = _ARTICLE_RE.match(main)
    if article:
        joiner = "" if article["art"].endswith("'") else " "
        main = f"{article['art']}{joiner}{article['body']}"
    return (main + sep + alt).strip() or raw, year


def _load_movielens(folder: Path) -> Catalog:
    movies = folder / "movies.csv"
    records, columns = _records(movies)
    if not {"movieId", "title"} <= set(columns):
        raise CatalogError(f"{movies}: MovieLens movies.csv needs movieId,title columns")
    tag_counts: dict[str, Counter] = {}
    if (folder / "tags.csv").exists():
        for _, row in _records(folder / "tags.csv")[0]:
            tag = clean_text(row.get("tag"), 60).lower()
            if tag:
                tag_counts.setdefault(str(row.get("movieId", "")).strip(), Counter())[tag] += 1
    rows = []
    for number, row in records:
        title, year = _movielens_title(row.get("title") or "")
        counts = tag_counts.get(str(row.get("movieId", "")).strip(), Counter())
        tags = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]]
        rows.append(
            (number, {"item_id": row.get("movieId"), "title": title, "year": year or "", "genres": row.get("genres"), "tags": "|".join(tags)})
        )
    items = _items_from_records(movies, rows, ("item_id", "title", "year", "genres", "tags"))
    name = "ml-latest-small" if folder.resolve() == paths.bundled_dir().resolve() else _catalog_name(folder)
    return Catalog(items, name=name, path=folder, columns=("item_id", "title", "year", "genres", "tags"))


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a catalog; None loads the bundled MovieLens ml-latest-small."""
    path = Path(path).expanduser() if path is not None else paths.bundled_dir()
    if path.is_dir():
        if (path / "movies.csv").exists():
            return _load_movielens(path)
        raise CatalogError(f"{path}: a folder without movies.csv; give a catalog CSV or JSONL file")
    records, columns = _records(path)
    return Catalog(_items_from_records(path, records, columns), name=_catalog_name(path), path=path, columns=columns)


def _timestamp(value) -> float:
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def load_interactions(path: str | Path | None = None) -> Interactions:
    """Load interactions; None loads the bundled MovieLens ratings. Rows keep their file order."""
    path = Path(path).expanduser() if path is not None else paths.bundled_dir() / "ratings.csv"
    if path.is_dir():
        path = path / "ratings.csv"
    records, columns = _records(path)
    names = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp", "rating": "rating"}
    if "userId" in columns and "movieId" in columns:  # MovieLens ratings.csv
        names.update(user_id="userId", item_id="movieId")
    missing = [k for k in ("user_id", "item_id", "timestamp") if names[k] not in columns]
    if missing:
        raise CatalogError(f"{path}: missing column {', '.join(missing)} (need user_id,item_id,timestamp[,rating])")
    problems = _Problems(path)
    rows = []
    for number, row in records:
        user = clean_text(row.get(names["user_id"]), 200)
        item = clean_text(row.get(names["item_id"]), 200)
        if not user or not item:
            problems.add("missing user_id or item_id", number)
            continue
        try:
            ts = _timestamp(row.get(names["timestamp"]))
        except (TypeError, ValueError):
            problems.add("timestamp is not a number or ISO date", number)
            continue
        rating = row.get(names["rating"])
        try:
            rating = float(rating) if rating not in (None, "") else None
        except ValueError:
            problems.add("rating is not a number", number)
            continue
        rows.append((user, item, ts, rating))
    problems.raise_if_any()
    return Interactions(rows, path=path)


def default_interactions(catalog_path: str | Path | None, interactions_path: str | Path | None):
    """The interactions that go with a catalog: the file given, else the bundled ratings when the catalog is the
    bundled one, else None (a custom catalog has no default interactions)."""
    if interactions_path is None and catalog_path is not None:
        return None
    return load_interactions(interactions_path)
