"""Tried for issue 15 and not adopted: an era prior (the tune half's mention rate by release year, Gaussian-smoothed
over +-2 years) as one more signal of the conversation ranker. Prints tune objective and held-out R@1/10/50 of
popularity and all knowledge with and without it. Run from the repo root (about 5 minutes):

    python bench/conv_era_prior.py 2
"""
import sys, numpy as np
from recllm import convrank as cr, conversation_eval as ce

def era_prior(self):
    pop = self.popularity if self.popularity is not None else np.zeros(len(self.ids), np.float32)
    years = self.years.astype(int)
    known = years > 0
    lo, hi = years[known].min(), years[known].max()
    span = np.arange(lo, hi + 1)
    ment = np.array([pop[known & (years == y)].sum() for y in span], float)
    movies = np.array([(known & (years == y)).sum() for y in span], float)
    bw = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    kern = np.exp(-0.5 * ((span[:, None] - span[None, :]) / bw) ** 2)
    rate = (kern @ ment + 0.1) / (kern @ movies + 1.0)
    out = np.full(len(self.ids), np.log(rate).mean(), np.float32)
    out[known] = np.log(rate[years[known] - lo])
    return out

orig_avail, orig_sig = cr.ConversationRanker.available, cr.ConversationRanker.signals
def available(self):
    return orig_avail(self) + ["era"]
def signals(self, readings):
    out = orig_sig(self, readings)
    if "era" in self.available():
        e = era_prior(self)
        out["era"] = cr._standardise(np.broadcast_to(e, (len(readings), len(e))))
    return out
cr.ConversationRanker.available = available
cr.ConversationRanker.signals = signals

ce.SYSTEMS["popularity + era"] = ("popularity", "era")
ce.SYSTEMS["all knowledge + era"] = ce.SYSTEMS["all knowledge"] + ("era",)
rep = ce.evaluate("../shared/data/redial-dev/dialogues.jsonl", "../shared/data/redial-dev/movies.csv", link_to="movielens",
                  systems=["popularity floor", "popularity + era", "all knowledge", "all knowledge + era"], progress=False)
for k, v in rep["systems"].items():
    print(k, v["weights"], v["tune_objective"], {m: v["strict"][m]["mean"] for m in ("recall@1", "recall@10", "recall@50")})
