"""Train the sequential encoder with config overrides and print validation/test metrics (for tuning).

    python bench/seq_sweep.py '{"dim": 64, "max_epochs": 50}' [--data beauty] [--seed 0]
"""
import argparse, json, sys, time
import numpy as np
from recllm import evaluate, metrics, seqrec

p = argparse.ArgumentParser()
p.add_argument("overrides", nargs="?", default="{}")
p.add_argument("--catalog"); p.add_argument("--interactions")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save")
a = p.parse_args()
data = evaluate.load_eval_data(a.catalog, a.interactions)
cfg = seqrec.SeqConfig(**json.loads(a.overrides))
t = time.time()
enc = seqrec.train(data.train, data.item_ids, valid_targets=data.valid, config=cfg, seed=a.seed, progress=False)
dt = time.time() - t
res = {}
for phase in ("valid", "test"):
    H = data.histories(phase)
    S = enc.scores_idx(H)
    for b, h in enumerate(H):
        S[b, h] = -np.inf
    r = metrics.rank_of_targets(S, data.targets(phase))
    res[phase] = {k: round(v, 4) for k, v in metrics.summarize(r, (10, 20)).items() if not k.startswith("mrr")}
for e in enc.info["log"]: print(json.dumps(e), file=sys.stderr)
print(json.dumps({"cfg": json.loads(a.overrides), "seed": a.seed, "train_s": round(dt, 1), "epochs": enc.info["epochs"], "best_epoch": enc.info["best_epoch"], **res}))
if a.save:
    enc.save(a.save)
