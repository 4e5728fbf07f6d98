"""`recllm <args>` with fault points, for tests/test_faults.py: prints `FAULT <point>` on stderr at chosen
moments (and pauses there), so a test can kill -9 it at a random moment of a chosen phase. A hash embedder
stands in for the real model and the retriever is fitted with a tiny SeqConfig, so every run takes seconds."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np


def mark(point):
    print(f"FAULT {point}", file=sys.stderr, flush=True)


def hook(owner, name, point, pause, *, before=False):
    """Mark `point` (and pause `pause` s when $FAULT_PAUSE is set) before or after each call of owner.name."""
    original = getattr(owner, name)
    pause = pause if os.environ.get("FAULT_PAUSE") else 0.0

    def wrapped(*args, **kwargs):
        if before:
            mark(point)
            time.sleep(pause)
        out = original(*args, **kwargs)
        if not before:
            mark(point)
            time.sleep(pause)
        return out

    setattr(owner, name, wrapped)


class HashEmbedder:
    model_id, dim = "hash-embedder", 16

    def encode(self, texts, batch_size=64, progress=True):
        time.sleep(0.01)
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))
                .standard_normal(self.dim) for t in texts]
        out = np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)
        mark("encoded")
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def main(argv: list[str]) -> int:
    import recllm.embed

    recllm.embed.get_embedder = lambda *args, **kwargs: HashEmbedder()
    if argv[0] == "fit-retriever":
        from recllm import seqrec
        from recllm.signals import TransitionConfig

        fit = seqrec.fit_on_split
        tiny = dict(config=seqrec.SeqConfig(dim=16, blocks=1, max_len=20, max_epochs=3, min_epochs=1, valid_users=200),
                    transition_config=TransitionConfig())  # no transition search
        seqrec.fit_on_split = lambda data, **kw: fit(data, **{**kw, **tiny})
        hook(seqrec, "fit_on_split", "fit", 0.2, before=True)
        hook(seqrec.SeqEncoder, "save", "saving", 0.8)  # the retriever's temporary folder is half written
    elif argv[0] == "train":
        import transformers
        from transformers.trainer_callback import TrainerState

        from recllm.llm import adapters

        hook(transformers.Trainer, "training_step", "step", 0.05)
        hook(TrainerState, "save_to_json", "state", 0.7, before=True)  # the checkpoint folder lacks it meanwhile
        hook(adapters, "write_adapter_metadata", "adapter", 0.8, before=True)  # the adapter's temporary folder lacks it
    from recllm.cli import main as recllm

    return recllm(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
