"""The GPU path, end to end, in one run: load the default model (+ shipped adapter), rank, explain, a short
`recllm train`, and `recllm batch` under torchrun, on CUDA in bfloat16 when a GPU is present (`--cpu`: on the
CPU, float32). Prints users/s ranking, tokens/s explaining, training examples/s, batch rows/s; `--llm-url` adds
the same ranking / explaining figures through an LLM server (vLLM, `make vllm-serve`).

    .venv/bin/python bench/gpu_check.py                        # CUDA (bf16); sizes for a GPU
    .venv/bin/python bench/gpu_check.py --cpu --small          # what runs on a 2-core CPU in a few minutes
    .venv/bin/python bench/gpu_check.py --llm-url http://127.0.0.1:8001 ...

Data: the bundled MovieLens (its embedded Chroma index is built under --home on first use) and the shipped
fitted retriever. Ranking: `users` users (at least 21 ratings), history = their ratings but the last, the
retriever's top 20 candidates, LLM scores in batches of --batch-size (figure: users/s of the LLM step alone, and
of `Recommender.recommend_many` end to end with explain=0). Explaining: `explain` explanation prompts generated
in ONE batch (`LM.stream_many`), greedy, up to 48 new tokens each (figure: generated tokens/s). Training:
`recllm train` on `--train-examples` examples for `--train-steps` steps (figure: the examples/s the run records in
its adapter metadata). Batch: `torchrun --nproc_per_node N -m recllm batch` over `--batch-rows` rows (figure:
rows/s of the whole command, model loading included). Each phase is timed; the run stops phases that would go
past --budget-s (default 540 s). One JSON object with every figure is printed last (`--json` for only that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (float32) even when CUDA is present")
    p.add_argument("--small", action="store_true", help="CPU-sized runs: 16 users, 4 explanations, 4 train steps, "
                                                        "8 batch rows")
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass when ranking")
    p.add_argument("--explain", type=int, default=32, help="explanations generated in one batch")
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--nproc", type=int, default=None, help="torchrun processes (default: GPUs, or 2 on --cpu)")
    p.add_argument("--llm-url", help="also rank and explain through this LLM server (vLLM)")
    p.add_argument("--home", help="data home (default: a temporary folder; the model cache is kept in "
                                  "$RECLLM_MODELS_CACHE or ~/.cache/recllm-models)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip phases that would start past this")
    p.add_argument("--skip", nargs="*", default=[], choices=["rank", "explain", "train", "batch", "remote"])
    p.add_argument("--json", action="store_true", help="print only the JSON figures on stdout")
    args = p.parse_args(argv)
    if args.small:
        args.users, args.batch_size, args.explain = min(args.users, 16), min(args.batch_size, 8), min(args.explain, 4)
        args.train_examples, args.train_steps, args.train_batch = 40, 4, 2
        args.batch_rows = min(args.batch_rows, 8)
    return args


def environment(args) -> dict:
    """Device and dtype as recllm will pick them (RECLLM_DEVICE is set for every phase and subprocess)."""
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    os.environ["RECLLM_DEVICE"] = "cuda" if cuda else "cpu"
    info = {"device": "cuda" if cuda else "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    else:
        info["dtype"] = "float32"
        info["cuda_present"] = torch.cuda.is_available()
    return info


def sample_users(rec, n: int) -> list[str]:
    users = [u for u in rec.interactions.users if len(rec.interactions.history(u)) > 20]
    return users[:n]


def rank_phase(rec, lm, users: list[str], batch_size: int, label: str) -> dict:
    """Users/s of the LLM step alone (prompts prepared first), and of recommend_many end to end."""
    from recllm.rank import LLMRanker
    from recllm.request import Request

    ranker = LLMRanker(lm)
    ranker.config.batch_size = batch_size
    requests = []
    for u in users:
        history = rec.interactions.history(u)[:-1]
        candidates = rec.retriever.retrieve(history=history, k=20)
        requests.append(([rec.catalog.get(h).label for h in history], candidates))
    ranker.rank_many(requests[: min(len(requests), batch_size)])  # warm-up (kernels, caches)
    sync()
    t = time.perf_counter()
    ranked = ranker.rank_many(requests)
    sync()
    llm_s = time.perf_counter() - t
    assert all(len(r) == len(c) for r, (_, c) in zip(ranked, requests))
    rec._lm, rec._ranker = lm, None  # the engine on this model
    rec.ranker.config.batch_size = batch_size
    t = time.perf_counter()
    results = rec.recommend_many([Request(user=u, k=10, explain=0) for u in users])
    e2e_s = time.perf_counter() - t
    errors = [r for r in results if isinstance(r, Exception)]
    out = {"users": len(users), "batch_size": batch_size, "llm_users_per_s": round(len(users) / llm_s, 2),
           "end_to_end_users_per_s": round(len(users) / e2e_s, 2), "errors": len(errors)}
    log(f"[{label}] ranking: {out['llm_users_per_s']} users/s (LLM step), {out['end_to_end_users_per_s']} users/s "
        f"end to end, {len(users)} users, batch {batch_size}")
    return out


def explain_phase(rec, lm, users: list[str], n: int, label: str) -> dict:
    """Generated tokens/s: `n` explanation prompts in one batch (`stream_many`), greedy, 48 new tokens at most."""
    from recllm.explain import Explainer
    from recllm.request import Request

    explainer = Explainer(lm, titles=rec.plain_explainer.matcher)
    prompts = []
    for u in users:
        if len(prompts) >= n:
            break
        result = rec.recommend(Request(user=u, k=3, explain=0))
        for r in result.recommendations:
            if len(prompts) < n:
                ev = rec.evidence(r.item_id, result.history)
                prompts.append(explainer.build_prompt(rec.catalog.get(r.item_id), ev))
    cfg = explainer.config
    texts = [""] * len(prompts)
    sync()
    t = time.perf_counter()
    first = None
    for row, piece in lm.stream_many(prompts, cfg.max_new_tokens, stop=("\n",), repetition_penalty=cfg.repetition_penalty):
        if piece:
            first = first or time.perf_counter() - t
            texts[row] += piece
    sync()
    wall = time.perf_counter() - t
    tokens = sum(lm.token_count(x) for x in texts)
    out = {"prompts": len(prompts), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
           "first_piece_s": round(first or 0.0, 3), "wall_s": round(wall, 2)}
    log(f"[{label}] explaining: {out['tokens_per_s']} tokens/s ({tokens} tokens, {len(prompts)} prompts in one batch)")
    return out


def train_phase(args, home: Path) -> dict:
    """`recllm train` for a few steps; examples/s as the run records it (adapter metadata `training`)."""
    out_dir = home / "gpu-check-adapter"
    cmd = [sys.executable, "-m", "recllm", "train", "--out", str(out_dir), "--examples", str(args.train_examples),
           "--max-steps", str(args.train_steps), "--batch-size", str(args.train_batch),
           "--eval-steps", str(max(args.train_steps, 1)), "--eval-users", "8", "--no-test", "--quiet",
           "--retriever", str(ROOT / "recllm" / "data" / "retrievers" / "ml-latest-small")]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    wall = time.perf_counter() - t
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1)}
    meta = json.loads((out_dir / "recllm_adapter.json").read_text())
    training = meta.get("training", {})
    out = {"examples": meta.get("training_data", {}).get("examples"), "steps": training.get("global_step"),
           "batch": args.train_batch, "examples_per_s": training.get("examples_per_s"),
           "train_wall_s": training.get("train_wall_s"), "device": training.get("device"), "wall_s": round(wall, 1)}
    log(f"[train] {out['examples_per_s']} examples/s ({out['steps']} steps × {args.train_batch}, "
        f"device {out['device']}); whole command {out['wall_s']} s")
    return out


def batch_phase(args, home: Path, users: list[str], nproc: int) -> dict:
    rows = home / "gpu-check-rows.jsonl"
    with rows.open("w") as f:
        for i in range(args.batch_rows):
            f.write(json.dumps({"id": f"r{i}", "user": users[i % len(users)], "k": 10}) + "\n")
    out_path = home / "gpu-check-out.jsonl"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m", "recllm", "batch",
           str(rows), "-o", str(out_path), "--explain", "0", "--ranker", "llm", "--batch-size", "16"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc))))
    wall = time.perf_counter() - t
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1)}
    lines = [json.loads(x) for x in out_path.read_text().splitlines() if x.strip()]
    out = {"rows": len(lines), "errors": sum("error" in x for x in lines), "processes": nproc,
           "rows_per_s": round(len(lines) / wall, 2), "wall_s": round(wall, 1)}
    log(f"[batch] torchrun × {nproc}: {out['rows_per_s']} rows/s ({out['rows']} rows, {out['errors']} errors, "
        f"model loading included)")
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available() and os.environ.get("RECLLM_DEVICE", "").startswith("cuda"):
        torch.cuda.synchronize()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("RECLLM_MODELS_CACHE", str(Path.home() / ".cache" / "recllm-models"))
    tmp = None
    if args.home:
        home = Path(args.home)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="recllm-gpu-check-")
        home = Path(tmp.name)
    os.environ["RECLLM_HOME"] = str(home)
    figures: dict = {"environment": environment(args), "sizes": {k: getattr(args, k) for k in (
        "users", "batch_size", "explain", "train_examples", "train_steps", "train_batch", "batch_rows")}}
    log(f"device {figures['environment']['device']} ({figures['environment']['dtype']}); home {home}")

    def time_left() -> bool:
        return time.perf_counter() - started < args.budget_s

    from recllm.engine import Recommender, default_adapter
    from recllm.llm import load_model

    t = time.perf_counter()
    rec = Recommender(ranker="llm", explain=0, progress=False)  # bundled MovieLens, indexed on first use
    figures["engine_build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    lm = load_model(None, default_adapter(None))
    sync()
    figures["load"] = {"model": lm.model_id, "adapter": lm.adapter_id, "device": str(lm.device),
                       "dtype": str(next(lm.model.parameters()).dtype), "seconds": round(time.perf_counter() - t, 2)}
    log(f"[load] {lm.model_id} + {lm.adapter_id} on {lm.device} in {figures['load']['seconds']} s")
    users = sample_users(rec, max(args.users, args.explain))
    if "rank" not in args.skip and time_left():
        figures["rank"] = rank_phase(rec, lm, users[: args.users], args.batch_size, "in-process")
    if "explain" not in args.skip and time_left():
        figures["explain"] = explain_phase(rec, lm, users, args.explain, "in-process")
    if args.llm_url and "remote" not in args.skip and time_left():
        from recllm.llm.remote import RemoteLM

        remote = RemoteLM(args.llm_url, None, default_adapter(None))
        figures["remote"] = {"url": remote.url,
                             "rank": rank_phase(rec, remote, users[: args.users], args.batch_size, "vLLM server"),
                             "explain": explain_phase(rec, remote, users, args.explain, "vLLM server")}
    del rec, lm
    if "train" not in args.skip and time_left():
        figures["train"] = train_phase(args, home)
    if "batch" not in args.skip and time_left():
        import torch

        nproc = args.nproc or (torch.cuda.device_count() if figures["environment"]["device"] == "cuda" else 2)
        figures["batch"] = batch_phase(args, home, users, max(1, nproc))
    skipped = [k for k in ("rank", "explain", "train", "batch") if k not in figures and k not in args.skip]
    if skipped:
        figures["skipped_over_budget"] = skipped
    figures["total_s"] = round(time.perf_counter() - started, 1)
    log(f"total {figures['total_s']} s")
    print(json.dumps(figures, indent=None if args.json else 2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
