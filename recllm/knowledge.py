"""Knowledge for a title-only catalog, from data a user has: each source optional and measured on its own.

- **Linked knowledge** (`link_catalogs`, `linked_catalog`, `carry_interactions`, `write_linked`): items of a
  catalog that has only titles are linked to another catalog with metadata and interactions (e.g. ReDial's movie
  titles to the bundled MovieLens) by an id map or by normalised title + year, with a report of what matched and
  how. Genres, tags and the year flow into the linked items' text; the other catalog's interactions are carried
  over to the linked ids, so `recllm fit-retriever` (or `CoOccurrence`) learns from them.
- **A popularity prior** (`popularity_prior`): mention or interaction counts, optionally a catalog column, always
  applied inside the conversation's constraints (`retrieve.Filters`).
- **Conversations as interactions** (`conversation_interactions`, `write_interactions`): one dialogue = one user,
  the movies in the order they were mentioned, with a rating from the liked / disliked / did-not-say labels.
- `CoOccurrence`: item-to-item counts from any such sequences ("mentioned in the same conversation", "rated by
  the same person"), the collaborative signal the conversation ranker (`recllm.convrank`) uses.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from recllm.catalog import Catalog, Interactions, Item
from recllm.titles import normalize_title, title_keys

_YEAR_IN_TITLE_RE = re.compile(r"\s*\((\d{4})\)\s*$")

# ratings written for conversation mentions (Interactions' optional rating column)
LIKED, NEUTRAL, DISLIKED = 1.0, 0.5, 0.0


def title_and_year(item: Item) -> tuple[str, int | None]:
    """An item's title without a trailing "(2001)" and its year (the `year` field first, else the one in the
    title: a title-only catalog such as ReDial's writes "Super Troopers (2001)")."""
    match = _YEAR_IN_TITLE_RE.search(item.title)
    title = item.title[: match.start()].strip() if match else item.title
    year = item.year if item.year is not None else (int(match.group(1)) if match else None)
    return title, year


def with_year(catalog: Catalog) -> Catalog:
    """The catalog with years taken out of titles into the `year` field ("Heat (1995)" → "Heat", 1995), so
    labels, year filters and title lookups work on a title-only catalog. Items are otherwise unchanged."""
    items = []
    for item in catalog:
        title, year = title_and_year(item)
        items.append(replace(item, title=title or item.title, year=year))
    return Catalog(items, name=catalog.name, path=catalog.path, columns=tuple(dict.fromkeys(catalog.columns + ("year",))))


# -- linked knowledge ---------------------------------------------------------------------------------------


@dataclass
class Link:
    """Which item of `other` each linked catalog item is (catalog id → other id) and how it was found."""

    pairs: dict[str, str] = field(default_factory=dict)
    rule: dict[str, str] = field(default_factory=dict)  # catalog id → "id map" | "title+year" | "title+year±1" | "title"
    unmatched: list[str] = field(default_factory=list)

    def report(self, catalog: Catalog, mentions: Mapping[str, int] | None = None) -> dict:
        """What matched: items by rule, and (with `mentions`: counts per item) the share of mentions linked."""
        out = {"items": len(catalog), "linked": len(self.pairs),
               "linked_share": round(len(self.pairs) / max(1, len(catalog)), 4),
               "by_rule": dict(Counter(self.rule.values()).most_common()),
               "unmatched_examples": [catalog.get(i).title for i in self.unmatched[:20]]}
        if mentions:
            total = sum(mentions.values())
            linked = sum(n for i, n in mentions.items() if i in self.pairs)
            out["mention_share"] = round(linked / max(1, total), 4)
        return out


def link_catalogs(catalog: Catalog, other: Catalog, *, id_map: Mapping[str, str] | None = None,
                  popularity: Mapping[str, float] | None = None) -> Link:
    """Link `catalog`'s items to `other`'s: by `id_map` (catalog id → other id) where given, else by normalised
    title (every `title_keys` form: without/with a leading article, alternate titles) AND year; then the same
    title with the year one off (release vs. festival year); then by title alone when neither side has a year
    and the title names one item on each side, or (with `popularity`, e.g. the other catalog's interaction counts)
    the most popular of several when this side has no year ("The Mummy"). An other item is used once at most."""
    link = Link()
    used: set[str] = set()
    by_key: dict[str, list[str]] = {}
    for item in other:
        for key in title_keys(replace(item, title=title_and_year(item)[0], year=None)):
            by_key.setdefault(key, []).append(item.item_id)
    years = {item.item_id: title_and_year(item)[1] for item in other}
    id_map = dict(id_map or {})
    for item in catalog:
        if item.item_id in id_map and id_map[item.item_id] in other:
            _add(link, used, item.item_id, str(id_map[item.item_id]), "id map")
            continue
        title, year = title_and_year(item)
        keys = title_keys(replace(item, title=title, year=None))
        found = list(dict.fromkeys(o for key in keys for o in by_key.get(key, ()) if o not in used))
        exact = [o for o in found if year is not None and years[o] == year]
        near = [o for o in found if year is not None and years[o] is not None and abs(years[o] - year) == 1]
        if exact:
            _add(link, used, item.item_id, exact[0], "title+year")
        elif len(near) == 1:
            _add(link, used, item.item_id, near[0], "title+year±1")
        elif len(found) == 1 and (year is None or years[found[0]] is None):
            _add(link, used, item.item_id, found[0], "title")
        elif found and year is None and popularity:
            _add(link, used, item.item_id, max(found, key=lambda o: popularity.get(o, 0)), "title, most popular")
        else:
            link.unmatched.append(item.item_id)
    return link


def _add(link: Link, used: set[str], item_id: str, other_id: str, rule: str) -> None:
    link.pairs[item_id] = other_id
    link.rule[item_id] = rule
    used.add(other_id)


def linked_catalog(catalog: Catalog, other: Catalog, link: Link) -> Catalog:
    """`catalog` with each linked item's genres, tags, year and description taken from its `other` item (its
    own id and title kept; years moved out of titles): the text that is embedded now says what the film is."""
    items = []
    for item in with_year(catalog):
        other_id = link.pairs.get(item.item_id)
        if other_id is not None:
            o = other.get(other_id)
            item = replace(item, year=item.year or o.year, genres=item.genres or o.genres, tags=item.tags or o.tags,
                           description=item.description or o.description)
        items.append(item)
    columns = tuple(dict.fromkeys(catalog.columns + ("year", "genres", "tags")))
    return Catalog(items, name=f"{catalog.name}-linked", path=catalog.path, columns=columns)


def carry_interactions(link: Link, interactions: Interactions) -> list[tuple[str, str, float, float | None]]:
    """The other catalog's interaction rows whose item is linked, rewritten to the linked catalog's ids."""
    back = {o: i for i, o in link.pairs.items()}
    return [(user, back[item], ts, rating) for user, item, ts, rating in interactions.rows if item in back]


def write_linked(out_dir: str | Path, catalog: Catalog, other: Catalog, link: Link,
                 interactions: Interactions | None = None, mentions: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Write `items.csv` (the linked catalog), `interactions.csv` (carried over; when `interactions` is given)
    and `link_report.json`; returns the paths. Use them as `--catalog` / `--interactions` of any command."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    linked = linked_catalog(catalog, other, link)
    paths = {"catalog": out / "items.csv", "report": out / "link_report.json"}
    with open(paths["catalog"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "year", "genres", "tags", "linked_id"])
        for item in linked:
            writer.writerow([item.item_id, item.title, item.year or "", "|".join(item.genres), "|".join(item.tags),
                             link.pairs.get(item.item_id, "")])
    if interactions is not None:
        paths["interactions"] = out / "interactions.csv"
        write_interactions(paths["interactions"], carry_interactions(link, interactions))
    paths["report"].write_text(json.dumps(link.report(catalog, mentions), indent=1))
    return paths


# -- conversations as interactions ----------------------------------------------------------------------------


def conversation_interactions(dialogues: Iterable, *, keep_disliked: bool = False) -> list[tuple[str, str, float, float]]:
    """(user, item, timestamp, rating) rows: one dialogue (`conversations.Dialogue`) = one user, its movies in the
    order first mentioned (timestamp = position), rating `LIKED` / `NEUTRAL` (no label) / `DISLIKED` from the
    seeker's labels. Disliked movies are left out unless `keep_disliked`."""
    rows = []
    for dialogue in dialogues:
        user = f"conv-{dialogue.id}"
        for position, item_id in enumerate(dialogue.mention_order()):
            rating = dialogue.rating(item_id)
            if rating == DISLIKED and not keep_disliked:
                continue
            rows.append((user, item_id, float(position), rating))
    return rows


def write_interactions(path: str | Path, rows: Iterable[tuple]) -> Path:
    """Rows (user, item, timestamp, rating) as an interactions CSV (`user_id,item_id,timestamp,rating`)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for user, item, ts, rating in rows:
            writer.writerow([user, item, f"{ts:g}", "" if rating is None else f"{rating:g}"])
    return path


def sequences_from_rows(rows: Iterable[tuple], *, min_rating: float | None = None) -> list[list[tuple[str, float]]]:
    """Per user, (item, weight) in timestamp order; rows with a rating below `min_rating` left out; the weight is
    the rating (1 when missing)."""
    by_user: dict[str, list] = {}
    for n, (user, item, ts, rating) in enumerate(rows):
        if min_rating is not None and rating is not None and rating < min_rating:
            continue
        by_user.setdefault(user, []).append((ts, n, item, 1.0 if rating is None else float(rating)))
    return [[(item, w) for _, _, item, w in sorted(seq)] for seq in by_user.values()]


# -- popularity prior ---------------------------------------------------------------------------------------------


def popularity_prior(catalog: Catalog, counts: Mapping[str, float], filters=None, *, exclude: Iterable[str] = (),
                     k: int = 10) -> list[tuple[str, float]]:
    """The `k` most popular items that pass `filters` (a `retrieve.Filters`: genres, years, excluded ids) and are
    not in `exclude`, best first, with log1p(count) as the score. An empty chat still gets an answer inside its
    constraints; items with no count follow in catalog order."""
    skip = set(exclude)
    order = {item_id: n for n, item_id in enumerate(catalog.items)}
    ok = [i for i in catalog if i.item_id not in skip and (filters is None or filters.accepts(i))]
    ok.sort(key=lambda i: (-counts.get(i.item_id, 0), order[i.item_id]))
    return [(i.item_id, float(np.log1p(counts.get(i.item_id, 0)))) for i in ok[:k]]


def column_counts(catalog: Catalog, column: str) -> dict[str, float]:
    """Popularity from a numeric catalog column (e.g. `nbMentions`, `votes`)."""
    out = {}
    for item in catalog:
        value = item.extra.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[item.item_id] = float(value)
    return out


# -- co-occurrence ------------------------------------------------------------------------------------------------


class CoOccurrence:
    """Item-to-item co-occurrence over sequences: C[i, j] = sum over users of w_i * w_j (i != j), scored as
    C[i, j] / (n_i ** row_norm * n_j ** col_norm) with n the items' totals. Dense over the items that occur."""

    def __init__(self, sequences: Iterable[list[tuple[str, float]]], *, row_norm: float = 0.5, col_norm: float = 0.0,
                 max_items: int = 8000):
        seqs = [s for s in sequences if s]
        counts = Counter(i for s in seqs for i, _ in s)
        ids = [i for i, _ in counts.most_common(max_items)]
        self.index = {item_id: n for n, item_id in enumerate(ids)}
        self.item_ids = ids
        n = len(ids)
        users = np.zeros((len(seqs), n), dtype=np.float32)
        for u, seq in enumerate(seqs):
            for item_id, w in seq:
                pos = self.index.get(item_id)
                if pos is not None:
                    users[u, pos] = max(users[u, pos], w)
        matrix = users.T @ users
        np.fill_diagonal(matrix, 0.0)
        totals = np.maximum(users.sum(0), 1e-6)
        self.matrix = matrix / (totals[:, None] ** row_norm) / (totals[None, :] ** col_norm)
        self.totals = totals

    def scores(self, history: list[tuple[str, float]]) -> np.ndarray:
        """(len(item_ids),) sum of weight * row over the history items this object knows."""
        out = np.zeros(len(self.item_ids), dtype=np.float32)
        for item_id, w in history:
            pos = self.index.get(item_id)
            if pos is not None and w:
                out += w * self.matrix[pos]
        return out

    def to_catalog(self, values: np.ndarray, positions: Mapping[str, int], size: int) -> np.ndarray:
        """Values over `item_ids` spread onto a catalog's positions (items unknown here: 0)."""
        out = np.zeros(size, dtype=np.float32)
        idx = np.array([positions.get(i, -1) for i in self.item_ids], dtype=np.int64)
        keep = idx >= 0
        out[idx[keep]] = values[keep]
        return out
