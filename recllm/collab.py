"""The fitted collaborative retriever, attached to the item store for serving.

`recllm fit-retriever` saves a `seqrec.CollaborativeRetriever` under `paths.retrievers_dir()/<catalog>`.
At serve time its item vectors live in their own Chroma collection (`seq__<catalog>`, inner-product
space); a history goes through the sequential encoder to a user vector that queries that collection, and
the union of its hits and the content hits is re-scored with the fitted signal weights
(seq, transition, popularity, content) by `CollaborativeRetriever.candidate_signals`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from recllm import paths

log = logging.getLogger(__name__)


def fitted_dir(catalog) -> Path:
    """`<home>/retrievers/<catalog>` when fitted there (`recllm fit-retriever`), else the one shipped for the
    bundled MovieLens (fitted on its train split, seed 0)."""
    from recllm.seqrec import FUSION_FILE

    own = paths.retrievers_dir() / catalog.name
    shipped = paths.PACKAGE_DIR / "data" / "retrievers" / catalog.name
    if not (own / FUSION_FILE).is_file() and catalog.name == "ml-latest-small" and (shipped / FUSION_FILE).is_file():
        return shipped
    return own


def _stamp(folder: Path) -> str:
    """Changes whenever the fitted retriever is refitted (hash of its fusion file and weights size)."""
    from recllm.seqrec import FUSION_FILE

    digest = hashlib.sha256((folder / FUSION_FILE).read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return "seq-" + digest.hexdigest()[:16]


def load_collaborative(catalog, store, interactions=None):
    """The fitted retriever for `catalog` with its item vectors in `store`, or None when none is fitted."""
    from recllm.seqrec import FUSION_FILE, CollaborativeRetriever

    folder = fitted_dir(catalog)
    if not (folder / FUSION_FILE).is_file():
        return None
    fitted = CollaborativeRetriever.load(folder)
    if fitted.meta.get("catalog") not in (None, catalog.name):
        log.warning("fitted retriever in %s belongs to catalog %s, not %s: ignored",
                    folder, fitted.meta.get("catalog"), catalog.name)
        return None
    stamp = _stamp(folder)
    kind = fitted.kind
    if store.info(catalog, kind).get("recllm_model") != stamp:
        ids, vectors = fitted.item_vectors()
        n = store.put_vectors(catalog, kind, ids, vectors, space="ip", model=stamp)
        log.info("stored %d %s item vectors for %s", n, kind, catalog.name)
    return fitted
