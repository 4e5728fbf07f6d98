"""The docs/eval/llm-ranker report: the retriever alone vs the retriever + the LLM ranker, test split, paired
bootstrap over the same users (issue 17).

The LLM's letter logits come from `bench/letter_bias.py score --phase test --orders retriever` (the candidates in
retriever order, as served; forward and reversed passes; the letter priors), so each slow pass runs once, in its
own bounded process. Each system here turns them into scores exactly as `LLMRanker` with that
`RankConfig.calibration` does (`rank.calibrate`, then `rank.fuse` with the retriever's scores; the equality is
tested in tests/test_rank.py) with a fusion weight chosen on VALIDATION (`bench/letter_bias.py analyse`, which
calls `fusion.choose_fusion_weight`), and `evaluate.run_eval` ranks, scores and compares them.

    python bench/llm_ranker_report.py --system adapter:none:0.2 --system adapter:prior:0.6 --out docs/eval/llm-ranker
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def cached_ranker(data, folder: Path, model: str, calibration: str, weight: float):
    """An `evaluate.Ranker` from saved test-phase letter logits of `model` (retriever order)."""
    from recllm import evaluate
    from recllm.rank import calibrate, fuse

    fwd = np.load(folder / f"{model}-test-retriever-fwd.npz")
    rev_path = folder / f"{model}-test-retriever-rev.npz"
    rev = np.load(rev_path)["scores"] if "reverse" in calibration else None
    prior = np.load(folder / f"{model}-test-priors.npz")["prior_na"] if "prior" in calibration else None
    hists = data.histories("test")
    llm = {}
    for row, (u, cands) in enumerate(zip(fwd["users"], fwd["top"])):
        if not np.array_equal(fwd["perm"][row], np.arange(len(cands))):
            raise SystemExit("the saved passes are not in retriever order")
        key = (tuple(data.item_ids[i] for i in hists[u][-evaluate.HISTORY_LEN:]),
               tuple(data.item_ids[i] for i in cands))
        f = fwd["scores"][row]
        llm[key] = f if calibration == "none" else calibrate(f, None if rev is None else rev[row], prior)

    def rank(requests):
        out = []
        for history, cands, scores in requests:
            key = (tuple(history), tuple(cands))
            if key not in llm:
                raise SystemExit(f"no saved LLM scores for a test user ({len(llm)} saved): rerun letter_bias score")
            out.append(fuse(llm[key], scores, weight))
        return out

    return rank, llm


def main(argv=None) -> int:
    from recllm import evaluate, split

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", action="append", required=True, metavar="MODEL:CALIBRATION:WEIGHT",
                   help="a saved model (adapter, untuned), its calibration and its validation-chosen fusion weight")
    p.add_argument("--scores", default="runs/letter-bias", help="folder of bench/letter_bias.py score")
    p.add_argument("--retriever", default="recllm/data/retrievers/ml-latest-small")
    p.add_argument("--label", action="append", default=[], metavar="MODEL=TEXT", help="name shown for a model")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    labels = dict(x.split("=", 1) for x in args.label)
    catalog, interactions = split.load_inputs(None, None)
    data = split.prepare(catalog, interactions)
    rankers, notes = {}, list(args.note)
    for spec in args.system:
        model, calibration, weight = spec.split(":")
        rank, llm = cached_ranker(data, Path(args.scores), model, calibration, float(weight))
        name = f"llm({labels.get(model, model)}, {calibration}, w={float(weight):g})"
        rankers[name] = rank
        passes = [np.load(Path(args.scores) / f"{model}-test-retriever-{d}.npz")
                  for d in (("fwd", "rev") if "reverse" in calibration else ("fwd",))]
        wall, cpu = sum(float(x["wall_s"]) for x in passes), sum(float(x["cpu_s"]) for x in passes)
        notes.append(f"{name}: the LLM's forward pass{'es' if len(passes) > 1 else ''} over {len(llm)} users took "
                     f"{wall:.0f} s wall, {cpu:.0f} s CPU (letter_bias.py score; 'rank' under Timings is the fusion)")
        wins = np.bincount([int(np.argmax(s)) for s in llm.values()], minlength=20)
        notes.append(f"{name}: winning letter (A..T) of the LLM scores, candidates in retriever order, "
                     f"{len(llm)} users: {' '.join(str(int(w)) for w in wins)}")
    report = evaluate.run_eval(None, None, systems=("retriever",), ranker=rankers, retriever=args.retriever,
                               out_dir=args.out, phase="test", notes=notes, progress=False)
    print(report.to_markdown())
    print(json.dumps({k: v for k, v in report.comparisons.items()}, default=float)[:2000], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
