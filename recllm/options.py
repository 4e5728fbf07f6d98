"""The one way to build the engine from options: `EngineOptions` (used by the CLI, batch and the app).

    parser = argparse.ArgumentParser(); EngineOptions.add_arguments(parser)
    recommender = EngineOptions.from_args(parser.parse_args()).build()

Each option is defined once here, with its default and help text; `RECLLM_RANKER` sets the ranker default and
`RECLLM_LLM_URL` the LLM server's (`--llm-url`: the model is asked over HTTP, `llm.remote.RemoteLM`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields

from recllm.request import DEFAULT_EXPLAIN


@dataclass
class EngineOptions:
    """What a `Recommender` is built from (every field optional)."""

    catalog: str | None = None  # catalog CSV/JSONL or MovieLens folder (None: the bundled MovieLens)
    interactions: str | None = None  # interactions CSV (None: the bundled ratings, with the bundled catalog only)
    chroma_url: str | None = None  # a Chroma server http://host:port (None: the embedded store under the home)
    model: str | None = None  # causal LM id or folder (None: the packaged SmolLM2-135M-Instruct)
    adapter: str | None = "auto"  # "auto": the shipped adapter of the default model; "none": no adapter
    ranker: str = "llm"  # "llm": the language model re-ranks; "none": retriever order, no model loaded
    explain: int = DEFAULT_EXPLAIN  # top items explained per request
    fusion_weight: float | None = None  # LLM share of the final score (None: the adapter's, else 0.5)
    allow_mismatch: bool = False  # load an adapter trained on another base model or prompt (warning only)
    llm_url: str | None = None  # an OpenAI-compatible server (vLLM) serving the model and adapter (None: in-process)
    quiet: bool = False  # no progress bars

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, store: bool = True, interactions: bool = True,
                      ranking: bool = True, explain: bool = True) -> None:
        """Add the options as flags. `store`: --catalog/--chroma-url (and --interactions unless `interactions`
        is False); `ranking`: model, adapter, ranker, fusion weight; `explain`: --explain (callers with their own
        --explain leave it out)."""
        if store:
            parser.add_argument("--catalog", metavar="PATH", help="catalog CSV/JSONL or MovieLens folder "
                                "(default: the bundled MovieLens ml-latest-small)")
        if store and interactions:
            parser.add_argument("--interactions", metavar="PATH", help="interactions CSV "
                                "user_id,item_id,timestamp (default: the bundled ratings, with the bundled catalog)")
        if store:
            parser.add_argument("--chroma-url", metavar="URL", help="a Chroma server, http://host:port "
                                "(default: the embedded store under $RECLLM_HOME)")
        if ranking:
            parser.add_argument("--ranker", choices=("llm", "none"), default=os.environ.get("RECLLM_RANKER", "llm"),
                                help="llm: the language model re-ranks the retriever's candidates (default; "
                                     "$RECLLM_RANKER overrides); none: retriever order, no model loaded")
            parser.add_argument("--model", metavar="ID", help="Hugging Face causal LM id (local cache) or folder "
                                "(default: the packaged SmolLM2-135M-Instruct)")
            parser.add_argument("--adapter", metavar="PATH", default="auto",
                                help="LoRA adapter folder or name under adapters/; 'auto' (default): the shipped "
                                     "one for the default model; 'none': no adapter")
            parser.add_argument("--allow-mismatch", action="store_true", help="load an adapter trained on "
                                "another base model or prompt (a warning, not an error)")
            parser.add_argument("--fusion-weight", type=float, metavar="W",
                                help="LLM share of the final score, 0..1 (default: the adapter's, else 0.5)")
            parser.add_argument("--llm-url", metavar="URL", default=os.environ.get("RECLLM_LLM_URL") or None,
                                help="an OpenAI-compatible LLM server (vLLM) serving --model and --adapter, "
                                     "http://host:port (default: $RECLLM_LLM_URL, else the model runs in-process)")
        if explain:
            parser.add_argument("--explain", type=int, default=DEFAULT_EXPLAIN, metavar="N",
                                help=f"explain the top N items (default {DEFAULT_EXPLAIN}; 0: fastest)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineOptions:
        """The options a parsed command line gives (flags it lacks keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)
                  if getattr(args, f.name, None) is not None}
        return cls(**values)

    def build(self, **overrides):
        """The `engine.Recommender` these options describe (`overrides`: extra Recommender arguments)."""
        from recllm.engine import Recommender

        values = asdict(self)
        catalog, interactions = values.pop("catalog"), values.pop("interactions")
        values["progress"] = not values.pop("quiet")
        llm_url = values.pop("llm_url")
        if llm_url and self.ranker == "llm" and overrides.get("lm") is None:
            overrides["lm"] = self.remote_lm(llm_url)
        return Recommender(catalog, interactions, **{**values, **overrides})

    def remote_lm(self, url: str):
        """The model and adapter these options name, served by the LLM server at `url` (`llm.remote.RemoteLM`);
        the adapter is read as the engine reads it ("auto": the shipped one of the default model)."""
        from recllm.engine import adapter_choice, default_adapter
        from recllm.llm.remote import RemoteLM

        adapter = adapter_choice(self.adapter)
        if adapter == "auto":
            adapter = default_adapter(self.model)
        return RemoteLM(url, self.model, adapter, allow_mismatch=self.allow_mismatch)
