"""Model loading, letter tokens, batched logits, streaming, adapters and their metadata checks (tiny models)."""

from __future__ import annotations

import shutil

import pytest
import torch

from recllm import llm
from recllm.errors import AdapterError, ModelError
from recllm.prompts import load_prompt


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved as an ordinary model folder (safetensors + tokenizer), loadable with --model."""
    folder = tmp_path_factory.mktemp("tiny-model")
    lm = llm.tiny_lm(seed=0)
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _adapter(lm, folder, **metadata):
    """Save a LoRA adapter with non-zero weights (fresh LoRA B matrices are zero: no effect)."""
    trainable = llm.add_lora(lm, r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainable.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    rank = load_prompt("rank")
    metadata.setdefault("prompt_name", rank.name)
    metadata.setdefault("prompt_sha256", rank.sha256)
    return llm.save_adapter(trainable, folder, **metadata)


def test_letters_are_single_tokens_after_the_prompt(tiny_lm):
    ids = tiny_lm.letter_token_ids(20, prefix="Answer: (")
    assert len(ids) == len(set(ids)) == 20
    assert [tiny_lm.tokenizer.decode([i]) for i in ids] == list(llm.LETTERS)
    assert tiny_lm.letter_token_ids(3, prefix="Answer: (") == ids[:3]


def test_letters_that_merge_with_the_prompt_are_refused(tiny_lm):
    # After "Answer: " the letter merges with the space ("ĠA"): not one appended token.
    with pytest.raises(ModelError, match="one token"):
        tiny_lm.letter_token_ids(3, prefix="Answer: ")
    with pytest.raises(ModelError, match="Between 1 and 20"):
        tiny_lm.letter_token_ids(21)


def test_next_token_logits_batch_equals_single_and_is_deterministic(tiny_lm):
    prompts = ["Hello there, my name is", "A", "The quick brown fox jumps over the lazy", "(B) Heat\nAnswer: ("]
    batch = tiny_lm.next_token_logits(prompts, batch_size=4)
    assert batch.shape == (4, len(tiny_lm.tokenizer)) and batch.dtype == torch.float32
    single = torch.stack([tiny_lm.next_token_logits([p])[0] for p in prompts])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)
    again = tiny_lm.next_token_logits(prompts, batch_size=2)
    torch.testing.assert_close(batch, again, atol=1e-4, rtol=1e-4)
    assert torch.equal(tiny_lm.next_token_logits(prompts, batch_size=4), batch)


def test_stream_and_generate_agree(tiny_lm):
    prompt = tiny_lm.chat_text([{"role": "user", "content": "Say hi"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    pieces = list(tiny_lm.stream(prompt, max_new_tokens=8))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tiny_lm.generate(prompt, max_new_tokens=8)
    text = "".join(pieces)
    cut = text[1:3]
    stopped = tiny_lm.generate(prompt, max_new_tokens=8, stop=(cut,))
    assert cut not in stopped and text.startswith(stopped)


def test_stream_matches_full_forward_greedy(tiny_lm):
    """The KV-cached loop picks the same tokens as argmax over full forwards."""
    prompt = "Once upon a time"
    text = tiny_lm.generate(prompt, max_new_tokens=5)
    ids = tiny_lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(5):
        logits = tiny_lm.next_token_logits([tiny_lm.tokenizer.decode(ids)])[0]
        ids.append(int(torch.argmax(logits)))
    start = len(tiny_lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert text == tiny_lm.tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_chat_text_continues_an_assistant_prefix(tiny_lm):
    text = tiny_lm.chat_text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                              {"role": "assistant", "content": "Answer: ("}])
    assert text.endswith("<|im_start|>assistant\nAnswer: (")


def test_tiny_lm_is_reproducible():
    a, b = llm.tiny_lm(seed=3), llm.tiny_lm(seed=3)
    assert a.model_id == "tiny-llama-32x2-seed3"
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), na
    c = llm.tiny_lm(seed=4)
    assert not torch.equal(next(a.model.parameters()), next(c.model.parameters()))


def test_load_model_from_folder_is_cached(tiny_folder):
    lm = llm.load_model(tiny_folder)
    assert lm is llm.load_model(str(tiny_folder))
    assert lm.model_id == str(tiny_folder.resolve())
    assert lm.device.type in ("cpu", "cuda") and not lm.model.training
    reference = llm.tiny_lm(seed=0)
    torch.testing.assert_close(lm.next_token_logits(["Hi"]), reference.next_token_logits(["Hi"]))


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        llm.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="Cannot load model"):
        llm.load_model(tmp_path / "empty")


def test_adapter_metadata_roundtrip(tmp_path):
    meta = llm.write_adapter_metadata(tmp_path, base_model="m", prompt_name="rank", prompt_sha256="ab",
                                      metrics={"ndcg@10": 0.1}, fusion_weight=0.7, training_data={"users": 3})
    assert llm.read_adapter_metadata(tmp_path) == meta
    assert meta["label_scheme"] == "letters" and meta["max_candidates"] == 20
    (tmp_path / llm.ADAPTER_METADATA).write_text('{"base_model": "m"}')
    with pytest.raises(AdapterError, match="lacks"):
        llm.read_adapter_metadata(tmp_path)
    with pytest.raises(AdapterError, match="label scheme"):
        llm.write_adapter_metadata(tmp_path, base_model="m", prompt_name="rank", prompt_sha256="ab",
                                   label_scheme="titles")


def test_adapter_loads_on_its_base_and_changes_the_model(tiny_folder, tmp_path):
    base = llm.load_model(tiny_folder)
    folder = _adapter(base, tmp_path / "ada", fusion_weight=0.3, metrics={"ndcg@10": 0.2})
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    tuned = llm.load_model(tiny_folder, adapter=folder)
    assert tuned is llm.load_model(tiny_folder, adapter=str(folder))
    assert tuned.adapter_id == "ada" and tuned.model_id == base.model_id
    assert tuned.adapter_metadata["fusion_weight"] == 0.3
    assert not torch.allclose(tuned.next_token_logits(["Hi"]), base.next_token_logits(["Hi"]))
    # the cached base model was not modified by merging the adapter
    torch.testing.assert_close(base.next_token_logits(["Hi"]), llm.tiny_lm(seed=0).next_token_logits(["Hi"]))


def test_adapter_merge_is_cached_and_loads_without_peft(tiny_folder, tmp_path, monkeypatch):
    from recllm.llm import load

    monkeypatch.setenv("RECLLM_MODELS_CACHE", str(tmp_path / "models"))
    folder = _adapter(llm.load_model(tiny_folder), tmp_path / "ada")
    fresh = llm.apply_adapter(load._load_base(tiny_folder), folder)  # the merge done in memory
    first = load._load_merged(tiny_folder, str(folder), False)
    merged = list((tmp_path / "models" / "merged").iterdir())
    assert len(merged) == 1 and merged[0].name.startswith(f"{tiny_folder.name}+ada-")
    calls = []
    monkeypatch.setattr(load, "apply_adapter", lambda *a, **k: calls.append(a))
    again = load._load_merged(tiny_folder, str(folder), False)  # from the cache: no merge, no peft
    assert calls == [] and again.adapter_id == "ada" and again.adapter_metadata == first.adapter_metadata
    for lm in (first, again):
        torch.testing.assert_close(lm.next_token_logits(["Hi there"]), fresh.next_token_logits(["Hi there"]),
                                   rtol=0, atol=0)
    with pytest.raises(AdapterError, match="trained on base model"):  # metadata still checked on a cached merge
        load._load_merged(tiny_folder, str(_adapter(llm.tiny_lm(0), tmp_path / "other", base_model="x")), False)


def test_dtype_and_threads_from_the_environment(monkeypatch):
    from recllm.llm import load

    before = torch.get_num_threads()
    monkeypatch.setenv("RECLLM_DEVICE", "cpu")
    try:
        monkeypatch.setenv("RECLLM_THREADS", "1")
        assert load._device_and_dtype() == ("cpu", torch.float32)  # the CPU default (see bench/bench_kernels.py)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("RECLLM_DTYPE", "bf16")
        assert load._device_and_dtype() == ("cpu", torch.bfloat16)
        monkeypatch.setenv("RECLLM_DTYPE", "int4")
        with pytest.raises(ModelError, match="RECLLM_DTYPE must be float32 or bfloat16"):
            load._device_and_dtype()
        monkeypatch.setenv("RECLLM_DTYPE", "float32")
        monkeypatch.setenv("RECLLM_THREADS", "two")
        with pytest.raises(ModelError, match="RECLLM_THREADS"):
            load._device_and_dtype()
        monkeypatch.setenv("RECLLM_THREADS", "auto")
        torch.set_num_threads(2)
        monkeypatch.setattr(load, "_busy", lambda: False)
        load._device_and_dtype()
        assert torch.get_num_threads() == 2  # an idle machine: torch's own setting stays
        monkeypatch.setattr(load, "_busy", lambda: True)
        load._device_and_dtype()
        assert torch.get_num_threads() == 1  # every core busy: one thread
    finally:
        torch.set_num_threads(before)


def test_adapter_on_another_base_is_refused(tiny_lm, tiny_folder, tmp_path):
    folder = _adapter(llm.load_model(tiny_folder), tmp_path / "ada")
    with pytest.raises(AdapterError, match="trained on base model") as err:
        llm.apply_adapter(tiny_lm, folder)
    assert "\n" not in str(err.value) and "--model" in str(err.value)
    with pytest.warns(UserWarning, match="trained on base model"):
        forced = llm.apply_adapter(tiny_lm, folder, allow_mismatch=True)
    assert forced.adapter_id == "ada"


def test_adapter_with_changed_rank_prompt_is_refused(tiny_folder, tmp_path, monkeypatch):
    folder = _adapter(llm.load_model(tiny_folder), tmp_path / "ada")
    prompts = tmp_path / "prompts"
    shutil.copytree(load_prompt("rank").path.parent, prompts)
    (prompts / "rank.txt").write_text((prompts / "rank.txt").read_text().replace("next", "now"))
    monkeypatch.setenv("RECLLM_PROMPTS", str(prompts))
    with pytest.raises(AdapterError, match="prompt 'rank'.*retrain") as err:
        llm.load_model(tiny_folder, adapter=folder)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="restore that template"):
        assert llm.load_model(tiny_folder, adapter=folder, allow_mismatch=True).adapter_id == "ada"


def test_broken_or_missing_adapters(tiny_folder, tmp_path):
    base = llm.load_model(tiny_folder)
    with pytest.raises(AdapterError, match="Adapter not found"):
        llm.load_model(tiny_folder, adapter=tmp_path / "nope")
    folder = _adapter(base, tmp_path / "ada")
    with pytest.raises(AdapterError, match="already exists"):
        _adapter(base, folder)
    no_meta = tmp_path / "no-meta"
    shutil.copytree(folder, no_meta)
    (no_meta / llm.ADAPTER_METADATA).unlink()
    with pytest.raises(AdapterError, match="recllm_adapter.json"):
        llm.apply_adapter(base, no_meta)
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    weights = truncated / llm.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="Cannot load adapter truncated"):
        llm.apply_adapter(base, truncated)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / llm.ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        llm.apply_adapter(base, pickled)


def test_default_tokenizer_is_the_real_smollm2():
    tok = llm.default_tokenizer()
    assert len(tok) == 49152
    assert tok.tokenize("(A)") == ["(", "A", ")"]
    assert "<|im_start|>" in tok.all_special_tokens
