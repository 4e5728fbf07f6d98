"""Train the sequential encoder with config overrides and print VALIDATION metrics (for tuning).

    python bench/seq_sweep.py '{"dim": 64, "max_epochs": 50}' [--catalog C --interactions I] [--seed 0]

Only the validation split is scored: choose settings here, then measure the chosen one once on the test
split with `recllm eval` (tuning on test figures would make them optimistic).
"""
import argparse
import json
import sys
import time

from recllm import metrics, seqrec, split

p = argparse.ArgumentParser()
p.add_argument("overrides", nargs="?", default="{}")
p.add_argument("--catalog")
p.add_argument("--interactions")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save")
a = p.parse_args()
data = split.prepare(*split.load_inputs(a.catalog, a.interactions))
cfg = seqrec.SeqConfig(**json.loads(a.overrides))
t = time.time()
enc = seqrec.train(data.train, data.item_ids, valid_targets=data.valid, config=cfg, seed=a.seed, progress=False)
dt = time.time() - t
hist = data.histories("valid")
ranks = metrics.ranks_excluding(enc.scores_idx(hist), hist, data.targets("valid"))
valid = {k: round(v, 4) for k, v in metrics.summarize(ranks, (10, 20)).items() if not k.startswith("mrr")}
for e in enc.info["log"]:
    print(json.dumps(e), file=sys.stderr)
print(json.dumps({"cfg": json.loads(a.overrides), "seed": a.seed, "train_s": round(dt, 1), "epochs": enc.info["epochs"],
                  "best_epoch": enc.info["best_epoch"], "valid": valid}))
if a.save:
    enc.save(a.save)
