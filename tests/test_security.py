"""Security defaults: weights load only from safetensors/GGUF (never pickle), model code from a folder is never
run. Binding to 127.0.0.1 and the optional login are tested in test_app.py (test_defaults_are_local_private_and_queued,
test_login_from_environment); a pickled adapter is refused in test_llm.py::test_broken_or_missing_adapters."""

from __future__ import annotations

import json

import pytest
import torch

from recllm import llm
from recllm.errors import ModelError


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls torch.load (the pickle-based loader)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called: pickle weights must never be loaded")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def test_a_model_folder_with_pickle_weights_is_refused(tmp_path, no_unpickling):
    folder = tmp_path / "pickled-model"
    lm = llm.tiny_lm(seed=0)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(lm.model.state_dict(), folder / "pytorch_model.bin")  # the weights as a pickle only
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ModelError, match=r"(?s)Cannot load model.*safetensors"):
        llm.load_model(folder)
    assert no_unpickling == []


def test_model_code_shipped_in_a_folder_is_never_run(tmp_path, no_unpickling):
    folder = tmp_path / "remote-code-model"
    lm = llm.tiny_lm(seed=0)
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        loaded = llm.load_model(folder)
    except ModelError as exc:  # refusing the folder is fine too, running its code is not
        assert "evil" not in str(exc).lower() or "remote" in str(exc).lower()
    else:
        assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    assert no_unpickling == []
