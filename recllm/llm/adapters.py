"""LoRA adapters: finding an adapter folder, its metadata file (`recllm_adapter.json`: base model, prompt
template name + sha256, label scheme, training data, metrics), the checks against the model and prompts/
before loading, merging it into a model, and saving one atomically.

An adapter folder holds PEFT's files (`adapter_config.json`, `adapter_model.safetensors`) plus our metadata.
Loading one on another base model, or after the prompt template it was trained with has changed, raises
AdapterError unless `allow_mismatch=True` (then a warning).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from recllm import paths
from recllm.errors import AdapterError, PromptError
from recllm.llm.model import LM

log = logging.getLogger(__name__)

ADAPTER_METADATA = "recllm_adapter.json"  # our metadata file inside an adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABEL_SCHEMES = ("letters",)  # "letters": candidates lettered (A)..(T), score = next-token logit of the letter
DAMAGED = "the folder is incomplete or damaged: copy it again or retrain it with `recllm train`"


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
        raise AdapterError(f"Adapter {Path(folder).name} has no {ADAPTER_METADATA}: "
                           "retrain it with recllm train") from None
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
    # the rank template, and the templates newer adapters also learned (rank_chat, rank_lines)
    for pinned in [meta["prompt"], meta.get("chat_prompt"), *meta.get("prompt_parts", ())]:
        if not isinstance(pinned, dict) or not {"name", "sha256"} <= set(pinned):
            continue
        prompt_name, sha = pinned["name"], pinned["sha256"]
        try:
            current = load_prompt(prompt_name).sha256
        except PromptError as exc:
            current = None
            problems.append(f"Adapter {name} needs prompt template {prompt_name!r}: {exc}")
        if current is not None and current != sha:
            problems.append(f"Adapter {name} was trained with prompt {prompt_name!r} sha256 {sha[:12]}, but the "
                            f"template now has {current[:12]}: restore that template or retrain the adapter "
                            f"(--allow-mismatch to force)")
    return problems


def checked_adapter(adapter: str | Path, model_id: str, *, allow_mismatch: bool = False) -> tuple[Path, dict]:
    """(folder, metadata) of an adapter whose metadata fits `model_id` and prompts/ (AdapterError otherwise; with
    `allow_mismatch` the problems are warnings). Used in-process (`apply_adapter`) and for a served adapter."""
    folder = resolve_adapter(adapter)
    meta = read_adapter_metadata(folder)
    problems = check_adapter(meta, model_id, folder.name)
    if problems and not allow_mismatch:
        raise AdapterError(problems[0])
    for problem in problems:
        warnings.warn(problem, stacklevel=3)
        log.warning(problem)
    return folder, meta


def apply_adapter(lm: LM, adapter: str | Path, *, allow_mismatch: bool = False, copy_model: bool = True) -> LM:
    """A new LM: `lm` with the LoRA adapter merged in, after checking its metadata against `lm` and prompts/."""
    folder, meta = checked_adapter(adapter, lm.model_id, allow_mismatch=allow_mismatch)
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


def save_adapter(lm: LM, folder: str | Path, **metadata: Any) -> Path:
    """Save the LoRA weights of `lm` (a PEFT model: `lora.add_lora`, `lora.train_letter_lora`) as a PEFT folder
    plus `recllm_adapter.json`, atomically (`paths.replace_dir`).

    `metadata` are `write_adapter_metadata`'s keyword arguments; `base_model` defaults to `lm.model_id`.
    """
    folder = Path(folder)
    if not hasattr(lm.model, "peft_config"):
        raise AdapterError("save_adapter needs an LM with LoRA layers (a PEFT model)")
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
    return paths.replace_dir(folder, build, keep=ADAPTER_METADATA)
