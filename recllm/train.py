"""`recllm train`: LoRA-tune the ranking LLM the LlamaRec way and write an adapter folder.

Training examples come from the TRAIN split only: for a user's train sequence s and a cut t, the history is
s[:t] (the prompt shows its last `max_history` titles), the fitted collaborative retriever ranks every item
not in that history, and when the true next item s[t] is among its top 20 the example is kept, with the 20
candidates in a shuffled order (so every letter is the answer equally often) and the target = its letter.
The prompt is exactly the ranker's (`LLMRanker.build_prompt`), so the adapter metadata pins its template hash.
The loss is the cross-entropy over the candidate-letter logits at the answer slot (`llm.train_letter_lora`:
transformers' Trainer, checkpoints, resume, the best validation step kept).

After training, the retriever/LLM fusion weight (`rank.fuse`) is chosen on the validation split and stored
as `fusion_weight`, and validation/test metrics (LlamaRec protocol, `evaluate.rerank`) go into the metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recllm import evaluate, metrics, paths, split
from recllm.errors import InputError
from recllm.fusion import choose_fusion_weight, phase_metrics, retrieve, score_phase




@dataclass
class TrainConfig:
    """What `recllm train` builds and how long it trains. Defaults fit a 2-core CPU in ~25 minutes."""

    max_history: int = 10  # history titles shown in the prompt (RankConfig.max_history, stored in the adapter)
    title_chars: int = 30  # each title cut to this many characters (RankConfig.title_chars)
    history_len: int = evaluate.HISTORY_LEN  # history items handed to the ranker (the prompt shows max_history)
    n_candidates: int = evaluate.N_CANDIDATES  # retriever candidates per prompt (letters A..T)
    cuts_per_user: int = 3  # train examples tried per user: the most recent cuts of the train sequence
    min_history: int = 3  # shortest history prefix used for an example
    max_examples: int = 0  # cap on training examples after filtering (0: all kept)
    r: int = 8  # LoRA rank
    alpha: int = 16  # LoRA alpha
    dropout: float = 0.05  # LoRA dropout
    lora_layers: int = 0  # LoRA on the top N decoder layers only (0: all layers)
    lr: float = 1e-3  # AdamW learning rate (linear decay)
    batch_size: int = 4  # examples per optimizer step
    epochs: float = 1.0  # passes over the examples
    max_steps: int = -1  # stop after this many steps (-1: epochs decide)
    warmup_steps: int = 5  # linear warm-up steps
    eval_steps: int = 25  # validation NDCG@10 every N steps (checkpoints at the same steps)
    eval_users: int = 40  # fixed validation users scored at each evaluation step (true item retrieved)
    fusion_users: int = 0  # validation users (true item retrieved) for the fusion-weight grid (0: all)
    test_metrics: bool = True  # also score the test split and store the metrics in the adapter
    explain_examples: int = 0  # explanation examples (recllm.explain_train) taught to the same adapter (0: none)
    explain_cuts_per_user: int = 2  # explanation examples tried per user (the most recent cuts)
    init_adapter: str = ""  # start the LoRA weights from this adapter folder (e.g. the shipped one)
    dialogues: str = ""  # ReDial-format dialogues (JSONL): also learn to rank from conversations (rank_chat)
    dialogue_movies: str = ""  # the dialogues' movie catalog (item_id,title)
    dialogue_link: str = ""  # link that catalog to this one by title + year ("movielens": the bundled one)
    dialogue_examples: int = 0  # cap on conversation examples (0: every one the tune dialogues give)
    genres: int = 0  # genres shown after each title in the rank prompt (RankConfig.genres; 0: titles only)
    show_band: bool = False  # show each candidate's retriever rank in the prompt (RankConfig.show_band)
    seed: int = 0  # example order, candidate shuffles, LoRA init
    threads: int = 1  # torch CPU threads (1 is fastest on a busy machine: OpenMP spins on shared cores)

    def rank_config(self) -> dict:
        rich = {"genres": self.genres, "show_band": self.show_band} if self.genres or self.show_band else {}
        return {"max_history": self.max_history, "max_candidates": self.n_candidates,
                "title_chars": self.title_chars, "show_year": False, **rich}


def _config_from_dict(values: dict) -> TrainConfig:
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"Unknown training config keys: {', '.join(unknown)}")
    return TrainConfig(**values)


# ---------------------------------------------------------------- candidates and examples




def build_examples(data: split.EvalData, score_fn, titles: list[str], build_prompt, cfg: TrainConfig,
                   ) -> tuple[list[tuple[str, int, int]], dict]:
    """(prompt, target letter index, n candidates) from the train split, and counts for the metadata."""
    rng = np.random.default_rng(cfg.seed)
    hists, targets = [], []
    for seq in data.train:
        for t in range(max(cfg.min_history, len(seq) - cfg.cuts_per_user), len(seq)):
            hists.append(seq[:t])
            targets.append(int(seq[t]))
    top, _ = retrieve(score_fn, hists, cfg.n_candidates)
    examples, letters = [], np.zeros(cfg.n_candidates, dtype=np.int64)
    for hist, target, cands in zip(hists, targets, top):
        cands = [int(c) for c in cands if c >= 0]
        if target not in cands:
            continue
        lines = [_banded_line(titles[c], n + 1) for n, c in enumerate(cands)]  # retriever rank before the shuffle
        shuffle = rng.permutation(len(cands))  # letters uniform over the answer
        cands, lines = [cands[i] for i in shuffle], [lines[i] for i in shuffle]
        label = cands.index(target)
        letters[label] += 1
        prompt = build_prompt([titles[i] for i in hist[-cfg.history_len:]], lines)
        examples.append((prompt, label, len(cands)))
    tried = len(hists)
    order = rng.permutation(len(examples))
    if cfg.max_examples and len(examples) > cfg.max_examples:
        order = order[: cfg.max_examples]
    examples = [examples[i] for i in order]
    stats = {"cuts_tried": tried, "true_item_retrieved": int(letters.sum()), "examples": len(examples),
             "retrieved_rate": round(float(letters.sum()) / max(tried, 1), 4)}
    return examples, stats


def _banded_line(title, band: int):
    from recllm.rank import Line

    line = title if isinstance(title, Line) else Line(str(title))
    return line._replace(band=band)


# ---------------------------------------------------------------- the run


def _retriever_for(data, catalog, interactions, retriever, work: Path, seed: int, progress: bool):
    """A fitted CollaborativeRetriever: the given folder, one saved in `work` earlier (resume), or fit one."""
    from recllm import seqrec

    if hasattr(retriever, "scores_idx"):  # already loaded (or any object with scores_idx/weights/meta)
        if isinstance(retriever, seqrec.CollaborativeRetriever):
            seqrec.check_fitted_on(retriever, data)
        return retriever, None
    folder = Path(retriever) if retriever else work / "retriever"
    if folder.is_dir() and (folder / seqrec.FUSION_FILE).is_file():
        fitted = seqrec.CollaborativeRetriever.load(folder)
        seqrec.check_fitted_on(fitted, data)
        return fitted, folder
    if retriever:
        raise InputError(f"No fitted retriever in {retriever}")
    try:
        content = split.content_matrix(data, catalog, interactions, progress=progress)
    except Exception as exc:  # noqa: BLE001 - no embedding model: fit without the content signal
        print(f"recllm: fitting the retriever without the content signal: {exc}", file=sys.stderr)
        content = None
    fitted = seqrec.fit_on_split(data, seed=seed, content=content, progress=progress, content_texts=split.CONTENT_TEXTS)
    fitted.save(folder)
    return fitted, folder


def train(catalog=None, interactions=None, *, model=None, out: str | Path | None = None, resume: bool = False,
          config: TrainConfig | None = None, retriever: str | Path | None = None, work_dir: str | Path | None = None,
          default: bool = False, progress: bool = True, finish: bool = False) -> Path:
    """Train a LoRA ranking adapter and write it to `out` (atomically); returns the folder.

    catalog / interactions: paths or loaded objects (None: bundled MovieLens). model: base model (None: the
    packaged SmolLM2), or an already loaded `llm.LM`. retriever: a fitted retriever folder or a loaded
    `seqrec.CollaborativeRetriever` (None: fit one on the train split, kept in the work folder).
    work_dir: checkpoints (default `<home>/train/<out name>`); `resume` continues there; `finish` (implies
      resume) stops the run there: no more steps, the adapter is written from its best evaluated step so far.
    default: mark the adapter as the default one for its base model (engine loads it automatically).
    """
    from recllm import llm
    from recllm.explain_train import explain_metadata
    from recllm.rank import Line, LLMRanker, RankConfig

    cfg = config or TrainConfig()
    t0 = time.monotonic()
    catalog, interactions = split.load_inputs(catalog, interactions)
    data = split.prepare(catalog, interactions)
    model_name = model.model_id if isinstance(model, llm.LM) else str(model or llm.DEFAULT_MODEL)
    out = Path(out) if out is not None else paths.adapters_dir() / f"{_slug(model_name)}-{_slug(data.name)}"
    if out.exists():
        raise InputError(f"Adapter folder {out} already exists: choose another --out or remove it")
    work = Path(work_dir) if work_dir is not None else paths.home() / "train" / out.name
    resume = resume or finish
    if resume and not work.is_dir():
        raise InputError(f"Nothing to resume: {work} does not exist")
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    fitted, retriever_dir = _retriever_for(data, catalog, interactions, retriever, work, cfg.seed, progress)
    score_fn = fitted.scores_idx
    titles = [Line.of(catalog.get(i)) for i in data.item_ids]  # title and genres, as the prompt may show them
    base = model if isinstance(model, llm.LM) else llm.load_model(model)
    rank_cfg = RankConfig(**cfg.rank_config())
    ranker = LLMRanker(base, config=rank_cfg)

    t = time.monotonic()
    examples, example_stats = build_examples(data, score_fn, titles, ranker.build_prompt, cfg)
    if not examples:
        raise InputError("No training examples: the retriever never ranked the true next item in its top "
                         f"{cfg.n_candidates} on the train split")
    lengths = [base.token_count(p) for p, _, _ in examples[:200]]
    example_stats.update(prompt_tokens_mean=round(float(np.mean(lengths)), 1), prompt_tokens_max=int(max(lengths)),
                         build_seconds=round(time.monotonic() - t, 1))
    print(f"recllm: {len(examples)} training examples ({example_stats['retrieved_rate']:.1%} of cuts retrieved "
          f"the true item), ~{example_stats['prompt_tokens_mean']:.0f} prompt tokens", file=sys.stderr)

    text_examples, explain_stats = [], None
    if cfg.explain_examples:
        from recllm.explain_train import examples_for_training

        text_examples, explain_stats = examples_for_training(data, catalog, interactions, base, cfg, progress)

    dialogue_stats = None
    if cfg.dialogues:
        from recllm.convllm import dialogue_examples

        if not cfg.dialogue_movies:
            raise InputError("--dialogues needs --dialogue-movies (the dialogues' movie catalog)")
        talk, dialogue_stats = dialogue_examples(
            cfg.dialogues, cfg.dialogue_movies, ranker.build_prompt, link_to=cfg.dialogue_link or None,
            n_candidates=cfg.n_candidates, max_examples=cfg.dialogue_examples, seed=cfg.seed, progress=progress)
        print(f"recllm: {len(talk)} conversation examples (tune dialogues only)", file=sys.stderr)
        examples = examples + talk

    valid_ranking = evaluate.rank_all(score_fn, data, "valid")

    def eval_fn(lm) -> dict:
        started = time.monotonic()
        scorer = LLMRanker(lm, config=rank_cfg)
        sc = score_phase(scorer, data, score_fn, titles, "valid", users=cfg.eval_users, seed=cfg.seed,
                         ranking=valid_ranking)
        sub = {"ndcg10": [], "fused": []}
        for u, l, r in zip(sc.users, sc.llm, sc.retriever):
            target = int(data.valid[u])
            cands = [int(i) for i in valid_ranking.top[u] if i >= 0]
            for key, w in (("ndcg10", 1.0), ("fused", 0.5)):
                from recllm.rank import fuse

                order = [cands[i] for i in np.argsort(-fuse(l, r, w), kind="stable")]
                sub[key].append(metrics.rank_in_list(order, target))
        return {"ndcg10": metrics.ndcg_at_k(sub["ndcg10"], 10),  # LLM order alone, on the fixed subset
                "ndcg10_fused05": metrics.ndcg_at_k(sub["fused"], 10),
                "retriever_ndcg10": metrics.ndcg_at_k(valid_ranking.ranks[sc.users], 10),
                "users": len(sc.users), "seconds": round(time.monotonic() - started, 1)}

    t = time.monotonic()
    tuned, info = llm.train_letter_lora(
        base, examples, letter_ids=ranker.letter_ids, output_dir=work / "checkpoints", evaluate=eval_fn,
        r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, layers=cfg.lora_layers or None, batch_size=cfg.batch_size,
        lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
        eval_steps=cfg.eval_steps, save_steps=cfg.eval_steps, seed=cfg.seed, resume=resume, finish=finish,
        progress=progress, threads=cfg.threads, text_examples=text_examples,
        init_adapter=_init_adapter(cfg.init_adapter), keep_best=not text_examples,
    )
    train_wall = time.monotonic() - t
    evals = [h for h in info["log_history"] if "eval_ndcg10" in h]
    eval_seconds = sum(h.get("eval_seconds", 0.0) for h in evals)
    steps_here = info["global_step"] - _resumed_step(info)
    examples_per_s = steps_here * cfg.batch_size / train_wall if train_wall > 0 else None

    # Fusion weight on validation, then test metrics, with the chosen (best) weights merged in.
    tuned_ranker = LLMRanker(tuned, config=rank_cfg)
    t = time.monotonic()
    valid_scores = score_phase(tuned_ranker, data, score_fn, titles, "valid", users=cfg.fusion_users, seed=cfg.seed,
                               progress=progress, ranking=valid_ranking)
    weight, grid = choose_fusion_weight(valid_scores, data)
    result_metrics = {"valid": phase_metrics(valid_scores, data, weight), "fusion_grid_valid_ndcg10": grid}
    if cfg.fusion_users:
        result_metrics["valid"]["note"] = f"fusion chosen on {len(valid_scores.users)} sampled retrieved users"
    if cfg.test_metrics:
        test_scores = score_phase(tuned_ranker, data, score_fn, titles, "test", progress=progress)
        result_metrics["test"] = phase_metrics(test_scores, data, weight)
        test_scores.save(work / "scores-test.npz")
    valid_scores.save(work / "scores-valid.npz")
    eval_wall = time.monotonic() - t

    from recllm.seqrec import data_fingerprint

    meta = dict(
        prompt_name=ranker.prompt.name, prompt_sha256=ranker.prompt.sha256, label_scheme="letters",
        max_candidates=cfg.n_candidates, fusion_weight=weight, default=bool(default), seed=cfg.seed,
        rank_config=cfg.rank_config(),
        prompt_parts=[{"name": "rank_lines", "sha256": ranker.lines_sha256}] if cfg.genres or cfg.show_band else [],
        training_data={
            "catalog": catalog.name, "split": "train (chronological leave-one-out, 5-core)",
            "data_fingerprint": data_fingerprint(data), "users": data.n_users, "items": data.n_items,
            "interactions": data.stats.get("interactions"), **example_stats,
            "retriever": {"path": str(retriever_dir) if retriever_dir else None,
                          "weights": getattr(fitted, "weights", None),
                          "valid_ndcg10_fused": getattr(fitted, "meta", {}).get("valid_ndcg10_fused"),
                          "seed": getattr(fitted, "meta", {}).get("seed")},
        },
        hyperparameters={**asdict(cfg), "lora_target_modules": info["lora"]["target_modules"],
                         "lora_layer_indices": info["lora"]["layers"],
                         "loss": "cross-entropy over candidate-letter logits"},
        tasks=["rank"] + (["rank_chat"] if dialogue_stats else []) + (["explain"] if text_examples else []),
        chat_prompt={"name": ranker.chat_prompt.name, "sha256": ranker.chat_prompt.sha256} if dialogue_stats
        else None,
        conversations=dialogue_stats,
        explain=explain_metadata(explain_stats) if text_examples else None,
        metrics={**result_metrics, "eval_history": evals, "best_step_valid_ndcg10": info["best_metric"]},
        training={"global_step": info["global_step"], "best_checkpoint": info["best_checkpoint"],
                  "train_wall_s": round(train_wall, 1), "eval_during_training_s": round(eval_seconds, 1),
                  "examples_per_s": round(examples_per_s, 4) if examples_per_s else None,
                  "trainer_samples_per_s": info["train_samples_per_second"], "device": info["device"],
                  "resumed_from": info["resumed_from"], "stopped_early": bool(finish),
                  "final_eval_s": round(eval_wall, 1),
                  "total_s": round(time.monotonic() - t0, 1)},
    )
    folder = llm.save_adapter(tuned, out, **meta)
    return folder


def _init_adapter(value: str) -> Path | None:
    if not value:
        return None
    from recllm.llm.adapters import resolve_adapter

    return resolve_adapter(value)


def _resumed_step(info: dict) -> int:
    start = info.get("resumed_from")
    if not start:
        return 0
    try:
        return int(Path(start).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in Path(text).name)
    slug = "-".join(p for p in keep.split("-") if p)
    return slug[:60] or hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `recllm train` (the CLI registers the subcommand with these)."""
    d = TrainConfig()
    parser.add_argument("--catalog", help="catalog CSV/JSONL (default: bundled MovieLens)")
    parser.add_argument("--interactions", help="interactions CSV (default: bundled MovieLens ratings)")
    parser.add_argument("--model", help="base model: HF id in the local cache, folder or .gguf (default: SmolLM2)")
    parser.add_argument("--out", help="adapter folder to write (default: adapters/<model>-<catalog>)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--finish", action="store_true",
                        help="stop a run early: train no further, write the adapter from the best checkpoint so far")
    parser.add_argument("--retriever", help="a fitted retriever folder (default: fit one on the train split)")
    parser.add_argument("--work-dir", help="checkpoints folder (default: <home>/train/<adapter name>)")
    parser.add_argument("--default", action="store_true", help="mark the adapter as the default for its base model")
    parser.add_argument("--config", help="JSON file of TrainConfig fields (the options below override it)")
    parser.add_argument("--examples", type=int, default=None,
                        help=f"cap on training examples (default {d.max_examples or 'all'})")
    parser.add_argument("--epochs", type=float, default=None, help=f"passes over the examples (default {d.epochs})")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help=f"examples per step (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d.lr})")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help=f"evaluate and checkpoint every N steps (default {d.eval_steps})")
    parser.add_argument("--eval-users", type=int, default=None,
                        help=f"validation users per evaluation (default {d.eval_users})")
    parser.add_argument("--lora-layers", type=int, default=None, help="LoRA on the top N layers only (default: all)")
    parser.add_argument("--explain-examples", type=int, default=None,
                        help="also teach the adapter to explain: N explanation examples from the train split "
                             f"(default {d.explain_examples}: ranking only)")
    parser.add_argument("--init-adapter", default=None,
                        help="start from this adapter's LoRA weights (a folder or a name under adapters/)")
    parser.add_argument("--dialogues", default=None,
                        help="also learn to rank from conversations: ReDial-format dialogues (JSONL); only the "
                             "tune half that eval-conversations never reports on is used")
    parser.add_argument("--dialogue-movies", default=None, help="the dialogues' movie catalog (item_id,title)")
    parser.add_argument("--dialogue-link", default=None,
                        help="link the dialogues' movies to a catalog with genres by title + year (movielens)")
    parser.add_argument("--dialogue-examples", type=int, default=None,
                        help="cap on conversation examples (default: all)")
    parser.add_argument("--genres", type=int, default=None,
                        help="show up to N genres after each title in the rank prompt (default: titles only)")
    parser.add_argument("--show-band", action="store_true", default=None,
                        help="show each candidate's retriever rank in the rank prompt")
    parser.add_argument("--seed", type=int, default=None, help=f"seed (default {d.seed})")
    parser.add_argument("--no-test", action="store_true", help="skip scoring the test split after training")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = json.loads(Path(args.config).read_text()) if getattr(args, "config", None) else {}
    cfg = _config_from_dict(values)
    for arg, name in (("examples", "max_examples"), ("epochs", "epochs"), ("max_steps", "max_steps"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("eval_steps", "eval_steps"),
                      ("eval_users", "eval_users"), ("lora_layers", "lora_layers"), ("seed", "seed"),
                      ("explain_examples", "explain_examples"), ("init_adapter", "init_adapter"),
                      ("genres", "genres"), ("show_band", "show_band"), ("dialogues", "dialogues"),
                      ("dialogue_movies", "dialogue_movies"), ("dialogue_link", "dialogue_link"),
                      ("dialogue_examples", "dialogue_examples")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, name, value)
    if getattr(args, "no_test", False):
        cfg.test_metrics = False
    return cfg


def run(args: argparse.Namespace) -> int:
    """`recllm train`: prints the adapter folder and its headline metrics."""
    cfg = config_from_args(args)
    folder = train(args.catalog, args.interactions, model=args.model, out=args.out, resume=args.resume, finish=args.finish, config=cfg,
                   retriever=args.retriever, work_dir=args.work_dir, default=args.default, progress=not args.quiet)
    from recllm.llm import read_adapter_metadata

    meta = read_adapter_metadata(folder)
    m = meta.get("metrics", {})
    print(f"adapter {folder}")
    print(f"fusion weight {meta.get('fusion_weight')} (chosen on validation)")
    for phase in ("valid", "test"):
        if phase in m:
            p = m[phase]
            print(f"{phase}: NDCG@10 retriever {p['retriever']['ndcg@10']:.4f} -> fused {p['fused']['ndcg@10']:.4f}; "
                  f"Recall@10 {p['retriever']['recall@10']:.4f} -> {p['fused']['recall@10']:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recllm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
