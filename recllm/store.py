"""The item store: Chroma collections of item vectors. The ONLY module that imports chromadb.

One collection per catalog holds the text embeddings (`items__<catalog.name>`, cosine space); more
collections hold other vectors for the same items, e.g. the collaborative retriever's item vectors
(`seq__<catalog.name>`, inner-product space). Every record is keyed by its stable item id, carries the
item's filter metadata (year as int, genres and tags as lower-case lists, extra catalog columns) and, in
the items collection, the item's `content_hash`.

Indexing is incremental and restartable: it reads the stored hashes, embeds and upserts only items whose
hash differs, in batches keyed by item id, and deletes items no longer in the catalog. Upsert by id makes
a rerun after a crash (Ctrl-C, kill -9) converge with no duplicates and no loss. The collection's own
metadata records the embedder's model id (a different model re-embeds everything) and the catalog
fingerprint, which is blanked before a run writes anything and set once it has finished, so "is the index
current?" is a cheap check that an interrupted run can never pass.

Embeddings are always passed explicitly: collections are opened with `embedding_function=None`, so
Chroma never loads (or downloads) its default model. Telemetry is off.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from recllm import paths
from recllm.errors import RecllmError, StoreError

if TYPE_CHECKING:  # imported for annotations only: retrieve.py does not import this module either
    from recllm.catalog import Catalog, Item
    from recllm.embed import Embedder
    from recllm.retrieve import Filters

ITEMS = "items"  # kind of the text-embedding collection
HASH_KEY = "_content_hash"  # item metadata key holding Item.content_hash
MODEL_KEY = "recllm_model"  # collection metadata: embedder model id (or the vectors' producer)
DIM_KEY = "recllm_dim"  # collection metadata: vector size
FINGERPRINT_KEY = "recllm_fingerprint"  # collection metadata: catalog fingerprint of the last finished run
SPACE_KEY = "recllm_space"  # collection metadata: "cosine" or "ip"
POST_FILTER_FETCH = 8  # filtered queries first try this many times k unfiltered results (see `query`)
_PAGE = 5000  # ids per `get` page when reading a whole collection
CHROMA_DB = "chroma.sqlite3"  # the database file of an embedded Chroma store
SQLITE_MAGIC = b"SQLite format 3\x00"
_KIND_RE = re.compile(r"^[a-z][a-z0-9]{0,30}$")


@dataclass
class IndexStats:
    """What one `ItemStore.index` run did."""

    catalog: str
    total: int = 0  # items in the catalog
    embedded: int = 0  # items embedded and upserted in this run (new or changed)
    added: int = 0  # of those, not stored before
    updated: int = 0  # of those, stored with another content hash
    deleted: int = 0  # stored items no longer in the catalog
    unchanged: int = 0  # stored with the same content hash: no work
    rebuilt: bool = False  # the collection was dropped first (other embedder model / vector size)
    seconds: float = 0.0

    def summary(self) -> str:
        extra = " (rebuilt for a different embedder)" if self.rebuilt else ""
        return (f"indexed {self.catalog}: {self.total} items — {self.added} added, {self.updated} updated, "
                f"{self.deleted} deleted, {self.unchanged} unchanged in {self.seconds:.1f} s{extra}")


def item_metadata(item: Item) -> dict:
    """Chroma metadata for filters: the item's flat metadata with genres/tags as lower-case lists.

    Chroma (>= 1.0) matches list values with `$contains`; empty lists are not allowed, so an item
    without genres simply has no `genres` key (a genre filter then never matches it, and an
    exclude-genre filter always keeps it).
    """
    meta = dict(item.metadata())
    for key, values in (("genres", item.genres), ("tags", item.tags)):
        lowered = list(dict.fromkeys(v.lower() for v in values if v))
        if lowered:
            meta[key] = lowered
        else:
            meta.pop(key, None)
    if item.year is not None:
        meta["year"] = int(item.year)
    return meta


def where_clause(filters: Filters | None) -> dict | None:
    """Chroma `where` for `Filters` (exclude_ids is handled by over-fetching, not here)."""
    if filters is None:
        return None
    clauses: list[dict] = []
    genres = [g.strip().lower() for g in filters.genres if g and g.strip()]
    if len(genres) == 1:
        clauses.append({"genres": {"$contains": genres[0]}})
    elif genres:
        clauses.append({"$or": [{"genres": {"$contains": g}} for g in genres]})
    for genre in filters.exclude_genres:
        if genre and genre.strip():
            clauses.append({"genres": {"$not_contains": genre.strip().lower()}})
    if filters.year_min is not None:
        clauses.append({"year": {"$gte": int(filters.year_min)}})
    if filters.year_max is not None:
        clauses.append({"year": {"$lte": int(filters.year_max)}})
    for key, value in (filters.where or {}).items():
        if isinstance(value, (list, tuple, set, frozenset)):
            clauses.append({key: {"$in": list(value)}})
        else:
            clauses.append({key: {"$eq": value}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def collection_name(kind: str, catalog_name: str) -> str:
    """`<kind>__<catalog name>`, made to fit Chroma's rule ([a-zA-Z0-9._-], 3-512, alnum at both ends)."""
    slug = re.sub(r"[^a-zA-Z0-9._-]+", "-", catalog_name).strip("._-") or "catalog"
    return f"{kind}__{slug}"[:512]


class ItemStore:
    """Item vectors in Chroma: an embedded store under `home/chroma`, or a server at `chroma_url`."""

    def __init__(self, home: Path | None = None, chroma_url: str | None = None):
        self.chroma_url = chroma_url
        self.path = None if chroma_url else Path(home or paths.home()) / "chroma"
        self._client = None
        self._collections: dict[str, object] = {}

    # ------------------------------------------------------------------ connection

    @property
    def where(self) -> str:
        """Where the store lives, for messages."""
        return self.chroma_url or str(self.path)

    def _fix_hint(self) -> str:
        if self.chroma_url:
            return (f"start a server (`chroma run --path DIR --port PORT`) or check --chroma-url "
                    f"{self.chroma_url}")
        return f"move or delete {self.path} and run `recllm index` again"

    def client(self):
        """The Chroma client, created on first use; StoreError with a fix when it cannot be opened."""
        if self._client is not None:
            return self._client
        try:
            import chromadb
            from chromadb.config import Settings
        except ImportError as exc:
            raise StoreError("chromadb is not installed: pip install chromadb") from exc
        # A fresh Settings per client: chromadb's factories mutate the object they are given.
        settings = Settings(anonymized_telemetry=False)
        try:
            if self.chroma_url:
                host, port, ssl = _parse_url(self.chroma_url)
                client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
            else:
                self._check_folder()
                self.path.mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(self.path), settings=settings)
            client.list_collections(limit=1)  # touch the database: a foreign file fails here
            if not self.chroma_url:
                self._check_collections(client)
        except RecllmError:
            raise
        except Exception as exc:
            verb = "reach the Chroma server at" if self.chroma_url else "open the item store at"
            raise StoreError(f"cannot {verb} {self.where} ({_one_line(exc)}): {self._fix_hint()}") from None
        self._client = client
        return client

    def _check_folder(self) -> None:
        """Refuse, before Chroma writes anything, a store path that is not a Chroma folder or is damaged.

        Never deletes or repairs anything: the fix is left to the person, whose data it may be.
        """
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"the item store {self.path} is a file, not a folder: {self._fix_hint()}")
        entries = [p.name for p in self.path.iterdir()] if self.path.is_dir() else []
        if not entries:
            return
        db = self.path / CHROMA_DB
        if not db.is_file():
            raise StoreError(f"{self.path} is not a Chroma item store (it has no {CHROMA_DB}) and recllm will "
                             f"not write into it: move it away or set RECLLM_HOME to another folder")
        with db.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        others = [e for e in entries if not e.startswith(CHROMA_DB)]  # -wal, -shm and -journal belong to it
        if head != SQLITE_MAGIC and (head or others):  # empty with segment folders: the database was cut
            raise StoreError(f"the item store {self.path} is damaged ({CHROMA_DB} is not an SQLite database): "
                             f"{self._fix_hint()}")

    def _check_collections(self, client) -> None:
        """Refuse an embedded Chroma database holding collections recllm did not create (another program's)."""
        foreign = [c.name for c in client.list_collections()
                   if not any(str(k).startswith("recllm_") for k in (c.metadata or {}))]
        if foreign:
            names = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StoreError(f"{self.path} is a Chroma database of another program (collections {names}) and "
                             f"recllm will not write into it: set RECLLM_HOME to another folder")

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a Chroma call, turning its failures into a one-line StoreError."""
        try:
            return fn(*args, **kwargs)
        except RecllmError:
            raise
        except Exception as exc:
            raise StoreError(f"item store {self.where}: {what} failed ({_one_line(exc)}): {self._fix_hint()}") from None

    def _collection(self, kind: str, catalog_name: str, *, create: bool = False, space: str = "cosine",
                    metadata: dict | None = None):
        """The collection or None when missing (create=False)."""
        name = collection_name(kind, catalog_name)
        if name in self._collections:
            return self._collections[name]
        client = self.client()
        try:
            collection = client.get_collection(name, embedding_function=None)
        except Exception as exc:
            if type(exc).__name__ not in ("NotFoundError", "InvalidCollectionException", "ValueError"):
                raise StoreError(f"item store {self.where}: cannot open collection {name} "
                                 f"({_one_line(exc)}): {self._fix_hint()}") from None
            if not create:
                return None
            meta = {SPACE_KEY: space, **(metadata or {})}
            collection = self._call(
                f"creating collection {name}", client.get_or_create_collection, name,
                configuration={"hnsw": {"space": space}}, metadata=meta, embedding_function=None,
            )
        self._collections[name] = collection
        return collection

    def _drop(self, kind: str, catalog_name: str) -> None:
        name = collection_name(kind, catalog_name)
        self._collections.pop(name, None)
        client = self.client()
        try:
            client.delete_collection(name)
        except Exception as exc:
            if type(exc).__name__ not in ("NotFoundError", "InvalidCollectionException", "ValueError"):
                raise StoreError(f"item store {self.where}: cannot delete collection {name} "
                                 f"({_one_line(exc)})") from None

    def _max_batch(self) -> int:
        try:
            return int(self.client().get_max_batch_size())
        except Exception:
            return 1000

    # ------------------------------------------------------------------ reading

    def has(self, catalog: Catalog, kind: str = ITEMS) -> bool:
        return self._collection(kind, catalog.name) is not None

    def count(self, catalog: Catalog, kind: str = ITEMS) -> int:
        collection = self._collection(kind, catalog.name)
        return 0 if collection is None else int(self._call("count", collection.count))

    def ids(self, catalog: Catalog, kind: str = ITEMS) -> list[str]:
        """Every stored item id (no particular order)."""
        return list(self._stored(kind, catalog.name, with_hashes=False))

    def info(self, catalog: Catalog, kind: str = ITEMS) -> dict:
        """The collection's metadata (model id, dim, fingerprint, space); {} when missing."""
        if self._collection(kind, catalog.name) is None:
            return {}
        # read afresh: another process (an index run, a server's other clients) may have changed it
        fresh = self._call("reading collection metadata", self.client().get_collection,
                           collection_name(kind, catalog.name), embedding_function=None)
        return dict(fresh.metadata or {})

    def _stored(self, kind: str, catalog_name: str, *, with_hashes: bool) -> dict[str, str | None]:
        collection = self._collection(kind, catalog_name)
        if collection is None:
            return {}
        out: dict[str, str | None] = {}
        offset = 0
        include = ["metadatas"] if with_hashes else []
        while True:
            page = self._call("reading ids", collection.get, limit=_PAGE, offset=offset, include=include)
            ids = page["ids"]
            metas = page.get("metadatas") or [None] * len(ids)
            for item_id, meta in zip(ids, metas):
                out[item_id] = (meta or {}).get(HASH_KEY) if with_hashes else None
            if len(ids) < _PAGE:
                return out
            offset += len(ids)

    def is_current(self, catalog: Catalog, embedder: Embedder) -> bool:
        """True when the last finished index run saw exactly this catalog with this embedder."""
        meta = self.info(catalog)
        return (bool(meta) and meta.get(MODEL_KEY) == embedder.model_id
                and meta.get(FINGERPRINT_KEY) == catalog.fingerprint
                and self.count(catalog) == len(catalog))

    def get_vectors(self, catalog: Catalog, ids, kind: str = ITEMS) -> dict[str, np.ndarray]:
        """{item_id: vector} for the ids that are stored (missing ids are left out)."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        collection = self._collection(kind, catalog.name)
        if collection is None or not ids:
            return {}
        out: dict[str, np.ndarray] = {}
        step = max(1, min(self._max_batch(), _PAGE))
        for start in range(0, len(ids), step):
            got = self._call("reading vectors", collection.get, ids=ids[start:start + step], include=["embeddings"])
            for item_id, vec in zip(got["ids"], got["embeddings"]):
                out[item_id] = np.asarray(vec, dtype=np.float32)
        return out

    def vectors(self, catalog: Catalog, ids, kind: str = ITEMS) -> np.ndarray:
        """(len(ids), D) float32 rows in the order of `ids`; StoreError when one is not stored."""
        ids = [str(i) for i in ids]
        found = self.get_vectors(catalog, ids, kind)
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"{len(missing)} item(s) not in the {kind} store for {catalog.name} "
                             f"(e.g. {missing[0]!r}): run `recllm index`")
        if not ids:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[i] for i in ids])

    def query(self, catalog: Catalog, vector, k: int, filters: Filters | None = None,
              exclude_ids=(), kind: str = ITEMS) -> list[tuple[str, float]]:
        """Top-k (item_id, similarity) by descending similarity; `exclude_ids` and filters applied.

        Similarity is 1 - Chroma distance: the cosine for cosine collections, the dot product for
        inner-product ones. Excluded ids are removed after fetching k + len(exclude_ids) results, so
        exactly k come back whenever enough items pass the filters. `filters.where` columns must exist
        in the catalog (CatalogError otherwise).
        """
        if k <= 0:
            return []
        collection = self._collection(kind, catalog.name)
        if collection is None:
            fix = ("run `recllm index`" + (f" --catalog {catalog.path}" if catalog.path and catalog.name != "ml-latest-small" else "")
                   if kind == ITEMS else "fit the collaborative retriever first")
            raise StoreError(f"no {kind} vectors for catalog {catalog.name} in {self.where}: {fix}")
        if filters is not None and filters.where:
            catalog.check_filter_columns(filters.where.keys())
        exclude = set(str(i) for i in exclude_ids)
        if filters is not None:
            exclude |= set(filters.exclude_ids)
        total = len(catalog)  # records in the collection, near enough (Chroma caps n_results itself)
        n = k + len(exclude)
        vec = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        where = where_clause(filters)
        if where is not None and hasattr(filters, "accepts") and POST_FILTER_FETCH * n <= total // 2:
            # Chroma's metadata filter scans every record (tens of ms); an unfiltered fetch of a few
            # times more results, filtered here with the same rules, is usually enough and much faster.
            hits = self._nearest(collection, vec, POST_FILTER_FETCH * n, None)
            out = [(i, s) for i, s in hits if i not in exclude and i in catalog and filters.accepts(catalog.get(i))]
            if len(out) >= k:
                return out[:k]
        hits = self._nearest(collection, vec, n, where)
        return [(i, s) for i, s in hits if i not in exclude and i in catalog][:k]

    def _nearest(self, collection, vec: np.ndarray, n: int, where: dict | None) -> list[tuple[str, float]]:
        """(item_id, 1 - distance) for the n nearest records passing `where`, best first."""
        result = self._call("query", collection.query, query_embeddings=vec, n_results=n, where=where,
                            include=["distances"])
        hits = [(item_id, 1.0 - float(dist)) for item_id, dist in zip(result["ids"][0], result["distances"][0])]
        hits.sort(key=lambda pair: -pair[1])
        return hits

    # ------------------------------------------------------------------ writing

    def index(self, catalog: Catalog, embedder: Embedder, batch_size: int = 256, progress: bool = True,
              verify: bool = False) -> IndexStats:
        """Bring the items collection in line with `catalog`; only new/changed items are embedded.

        When the last finished run saw this very catalog (fingerprint, model and count match) nothing
        is read or written; `verify=True` compares every stored content hash anyway.
        """
        started = time.perf_counter()
        stats = IndexStats(catalog=catalog.name, total=len(catalog))
        if not verify and self.is_current(catalog, embedder):
            stats.unchanged = len(catalog)
            stats.seconds = time.perf_counter() - started
            return stats
        meta = self.info(catalog)
        if meta and (meta.get(MODEL_KEY) != embedder.model_id or int(meta.get(DIM_KEY, embedder.dim)) != embedder.dim):
            _note(f"the index of {catalog.name} was built with {meta.get(MODEL_KEY)}; re-embedding with {embedder.model_id}")
            self._drop(ITEMS, catalog.name)
            stats.rebuilt = True
        collection = self._collection(
            ITEMS, catalog.name, create=True, space="cosine",
            metadata={MODEL_KEY: embedder.model_id, DIM_KEY: embedder.dim},
        )
        stored = self._stored(ITEMS, catalog.name, with_hashes=True)
        hashes = {item.item_id: item.content_hash for item in catalog}
        todo = [item for item in catalog if stored.get(item.item_id) != hashes[item.item_id]]
        stale = [item_id for item_id in stored if item_id not in catalog]
        if todo or stale:  # from here until the run finishes, the collection is not "current"
            self._set_info(collection, embedder, fingerprint="")
        stats.unchanged = len(catalog) - len(todo)
        stats.added = sum(1 for item in todo if item.item_id not in stored)
        stats.updated = len(todo) - stats.added
        step = max(1, min(batch_size, self._max_batch()))
        for start in range(0, len(stale), step):
            self._call("deleting items", collection.delete, ids=stale[start:start + step])
        stats.deleted = len(stale)
        # Similar lengths in a batch waste less padding; the order of upserts does not matter.
        todo.sort(key=lambda item: len(item.text))
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"indexing {catalog.name}", unit="item", file=sys.stderr,
                       mininterval=0.5)
        try:
            for start in range(0, len(todo), step):
                batch = todo[start:start + step]
                vectors = embedder.encode([item.text for item in batch], batch_size=min(step, 128), progress=False)
                metadatas = [{**item_metadata(item), HASH_KEY: hashes[item.item_id]} for item in batch]
                self._call("writing items", collection.upsert, ids=[item.item_id for item in batch],
                           embeddings=vectors, metadatas=metadatas)
                stats.embedded += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        # Only a finished run records the fingerprint: an interrupted one is never taken as current.
        self._set_info(collection, embedder, fingerprint=catalog.fingerprint)
        stats.seconds = time.perf_counter() - started
        return stats

    def _set_info(self, collection, embedder: Embedder, fingerprint: str) -> None:
        # `modify` replaces the whole metadata dict: always write every key.
        self._call("writing collection metadata", collection.modify, metadata={
            SPACE_KEY: "cosine", MODEL_KEY: embedder.model_id, DIM_KEY: embedder.dim, FINGERPRINT_KEY: fingerprint,
        })

    def put_vectors(self, catalog: Catalog, kind: str, ids, vectors, space: str = "ip",
                    model: str = "", batch_size: int = 1000) -> int:
        """Replace the `kind` collection for `catalog` with these item vectors (e.g. kind="seq").

        Records carry the same filter metadata as the items collection, so `Filters` work on them.
        `model` names what produced the vectors (recorded in the collection metadata). Ids not in the
        catalog are skipped; returns the number of vectors stored.
        """
        if not _KIND_RE.match(kind) or kind == ITEMS:
            raise StoreError(f"bad vector kind {kind!r}: lower-case letters/digits, not {ITEMS!r}")
        if space not in ("ip", "cosine", "l2"):
            raise StoreError(f"bad vector space {space!r}: ip, cosine or l2")
        ids = [str(i) for i in ids]
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise StoreError(f"put_vectors: {len(ids)} ids but vectors of shape {vectors.shape}")
        keep = [j for j, i in enumerate(ids) if i in catalog]  # items the catalog no longer has are left out
        ids = [ids[j] for j in keep]
        vectors = vectors[keep]
        self._drop(kind, catalog.name)
        # The producer is recorded only once every vector is in: a killed run never looks finished.
        done = {SPACE_KEY: space, MODEL_KEY: model or kind, DIM_KEY: int(vectors.shape[1])}
        collection = self._collection(kind, catalog.name, create=True, space=space, metadata={**done, MODEL_KEY: ""})
        step = max(1, min(batch_size, self._max_batch()))
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            self._call(f"writing {kind} vectors", collection.upsert, ids=chunk,
                       embeddings=vectors[start:start + step],
                       metadatas=[item_metadata(catalog.get(i)) for i in chunk])
        self._call("writing collection metadata", collection.modify, metadata=done)
        return len(ids)

    def query_vectors(self, catalog: Catalog, kind: str, vector, k: int, filters: Filters | None = None,
                      exclude_ids=()) -> list[tuple[str, float]]:
        """`query` over the `kind` collection (see `put_vectors`)."""
        return self.query(catalog, vector, k, filters, exclude_ids, kind=kind)

    def delete(self, catalog: Catalog, kind: str | None = None) -> None:
        """Drop the collection(s) of a catalog (all kinds when kind is None)."""
        if kind is not None:
            self._drop(kind, catalog.name)
            return
        suffix = collection_name("x", catalog.name)[1:]  # "__<slug>"
        for col in self._call("listing collections", self.client().list_collections):
            name = col if isinstance(col, str) else col.name
            if name.endswith(suffix):
                self._drop(name[: -len(suffix)], catalog.name)


def _parse_url(url: str) -> tuple[str, int, bool]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StoreError(f"bad --chroma-url {url!r}: expected http://host:port")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 8000)
    except ValueError:
        raise StoreError(f"bad --chroma-url {url!r}: the port is not a number") from None
    return parsed.hostname, port, parsed.scheme == "https"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
