"""Run the evaluation protocol and write report.json / report.md / report.png / ranks.npz (what `recllm eval --out`
does).

    python bench/eval.py --out runs/ml --seeds 0 1 2
    python bench/eval.py --catalog ../shared/data/amazon-beauty/items.csv \\
        --interactions ../shared/data/amazon-beauty/interactions.csv.gz --out runs/beauty
    python bench/eval.py --retriever runs/ml/retriever-seed0 --systems retriever --out runs/ml-again
"""

from __future__ import annotations

import argparse
import sys
import time

from recllm import evaluate
from recllm.errors import RecllmError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", help="catalog CSV/JSONL or MovieLens folder (default: bundled MovieLens)")
    p.add_argument("--interactions", help="interactions CSV (default: bundled MovieLens ratings)")
    p.add_argument("--systems", nargs="+", default=list(evaluate.DEFAULT_SYSTEMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--retriever", nargs="+", help="fitted retriever folder(s) to evaluate instead of fitting")
    p.add_argument("--content-vectors", help=".npy of text vectors aligned to the filtered items (skips embedding)")
    p.add_argument("--phase", choices=("test", "valid"), default="test")
    p.add_argument("--out", help="folder for report.json, report.md, report.png and fitted retrievers")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = p.parse_args(argv)
    vectors = None
    if args.content_vectors:
        import numpy as np

        from recllm import split

        data = split.prepare(*split.load_inputs(args.catalog, args.interactions))
        vectors = (data.item_ids, np.load(args.content_vectors, allow_pickle=False))
    start = time.monotonic()
    try:
        report = evaluate.run_eval(args.catalog, args.interactions, systems=args.systems, seeds=args.seeds,
                                   retriever=args.retriever, out_dir=args.out, content_vectors=vectors,
                                   phase=args.phase, notes=args.note)
    except RecllmError as exc:
        print(f"recllm: {exc}", file=sys.stderr)
        return 1
    print(report.to_json() if args.json else report.to_markdown())
    print(f"wall {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
