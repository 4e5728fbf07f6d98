"""Fit the fused collaborative retriever on the train split and save it (what `recllm fit-retriever` does).

    python bench/fit.py --out runs/ml/retriever-seed0 --seed 0
    python bench/fit.py --catalog items.csv --interactions interactions.csv.gz --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from recllm import seqrec
from recllm.errors import RecllmError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog")
    p.add_argument("--interactions")
    p.add_argument("--out", help="folder to save into (default: <home>/retrievers/<catalog>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--content-vectors", help=".npy of text vectors aligned to the filtered items (skips embedding)")
    args = p.parse_args(argv)
    vectors = None
    if args.content_vectors:
        import numpy as np

        from recllm import split

        data = split.prepare(*split.load_inputs(args.catalog, args.interactions))
        vectors = (data.item_ids, np.load(args.content_vectors, allow_pickle=False))
    start, cpu = time.monotonic(), time.process_time()
    try:
        path = seqrec.fit_retriever(args.catalog, args.interactions, args.out, seed=args.seed, content_vectors=vectors)
    except RecllmError as exc:
        print(f"recllm: {exc}", file=sys.stderr)
        return 1
    meta = json.loads((path / seqrec.FUSION_FILE).read_text())
    print(json.dumps({"path": str(path), "weights": meta["weights"], "valid_ndcg@10_fused": meta["valid_ndcg10_fused"],
                      "fit_seconds": meta["fit_seconds"], "fit_cpu_seconds": meta["fit_cpu_seconds"],
                      "total_wall_s": round(time.monotonic() - start, 1),
                      "total_cpu_s": round(time.process_time() - cpu, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
