"""The `recllm` command line.

Each subcommand is one `add_<name>(subparsers)` function registering its parser and a `run_<name>(args)`
handler; `SUBCOMMANDS` lists them, so a new command is one function plus one line. Handlers do the work
through small functions that return plain rows (`recommend_rows`, `search_rows`) and leave printing to
`print_rows`, so the work can move to `engine.Recommender` without touching parsing or output.
Results go to stdout, notes and progress to stderr; a `RecllmError` becomes "error: <message>" on one
line and exit status 1 (usage errors exit 2, from argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from functools import cached_property

from recllm.errors import InputError, RecllmError
from recllm.options import EngineOptions
from recllm.request import DEFAULT_K

DEMO_USERS = ("1", "2", "3")  # sample users of the bundled MovieLens for `recllm demo`


# ---------------------------------------------------------------------------- shared state


class Session:
    """What a command needs, built lazily from its arguments (catalog, interactions, store, embedder)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @cached_property
    def catalog(self):
        from recllm.catalog import load_catalog

        return load_catalog(getattr(self.args, "catalog", None))

    @cached_property
    def interactions(self):
        """The interactions file given, else the bundled ratings when the catalog is the bundled one."""
        from recllm.catalog import default_interactions

        return default_interactions(getattr(self.args, "catalog", None), getattr(self.args, "interactions", None))

    @cached_property
    def store(self):
        from recllm.store import ItemStore

        return ItemStore(chroma_url=getattr(self.args, "chroma_url", None))

    @cached_property
    def embedder(self):
        from recllm.embed import get_embedder

        return get_embedder()

    def ensure_index(self) -> None:
        """Index the catalog when its collection is missing or stale (a note on stderr)."""
        if not self.store.is_current(self.catalog, self.embedder):
            what = "changed or unfinished" if self.store.has(self.catalog) else "not indexed yet"
            note(f"catalog {self.catalog.name} is {what}: indexing it first")
            stats = self.store.index(self.catalog, self.embedder, progress=not getattr(self.args, "quiet", False))
            note(stats.summary())

    def retriever(self, with_interactions: bool = False):
        from recllm.retrieve import Retriever

        interactions = self.interactions if with_interactions else None
        return Retriever(self.catalog, self.store, self.embedder, interactions)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- argument helpers


def add_catalog_args(parser: argparse.ArgumentParser, interactions: bool = False) -> None:
    """--catalog, --chroma-url (and --interactions), as `options.EngineOptions` defines them."""
    from recllm.options import EngineOptions

    EngineOptions.add_arguments(parser, interactions=interactions, ranking=False, explain=False)


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--genre", action="append", default=[], metavar="G",
                        help="only items of this genre (repeat or comma-separate for any of several)")
    parser.add_argument("--not-genre", action="append", default=[], metavar="G", help="no items of this genre")
    parser.add_argument("--years", metavar="RANGE", help="year range: 1990-1999, 1995, 1990- or -1999")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (a list of objects) instead of text")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


_YEARS_RE = re.compile(r"^\s*(\d{4})?\s*(-)?\s*(\d{4})?\s*$")


def parse_years(text: str | None) -> tuple[int | None, int | None]:
    """"1990-1999" → (1990, 1999); "1995" → (1995, 1995); "1990-" / "-1999" → open ends."""
    if text is None:
        return None, None
    match = _YEARS_RE.match(text)
    if not match or not (match.group(1) or match.group(3)) or (match.group(3) and match.group(1) and not match.group(2)):
        raise InputError(f"bad --years {text!r}: expected YEAR, FROM-TO, FROM- or -TO (e.g. 1990-1999)")
    low, dash, high = match.groups()
    low = int(low) if low else None
    high = int(high) if high else None
    if not dash:
        high = low
    if low is not None and high is not None and low > high:
        raise InputError(f"bad --years {text!r}: {low} is after {high}")
    return low, high


def _split_genres(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(g.strip() for value in values for g in value.split(",") if g.strip()))


def filters_from_args(args: argparse.Namespace, catalog=None):
    """`Filters` from --genre/--not-genre/--years; genres are checked against the catalog's genres."""
    from recllm.retrieve import Filters

    genres = _split_genres(getattr(args, "genre", []))
    exclude = _split_genres(getattr(args, "not_genre", []))
    if catalog is not None and (genres or exclude):
        known = {g.lower(): g for item in catalog for g in item.genres}
        bad = [g for g in genres + exclude if g.lower() not in known]
        if bad:
            listing = ", ".join(sorted(known.values())) or "none"
            raise InputError(f"unknown genre {', '.join(map(repr, bad))} in catalog {catalog.name} (genres: {listing})")
    year_min, year_max = parse_years(getattr(args, "years", None))
    return Filters(genres=genres, exclude_genres=exclude, year_min=year_min, year_max=year_max)


# ---------------------------------------------------------------------------- output


def print_rows(rows: list[dict], as_json: bool, file=None) -> None:
    """Rows with item_id, title, score (and optionally explanation) as text lines or a JSON list."""
    file = file or sys.stdout
    if as_json:
        json.dump(rows, file, ensure_ascii=False, indent=2)
        file.write("\n")
        return
    if not rows:
        print("(no items match)", file=file)
        return
    for rank, row in enumerate(rows, start=1):
        print(f"{rank:>2}. {row['title']}  [id {row['item_id']}, score {row['score']:.3f}]", file=file)
        if row.get("explanation"):
            print(f"    {row['explanation']}", file=file)


# ---------------------------------------------------------------------------- work


def history_from_args(session: Session, user: str | None, history: str | None) -> list[str]:
    """Item ids of --user or --history (unknown titles are noted and skipped)."""
    retriever = session.retriever(with_interactions=user is not None)
    if user is not None:
        return retriever.user_history(user)
    if history is None:
        return []
    refs = [ref.strip() for ref in history.split("|") if ref.strip()]
    ids, unknown = retriever.resolve_history(refs)
    if unknown:
        note(f"skipped {len(unknown)} unknown item(s): {', '.join(map(repr, unknown))}")
    return ids


def engine_from_args(args: argparse.Namespace):
    """The `Recommender` the parsed options describe (`options.EngineOptions`)."""
    from recllm.options import EngineOptions

    return EngineOptions.from_args(args).build()


def request_from_args(args: argparse.Namespace, rec):
    from recllm.engine import Request

    history = [ref.strip() for ref in (args.history or "").split("|") if ref.strip()]
    return Request(user=args.user, history=history, query=args.query, k=args.k,
                   filters=filters_from_args(args, rec.catalog), explain=min(args.explain, args.k))


def recommend_rows(session: Session, *, user: str | None = None, history: str | None = None,
                   query: str | None = None, k: int = 10, filters=None) -> list[dict]:
    """Retriever-only rows of {item_id, title, score, signals} (the demo; `recommend` uses the engine)."""
    ids = history_from_args(session, user, history)
    session.ensure_index()
    candidates = session.retriever().retrieve(history=ids, k=k, filters=filters, query=query)
    return [c.to_dict() for c in candidates]


def search_rows(session: Session, text: str, *, k: int = 10, filters=None) -> list[dict]:
    session.ensure_index()
    return [c.to_dict() for c in session.retriever().search(text, k=k, filters=filters)]


# ---------------------------------------------------------------------------- subcommands


def add_index(sub) -> None:
    parser = sub.add_parser("index", help="embed the catalog into the item store (only new/changed items)")
    add_catalog_args(parser)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="items per embed+upsert batch")
    parser.add_argument("--verify", action="store_true",
                        help="compare every stored content hash even when the index looks current")
    add_output_args(parser)
    parser.set_defaults(func=run_index)


def run_index(args) -> int:
    session = Session(args)
    catalog = session.catalog  # validated before anything is written
    stats = session.store.index(catalog, session.embedder, batch_size=args.batch_size, progress=not args.quiet,
                                verify=args.verify)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(stats)))
    else:
        print(stats.summary())
    return 0


def add_who(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="ID", help="a user id from the interactions")
    who.add_argument("--history", metavar='"A|B|C"', help="titles (or id:ITEM_ID), oldest first, separated by |;"
                     " a bare number is a title first (300 is the film 300), then an item id")
    parser.add_argument("--query", metavar="TEXT", help="what to look for, in words (blended with the history)")
    parser.add_argument("-k", type=positive_int, default=DEFAULT_K, help=f"how many items (default {DEFAULT_K})")
    add_filter_args(parser)
    EngineOptions.add_arguments(parser)
    add_output_args(parser)


def add_recommend(sub) -> None:
    parser = sub.add_parser("recommend", help="recommend items for a user or a history (retrieve, LLM rank, explain)")
    add_who(parser)
    parser.add_argument("--trace", action="store_true", help="with --json: include the full trace of the request")
    parser.set_defaults(func=run_recommend, parser=parser)


def _engine_and_result(args):
    if args.user is None and args.history is None and not args.query:
        args.parser.error("one of --user, --history or --query is required")
    rec = engine_from_args(args)
    result = rec.recommend(request_from_args(args, rec))
    if result.unknown:
        note(f"skipped {len(result.unknown)} unknown item(s): {', '.join(map(repr, result.unknown))}")
    for found in result.ambiguous:
        note(f"{found.ref!r} read as the title {rec.catalog.get(found.item_id).label}, not {found.other}; "
             f"write {found.other.split(' ')[0]} for the item id")
    return rec, result


def run_recommend(args) -> int:
    _, result = _engine_and_result(args)
    if args.json and args.trace:
        json.dump(result.to_dict(trace=True), sys.stdout, ensure_ascii=False, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print_rows([r.to_dict() for r in result.recommendations], args.json)
    return 0


def _json_default(value):
    return None if isinstance(value, float) else str(value)


def add_why(sub) -> None:
    parser = sub.add_parser("why", help="why was ITEM recommended (or not) for this user/history?")
    parser.add_argument("item", metavar="ITEM", help="a title, id:ITEM_ID, #N for the N-th recommendation, "
                        "or a question (\"why not Heat?\")")
    parser.add_argument("--details", "--trace", dest="details", action="store_true",
                        help="add the raw scores (language model, retriever, combined) to the answer")
    add_who(parser)
    parser.set_defaults(func=run_why, parser=parser)


def run_why(args) -> int:
    rec, result = _engine_and_result(args)
    print(rec.why(args.item, result, details=args.details))
    return 0


def add_serve(sub) -> None:
    sub.add_parser("serve", help="start the chat app in the browser (Gradio); options: --host, --port, "
                   "--catalog, --interactions, --model, --adapter, --chroma-url (see `recllm serve --help`)",
                   add_help=False).set_defaults(func=run_serve)


def run_serve(args) -> int:
    try:
        import app
    except ModuleNotFoundError:  # an install without the top-level app module: load it from the checkout
        import importlib.util

        from recllm.paths import PROJECT_DIR

        spec = importlib.util.spec_from_file_location("app", PROJECT_DIR / "app.py")
        if spec is None or not (PROJECT_DIR / "app.py").is_file():
            raise InputError("the chat app (app.py) is not installed: run it from a recllm checkout") from None
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)

    return app.main(args.extra)


def add_fit_retriever(sub) -> None:
    parser = sub.add_parser("fit-retriever", help="fit the collaborative retriever (sequential model + fusion) "
                            "on the train split; recommend, eval and chat use it from then on")
    add_catalog_args(parser, interactions=True)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", metavar="DIR", help="where to save it (default: <home>/retrievers/<catalog>)")
    parser.add_argument("--min-count", type=positive_int, default=5, metavar="K",
                        help="keep items with at least K interactions and users with at least max(K, 3) "
                        "(default 5; 1 or 2 for short sequences such as conversations)")
    parser.add_argument("--dialogues", metavar="JSONL", help="fit on ReDial-format dialogues instead of "
                        "--interactions: one dialogue = one user, movies in the order mentioned (disliked ones "
                        "left out); their @ids must be the catalog's item ids")
    parser.add_argument("--write-interactions", metavar="CSV", help="with --dialogues: also write them as an "
                        "interactions CSV (user_id,item_id,timestamp,rating: 1 liked, 0.5 did not say)")
    add_output_args(parser)
    parser.set_defaults(func=run_fit_retriever)


def run_fit_retriever(args) -> int:
    from recllm import seqrec

    session = Session(args)
    interactions = session.interactions if not args.dialogues else dialogue_interactions(args)
    if interactions is None:
        raise InputError("fit-retriever needs --interactions PATH (or --dialogues JSONL) with a custom catalog")
    session.ensure_index()
    folder = seqrec.fit_retriever(session.catalog, interactions, args.out, seed=args.seed,
                                  embedder=session.embedder, progress=not args.quiet, min_count=args.min_count)
    print(json.dumps({"retriever": str(folder)}) if args.json else f"fitted retriever saved in {folder}")
    return 0


def dialogue_interactions(args):
    """`--dialogues` as `Interactions` (written to `--write-interactions` when given)."""
    from recllm import conversations, knowledge
    from recllm.catalog import Interactions

    if args.interactions:
        raise InputError("give --interactions or --dialogues, not both")
    rows = knowledge.conversation_interactions(conversations.read_dialogues(args.dialogues))
    if args.write_interactions:
        knowledge.write_interactions(args.write_interactions, rows)
    return Interactions(rows)


def add_eval(sub) -> None:
    from recllm import evaluate

    parser = sub.add_parser("eval", help="evaluate baselines, the retriever and the LLM ranker "
                            "(LlamaRec protocol: leave-one-out, all items, all users)")
    add_catalog_args(parser, interactions=True)
    parser.add_argument("--ranker", choices=("llm", "none"), default="none",
                        help="llm: also rank the retriever's top 20 with the LLM (slow on a CPU)")
    parser.add_argument("--model", metavar="ID", help="LLM for --ranker llm (default: packaged SmolLM2)")
    parser.add_argument("--adapter", metavar="PATH", nargs="+", default=["auto"],
                        help="adapter(s) for --ranker llm, one LLM system each ('auto': the shipped default; "
                             "'none': the untuned model), e.g. --adapter none auto")
    parser.add_argument("--llm-url", metavar="URL", help="ask the LLM server at URL instead of loading the model "
                        "(default: $RECLLM_LLM_URL; README: Scale-out)")
    parser.add_argument("--systems", nargs="+", default=list(evaluate.DEFAULT_SYSTEMS),
                        help=f"systems to evaluate (default: {' '.join(evaluate.DEFAULT_SYSTEMS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds for the fitted retriever")
    parser.add_argument("--retriever", nargs="+", metavar="DIR",
                        help="fitted retriever folder(s) fitted on this split (default: fit one per seed)")
    parser.add_argument("--phase", choices=("test", "valid"), default="test")
    parser.add_argument("--out", metavar="DIR", help="write report.json, report.md, report.png and ranks.npz here")
    add_output_args(parser)
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from recllm import evaluate

    if args.catalog and not args.interactions:
        raise InputError("eval needs --interactions PATH with a custom catalog")
    rankers = {}
    if args.ranker == "llm":
        from recllm import llm
        from recllm.engine import default_adapter
        from recllm.rank import LLMRanker

        catalog = Session(args).catalog
        url = args.llm_url or os.environ.get("RECLLM_LLM_URL") or None
        for choice in dict.fromkeys(args.adapter):
            adapter = default_adapter(args.model) if choice == "auto" else (None if choice == "none" else choice)
            if url:  # the model and adapter as the LLM server serves them (README: Scale-out)
                from recllm.llm.remote import RemoteLM

                lm = RemoteLM(url, args.model, adapter)
            else:
                lm = llm.load_model(args.model, adapter)
            name = f"llm({lm.model_id}{'+' + lm.adapter_id if lm.adapter_id else ''})"
            rankers[name] = evaluate.llm_ranker(LLMRanker(lm), catalog)
    report = evaluate.run_eval(getattr(args, "catalog", None), getattr(args, "interactions", None),
                               systems=args.systems, ranker=rankers or None, seeds=args.seeds,
                               retriever=args.retriever, out_dir=args.out, phase=args.phase,
                               progress=not args.quiet)
    print(report.to_json() if args.json else report.to_markdown())
    return 0


def add_train(sub) -> None:
    from recllm import train

    parser = sub.add_parser("train", help="LoRA-tune the LLM ranker on a catalog + interactions (train split)")
    train.add_arguments(parser)
    parser.set_defaults(func=train.run)


def add_batch(sub) -> None:
    from recllm import batch

    parser = sub.add_parser("batch", help="serve a JSONL file of requests (resumable, data-parallel)")
    batch.add_arguments(parser)
    parser.set_defaults(func=batch.run)


def add_items(sub) -> None:
    parser = sub.add_parser("items", help="look up catalog items")
    items_sub = parser.add_subparsers(dest="items_command", metavar="COMMAND")
    items_sub.required = True
    search = items_sub.add_parser("search", help="items nearest to a text description")
    search.add_argument("text", metavar="TEXT")
    search.add_argument("-k", type=positive_int, default=10, help="how many items (default 10)")
    add_filter_args(search)
    add_catalog_args(search)
    add_output_args(search)
    search.set_defaults(func=run_items_search)


def run_items_search(args) -> int:
    session = Session(args)
    filters = filters_from_args(args, session.catalog)
    print_rows(search_rows(session, args.text, k=args.k, filters=filters), args.json)
    return 0


def add_demo(sub) -> None:
    parser = sub.add_parser("demo", help="index the bundled catalog and recommend for three sample users")
    parser.add_argument("-k", type=positive_int, default=5, help="items per user (default 5)")
    parser.add_argument("--chroma-url", metavar="URL", help="a Chroma server, http://host:port")
    parser.set_defaults(func=run_demo, catalog=None, interactions=None, json=False, quiet=False)


def run_demo(args) -> int:
    session = Session(args)
    session.ensure_index()
    for user in DEMO_USERS:
        ids = session.retriever(with_interactions=True).user_history(user)
        recent = ", ".join(session.catalog.get(i).label for i in ids[-3:])
        print(f"user {user} ({len(ids)} items; latest: {recent})")
        print_rows(recommend_rows(session, user=user, k=args.k), as_json=False)
        print()
    return 0


def add_forget(sub) -> None:
    parser = sub.add_parser("forget", help="delete everything the chat app recorded about a person "
                                           "(messages, replies, thumbs) under every catalog")
    parser.add_argument("--user", required=True, help="the user id the chat was started from")
    parser.set_defaults(func=run_forget)


def run_forget(args) -> int:
    from recllm import memory

    removed = memory.forget(args.user)
    where = memory.root()
    if removed:
        print(f"Forgot user {args.user}: removed {len(removed)} file(s) under {where}")
    else:
        print(f"Nothing recorded about user {args.user} under {where}")
    return 0


def add_eval_conversations(sub) -> None:
    parser = sub.add_parser("eval-conversations", help="recommend from ReDial-format dialogues: Recall@1/10/50 at "
                            "every recommender turn, tune / held-out split, popularity floor alongside")
    parser.add_argument("dialogues", metavar="DIALOGUES", help="ReDial JSONL (e.g. ../shared/data/redial-dev/dialogues.jsonl)")
    parser.add_argument("--movies", metavar="CSV", help="the movie list (movieId,movieName or item_id,title; "
                        "default: movies.csv next to DIALOGUES)")
    parser.add_argument("--link", metavar="CATALOG", help="link the titles to this catalog by title + year "
                        "('movielens': the bundled one) for genres, tags and its interactions")
    parser.add_argument("--link-interactions", metavar="CSV", help="interactions of the --link catalog")
    parser.add_argument("--cross-fit", action="store_true", help="also report with knowledge from every dialogue "
                        "outside the held-out dialogue's fold (weights still from the tune half)")
    parser.add_argument("--fit-retriever", action="store_true", help="also fit the collaborative retriever "
                        "(as `recllm fit-retriever --dialogues`) on the knowledge dialogues of each fold and "
                        "report it alone and with all knowledge")
    parser.add_argument("--min-count", type=positive_int, default=1, metavar="K",
                        help="k-core of the --fit-retriever split (default 1: every movie; users need 3 mentions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tune / held-out split (default 0)")
    parser.add_argument("--limit", type=int, help="only the first N dialogues (a quick check)")
    parser.add_argument("--llm", metavar="ADAPTER", help="also let the LLM re-rank the top 20 of all knowledge "
                        "(reading the conversation): an adapter name or folder, or 'base' for the untuned model")
    parser.add_argument("--llm-users", type=positive_int, metavar="N", help="with --llm: score only N dialogues "
                        "of each half (a fixed sample; faster)")
    parser.add_argument("--out", metavar="DIR", help="write report.json and report.md here")
    add_output_args(parser)
    parser.set_defaults(func=run_eval_conversations)


def run_eval_conversations(args) -> int:
    from pathlib import Path

    from recllm import conversation_eval
    from recllm.report import command_line

    movies = args.movies or Path(args.dialogues).with_name("movies.csv")
    ranker = None
    if args.llm:  # loaded first: a bad adapter fails before the long evaluation
        from recllm import llm
        from recllm.rank import LLMRanker

        ranker = LLMRanker(llm.load_model(None, None if args.llm == "base" else args.llm))
    elif args.llm_users:
        raise InputError("--llm-users needs --llm")
    report = conversation_eval.evaluate(args.dialogues, movies, link_to=args.link,
                                        link_interactions=args.link_interactions, seed=args.seed,
                                        cross_fit=args.cross_fit, progress=not args.quiet, limit=args.limit,
                                        fit_retriever=args.fit_retriever, min_count=args.min_count,
                                        llm=ranker, llm_users=args.llm_users)
    report["command"] = command_line()
    if args.out:
        conversation_eval.write_report(report, args.out)
    print(json.dumps(report, indent=1) if args.json else conversation_eval.to_markdown(report))
    return 0


def add_eval_explanations(sub) -> None:
    parser = sub.add_parser("eval-explanations", help="measure explanations: share naming the user's liked items "
                            "or any evidence, contradictions, filler, fallbacks, distinct-2, seconds each")
    parser.add_argument("--users", type=positive_int, default=100, help="users sampled from the interactions "
                        "(default 100)")
    parser.add_argument("-k", "--k", dest="k", type=positive_int, default=5,
                        help="items recommended and explained per user (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user sample (default 0)")
    parser.add_argument("--out", metavar="DIR", help="write report.json and report.md here")
    EngineOptions.add_arguments(parser, explain=False)  # --adapter: auto (shipped) / none (untuned) / a folder
    add_output_args(parser)
    parser.set_defaults(func=run_eval_explanations)


def run_eval_explanations(args) -> int:
    from recllm import explain_eval
    from recllm.report import command_line

    recommender = EngineOptions.from_args(args).build(explain=0)
    report = explain_eval.run(recommender, users=args.users, k=args.k, seed=args.seed, progress=not args.quiet,
                              command=command_line())
    if args.out:
        explain_eval.write_report(report, args.out)
    print(json.dumps(report["summary"], indent=1) if args.json else explain_eval.to_markdown(report))
    return 0


SUBCOMMANDS = [add_index, add_recommend, add_why, add_items, add_serve, add_batch, add_train, add_fit_retriever,
               add_eval, add_eval_conversations, add_eval_explanations, add_demo, add_forget]


def build_parser() -> argparse.ArgumentParser:
    from recllm import __version__

    parser = argparse.ArgumentParser(prog="recllm", description="A conversational recommender (CLI).")
    parser.add_argument("--version", action="version", version=f"recllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":  # only `serve` passes its options on (to app.py)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except RecllmError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `recllm ... | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
