"""Letter bias of the LLM ranker and what calibration (`RankConfig.calibration`) does about it (issue 17).

Step 1, `score` (one model per run, slow: ~1 s per user and pass on 2 CPU cores): for the validation users whose
true item is in the retriever's top 20, the raw letter logits of the candidates in two prompt orders, "retriever"
(as served) and "shuffled" (a fixed random order per user, so the true item's letter is uniform), each forward
and reversed, plus two letter priors: "na" (`LLMRanker.measure_letter_prior`, every title "N/A") and "titles"
(random catalog titles). Each pass is saved to <out>/<model>-<phase>-<order>-<fwd|rev>.npz with its wall and CPU
seconds (a pass already there is skipped: a run cut short resumes), the priors to <out>/<model>-<phase>-priors.npz.

Step 2, `analyse` (seconds): per model, order and calibration: the winning-letter histogram (max and min count
over the uniform count, chi-square p against uniform), LLM-only NDCG@10 among the candidates (random order:
0.2272) by the true item's position in the prompt, the fusion weight re-chosen on this phase
(`fusion.choose_fusion_weight`) and NDCG@10 over all users with its paired bootstrap against the retriever (the
weight is chosen on the same users: optimistic), the wall seconds per user. Priors: "na" and "titles" (above),
"data" (the mean over the users' own shuffled prompts, see `_data_prior`). Writes <out>/analysis-<phase>.json
and prints a Markdown table.

    nice -n 5 python bench/letter_bias.py score --adapter auto --orders shuffled --out runs/letter-bias
    nice -n 5 python bench/letter_bias.py score --adapter auto --orders retriever --out runs/letter-bias
    nice -n 5 python bench/letter_bias.py score --adapter none --orders shuffled --out runs/letter-bias
    python bench/letter_bias.py analyse --out runs/letter-bias
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ORDERS = ("retriever", "shuffled")
# (name, RankConfig.calibration, prior) tried by `analyse`
VARIANTS = (("none", "none", None), ("prior", "prior", "na"), ("prior(titles)", "prior", "titles"),
            ("reverse", "reverse", None), ("prior+reverse", "prior+reverse", "na"),
            ("prior(titles)+reverse", "prior+reverse", "titles"), ("prior(data)", "prior", "data"),
            ("prior(data)+reverse", "prior+reverse", "data"), ("letter prior only (data)", "prior only", "data"))


def _inputs(args):
    from recllm import evaluate, fusion, split
    from recllm.seqrec import CollaborativeRetriever

    catalog, interactions = split.load_inputs(args.catalog, args.interactions)
    data = split.prepare(catalog, interactions)
    fitted = CollaborativeRetriever.load(args.retriever)
    ranking = evaluate.rank_all(fitted.scores_idx, data, args.phase)
    hists = data.histories(args.phase)
    users = np.flatnonzero(ranking.ranks <= evaluate.N_CANDIDATES)
    if args.users and len(users) > args.users:
        users = np.sort(np.random.default_rng(0).choice(users, args.users, replace=False))
    top, vals = fusion.retrieve(fitted.scores_idx, [hists[u] for u in users], evaluate.N_CANDIDATES)
    return catalog, data, ranking, users, top, vals


def _model_name(adapter: str) -> str:
    return "untuned" if adapter == "none" else ("adapter" if adapter == "auto" else Path(adapter).name)


def score(args) -> None:
    from recllm import evaluate, llm
    from recllm.engine import default_adapter
    from recllm.rank import Line, LLMRanker

    catalog, data, ranking, users, top, vals = _inputs(args)
    titles = [Line.of(catalog.get(i)) for i in data.item_ids]  # genres shown when the adapter asks for them
    adapter = default_adapter(None) if args.adapter == "auto" else (None if args.adapter == "none" else args.adapter)
    ranker = LLMRanker(llm.load_model(None, adapter))
    ranker.config.calibration = "none"  # raw logits (whatever the adapter uses): calibrations are applied in `analyse`
    hists = data.histories(args.phase)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{_model_name(args.adapter)}-{args.phase}"
    common = {"users": users, "retriever": vals, "top": top, "targets": data.targets(args.phase)[users]}
    if not (folder / f"{name}-priors.npz").exists():
        t, c = time.monotonic(), time.process_time()
        prior_na = ranker.measure_letter_prior()
        seconds = {"prior_na": round(time.monotonic() - t, 2), "prior_na_cpu": round(time.process_time() - c, 2)}
        t = time.monotonic()
        prior_titles = ranker.measure_letter_prior(titles)  # random catalog titles: content that fits no user
        seconds["prior_titles"] = round(time.monotonic() - t, 2)
        np.savez(folder / f"{name}-priors.npz", prior_na=prior_na, prior_titles=prior_titles,
                 seconds=json.dumps(seconds), describe=json.dumps(ranker.describe()))
    for order in args.orders:
        perms = np.array([np.arange(20) if order == "retriever" else np.random.default_rng(int(u)).permutation(20)
                          for u in users])
        for direction in args.directions:
            path = folder / f"{name}-{order}-{direction}.npz"
            if path.exists():
                continue
            requests = []
            for u, cands, perm in zip(users, top, perms):
                banded = [titles[i]._replace(band=n + 1) for n, i in enumerate(cands)]  # retriever rank
                shown = [banded[j] for j in perm]
                requests.append(([titles[i] for i in hists[u][-evaluate.HISTORY_LEN:]],
                                 shown if direction == "fwd" else shown[::-1]))
            t, c = time.monotonic(), time.process_time()
            scores = np.array(ranker.score(requests))
            wall, cpu = round(time.monotonic() - t, 1), round(time.process_time() - c, 1)
            np.savez(path, **common, perm=perms, scores=scores, wall_s=wall, cpu_s=cpu)
            print(f"{order} {direction}: {wall} s wall, {cpu} s CPU for {len(users)} users", file=sys.stderr)


def _load(folder: Path, name: str, order: str) -> dict | None:
    """One model's saved passes for one order, with its priors (None when a pass is missing)."""
    paths = {d: folder / f"{name}-{order}-{d}.npz" for d in ("fwd", "rev")}
    if not all(p.exists() for p in paths.values()):
        return None
    fwd, rev, priors = np.load(paths["fwd"]), np.load(paths["rev"]), np.load(folder / f"{name}-priors.npz")
    return {"users": fwd["users"], "targets": fwd["targets"], "top": fwd["top"], f"perm_{order}": fwd["perm"],
            f"{order}_fwd": fwd["scores"], f"{order}_rev": rev["scores"], "prior_na": priors["prior_na"],
            "prior_titles": priors["prior_titles"],
            "seconds": {f"{order}_fwd": float(fwd["wall_s"]), f"{order}_rev": float(rev["wall_s"])},
            "cpu_seconds": {f"{order}_fwd": float(fwd["cpu_s"]), f"{order}_rev": float(rev["cpu_s"])}}


def scores_of(saved, order: str, calibration: str, prior: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(U, 20) calibrated scores in prompt order and the same in retriever-candidate order."""
    from recllm.rank import calibrate

    fwd, rev, perms = saved[f"{order}_fwd"], saved[f"{order}_rev"], saved[f"perm_{order}"]
    p = saved[f"prior_{prior}"] if prior else None
    rows = p if p is not None and np.ndim(p) == 2 else [p] * len(fwd)  # a prior per user (cross-fitted) or one
    if calibration == "prior only":  # the letters' bias alone, no titles read: what position bias is worth
        shown = np.array([np.asarray(pr, dtype=np.float64)[: fwd.shape[1]] for pr in rows])
    else:
        shown = np.array([f if calibration == "none" else calibrate(f, r if "reverse" in calibration else None, pr)
                          for f, r, pr in zip(fwd, rev, rows)])
    by_candidate = np.empty_like(shown)
    for row, perm in enumerate(perms):
        by_candidate[row, perm] = shown[row]
    return shown, by_candidate


def _data_prior(shuffled: dict, cross_fit: bool) -> np.ndarray:
    """The letter prior of real prompts: each letter's mean log-probability over the users' prompts with their
    candidates shuffled (both passes), where the true item is on every letter alike. For the shuffled order
    itself, cross-fitted: each user gets the prior of the other half of the users (U, 20); else (20,)."""
    from recllm.rank import _log_softmax

    rows = np.array([[_log_softmax(f), _log_softmax(r)] for f, r in zip(shuffled["shuffled_fwd"],
                                                                      shuffled["shuffled_rev"])])  # (U, 2, 20)
    if not cross_fit:
        return rows.mean(axis=(0, 1))
    half = np.random.default_rng(0).permutation(len(rows)) < len(rows) // 2
    out = np.empty((len(rows), rows.shape[2]))
    out[half] = rows[~half].mean(axis=(0, 1))
    out[~half] = rows[half].mean(axis=(0, 1))
    return out


def analyse(args) -> None:
    from scipy.stats import chisquare

    from recllm import fusion, metrics

    catalog, data, ranking, users, top, vals = _inputs(args)
    results = []
    folder = Path(args.out)
    for priors in sorted(folder.glob(f"*-{args.phase}-priors.npz")):
        model = priors.name[: -len(f"-{args.phase}-priors.npz")]
        for order in ORDERS:
            saved = _load(folder, f"{model}-{args.phase}", order)
            if saved is None:
                continue
            if not np.array_equal(saved["users"], users):
                raise SystemExit(f"{model} {order}: scored for other users; rerun score")
            seconds, targets = saved["seconds"], saved["targets"]
            shuffled = _load(folder, f"{model}-{args.phase}", "shuffled")
            if shuffled is not None:
                saved["prior_data"] = _data_prior(shuffled, cross_fit=order == "shuffled")
            for name, calibration, prior in VARIANTS:
                if prior not in (None, "na", "titles") and f"prior_{prior}" not in saved:
                    continue
                shown, by_cand = scores_of(saved, order, calibration, prior)
                wins = np.bincount(shown.argmax(axis=1), minlength=20)
                true_pos = np.array([list(saved[f"perm_{order}"][r]).index(list(top[r]).index(t))
                                     for r, t in enumerate(targets)])
                llm_rank = np.array([1 + (s > s[tp]).sum() for s, tp in zip(shown, true_pos)], dtype=float)
                ndcg = metrics.per_user(llm_rank, "ndcg", 10)
                by_pos = {f"{chr(65 + lo)}-{chr(65 + lo + 4)}": round(float(ndcg[(true_pos >= lo) & (true_pos < lo + 5)]
                                                                            .mean()), 4)
                          for lo in (0, 5, 10, 15) if ((true_pos >= lo) & (true_pos < lo + 5)).any()}
                phase_scores = fusion.PhaseScores(args.phase, ranking, [int(u) for u in users],
                                                 [np.asarray(v, dtype=np.float64) for v in vals], list(by_cand))
                weight, grid = fusion.choose_fusion_weight(phase_scores, data)
                fused = phase_scores.ranks(data, weight)
                paired = metrics.bootstrap(metrics.per_user(fused, "ndcg", 10),
                                           metrics.per_user(ranking.ranks, "ndcg", 10))
                passes = 2 if "reverse" in calibration else (0 if calibration == "prior only" else 1)
                per_user_s = sum(seconds[f"{order}_{d}"] for d in ("fwd", "rev")[:passes]) / len(users)
                results.append({
                    "model": model, "order": order, "calibration": name, "users": int(len(users)),
                    "wins": wins.tolist(), "wins_max_over_uniform": round(float(wins.max() / (len(users) / 20)), 2),
                    "wins_min_over_uniform": round(float(wins.min() / (len(users) / 20)), 2),
                    "wins_chi2_p_uniform": float(chisquare(wins).pvalue),
                    "llm_ndcg10_subset": round(float(ndcg.mean()), 4),
                    "llm_ndcg10_subset_interval": [round(float(metrics.bootstrap(ndcg)[k]), 4)
                                                   for k in ("low", "high")],
                    "llm_ndcg10_random_order": round(float(np.mean(metrics.per_user(np.arange(1, 21), "ndcg", 10))), 4),
                    "llm_ndcg10_by_true_position": by_pos,
                    "fusion_weight": weight, "fusion_grid_ndcg10": grid,
                    "ndcg10_fused": round(metrics.ndcg_at_k(fused, 10), 4),
                    "ndcg10_retriever": round(metrics.ndcg_at_k(ranking.ranks, 10), 4),
                    "fused_vs_retriever": {k: round(float(v), 4) for k, v in paired.items()},
                    "forward_passes": passes, "seconds_per_user": round(per_user_s, 3),
                    "cpu_seconds_per_user": round(sum(saved["cpu_seconds"][f"{order}_{d}"]
                                                      for d in ("fwd", "rev")[:passes]) / len(users), 3),
                })
    (Path(args.out) / f"analysis-{args.phase}.json").write_text(json.dumps(results, indent=1))
    print("| model | order | calibration | wins max/min over uniform | LLM-only NDCG@10 (subset) [95%] | "
          "by true letter A-E/F-J/K-O/P-T | w | NDCG@10 fused (retriever) | diff [95%] p | s/user |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pv = r["fused_vs_retriever"]
        print(f"| {r['model']} | {r['order']} | {r['calibration']} | {r['wins_max_over_uniform']} / "
              f"{r['wins_min_over_uniform']} | {r['llm_ndcg10_subset']} {r['llm_ndcg10_subset_interval']} | "
              f"{' / '.join(str(v) for v in r['llm_ndcg10_by_true_position'].values())} | {r['fusion_weight']} | "
              f"{r['ndcg10_fused']} ({r['ndcg10_retriever']}) | "
              f"{pv['mean']:+.4f} [{pv['low']:+.4f}, {pv['high']:+.4f}] "
              f"{pv['p_one_sided']:.3f} | {r['seconds_per_user']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("score", "analyse"))
    p.add_argument("--adapter", default="auto", help="'auto' (shipped default), 'none' (untuned) or a folder")
    p.add_argument("--catalog")
    p.add_argument("--interactions")
    p.add_argument("--retriever", default="recllm/data/retrievers/ml-latest-small")
    p.add_argument("--phase", choices=("valid", "test"), default="valid")
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    p.add_argument("--directions", nargs="+", choices=("fwd", "rev"), default=["fwd", "rev"])
    p.add_argument("--users", type=int, default=0, help="at most this many retrieved users (0: all)")
    p.add_argument("--out", default="runs/letter-bias")
    args = p.parse_args(argv)
    score(args) if args.step == "score" else analyse(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
