"""Evaluation reports: per-system metrics with their uncertainty, written as report.json / report.md / report.png.

Two kinds of uncertainty, never mixed:
- over users: a 95% percentile bootstrap interval (`metrics.bootstrap`, users resampled 1,000 times with a
  fixed seed) of each system's mean; with several seeds, of the per-user values averaged over the seeds;
- over seeds: the standard deviation of the per-seed means ("spread over seeds"), when there are several.
"X vs retriever" is a PAIRED bootstrap on the same users: mean difference, its 95% interval, and p-values.

`build(ranks, ...)` turns per-system, per-seed target ranks into a `Report`; `Report.save` writes the
files (plus `ranks.npz`, every user's rank per system and seed, so any figure can be recomputed).
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recllm import metrics

REFERENCE = "retriever"  # the system every other one is compared with, pair by pair
HEADLINE = ("ndcg@10", "recall@10", "mrr@10", "ndcg@5", "recall@5", "recall@20")  # shown with intervals
COMPARED = ("ndcg@10", "recall@10", "mrr@10")  # paired comparisons shown in the Markdown
CURVE_K = 20  # metric@k curves for k = 1..CURVE_K


def bootstrap_settings() -> dict:
    return {
        "unit": "user", "resamples": metrics.BOOTSTRAP_RESAMPLES, "seed": metrics.BOOTSTRAP_SEED, "level": 0.95,
        "method": "percentile; with several seeds, per-user values are averaged over seeds before resampling",
        "p_one_sided": "share of resamples whose mean difference (system - reference) is <= 0",
        "p_two_sided": "2 x min(share <= 0, share >= 0), at most 1",
    }


def curves(ranks: np.ndarray, max_k: int = CURVE_K) -> dict[str, list[float]]:
    """metric@k for k = 1..max_k, for the plot."""
    return {name: [float(metrics.per_user(ranks, name, k).mean()) for k in range(1, max_k + 1)]
            for name in metrics.METRICS}


def _mean_std(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = rows[0].keys()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0 for k in keys}
    return mean, std


def user_table(per_seed_ranks: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(metric keys, (U, M)): each user's metric values, averaged over the seeds."""
    tables = [metrics.per_user_table(r) for r in per_seed_ranks]
    return tables[0][0], np.mean([t for _, t in tables], axis=0)


def system_result(per_seed_ranks: list[np.ndarray], *, retrieved: list[np.ndarray] | None = None,
                  seeds: list[int] | None = None) -> dict:
    """Metrics over all users (mean over seeds), their bootstrap interval over users, the spread over
    seeds (std, several seeds only) and, with `retrieved` masks, the metrics on the users whose true item
    the retriever put in its top 20."""
    rows = [metrics.summarize(r) for r in per_seed_ranks]
    mean, std = _mean_std(rows)
    keys, table = user_table(per_seed_ranks)
    ci = metrics.bootstrap(table)
    interval = {k: [float(lo), float(hi)] for k, lo, hi in zip(keys, ci["low"], ci["high"])}
    out: dict = {"metrics": mean, "interval": interval, "users": int(len(per_seed_ranks[0]))}
    if len(rows) > 1:
        out.update(std=std, per_seed=[dict(seed=s, **r) for s, r in zip(seeds or range(len(rows)), rows)])
    if retrieved is not None:
        sub = [metrics.summarize(r[m]) for r, m in zip(per_seed_ranks, retrieved)]
        sub_mean, sub_std = _mean_std(sub)
        out["retrieved_subset"] = {
            "users": [int(m.sum()) for m in retrieved],
            "metrics": sub_mean,
            **({"std": sub_std} if len(sub) > 1 else {}),
        }
    curve_rows = [curves(r) for r in per_seed_ranks]
    out["curves"] = {k: list(np.mean([c[k] for c in curve_rows], axis=0)) for k in curve_rows[0]}
    return out


def compare(per_seed_ranks: list[np.ndarray], reference_ranks: list[np.ndarray]) -> dict[str, dict]:
    """Paired bootstrap of system - reference on the same users, each side's per-user values averaged over
    its own seeds (a deterministic baseline has one): {metric: {"difference", "low", "high", "p_one_sided",
    "p_two_sided"}}."""
    keys, mine = user_table(per_seed_ranks)
    _, ref = user_table(reference_ranks)
    b = metrics.bootstrap(mine, ref)
    return {k: {"difference": float(b["mean"][n]), "low": float(b["low"][n]), "high": float(b["high"][n]),
                "p_one_sided": float(b["p_one_sided"][n]), "p_two_sided": float(b["p_two_sided"][n])}
            for n, k in enumerate(keys)}


def verdict(cmp: dict) -> str:
    """'better' / 'worse' when the 95% interval of the difference excludes 0, else 'within noise'."""
    return "better" if cmp["low"] > 0 else "worse" if cmp["high"] < 0 else "within noise"


def command_line() -> str:
    """This process's command, as typed: `recllm eval ...` or `python bench/eval.py ...`."""
    prog = Path(sys.argv[0])
    head = ["recllm"] if prog.name in ("recllm", "__main__.py") else ["python", str(prog)]
    return shlex.join(head + sys.argv[1:])


@dataclass
class Report:
    """What `recllm eval` prints and writes: per-system metrics, comparisons, protocol, data, timings."""

    data: dict
    protocol: dict
    systems: dict[str, dict]
    comparisons: dict[str, dict] = field(default_factory=dict)  # system -> {"vs": reference, metric: {...}}
    retrievers: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = ""
    ranks: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)  # system -> per seed (U,)
    seeds: list[int] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "data": self.data,
            "protocol": self.protocol,
            "bootstrap": bootstrap_settings(),
            "systems": self.systems,
            "comparisons": self.comparisons,
            "retrievers": self.retrievers,
            "timings": self.timings,
            "environment": self.environment,
            "notes": self.notes,
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def to_markdown(self) -> str:
        d, p = self.data, self.protocol
        n_seeds = max((len(r.get("per_seed", [])) for r in self.systems.values()), default=0)
        lines = [f"# Evaluation: {d.get('name')} ({p.get('phase')} split)", ""]
        if self.command:
            lines += ["Command:", "", "```", self.command, "```", ""]
        lines += [
            f"{d.get('users')} users, {d.get('items')} items, {d.get('interactions')} interactions after "
            f"{p.get('k_core')}-core filtering. Every user counts; every item is ranked; the user's history is "
            "excluded from the ranking.",
            "",
            "## All users",
            "",
            "Mean over users" + (f" (of the per-user values averaged over {n_seeds} seeds)" if n_seeds else "")
            + " and, in brackets, its 95% bootstrap interval over users (users resampled "
            f"{metrics.BOOTSTRAP_RESAMPLES:,} times, seed {metrics.BOOTSTRAP_SEED}).",
            "",
        ]
        cols = list(HEADLINE)
        lines += _table(self.systems, cols, lambda r, c: f"{r['metrics'][c]:.4f} [{r['interval'][c][0]:.4f}, "
                                                         f"{r['interval'][c][1]:.4f}]")
        if self.comparisons:
            ref = next(iter(self.comparisons.values()))["vs"]
            lines += ["", f"## Paired comparisons with `{ref}` (same users)", "",
                      f"Difference = system - {ref}, per user, averaged over users; 95% paired bootstrap interval; "
                      "p one-sided = share of resamples where the difference is <= 0 (small: the system is better); "
                      "p two-sided = 2 x the smaller share of <= 0 and >= 0. 'within noise': the interval holds 0.",
                      "", "| system | metric | difference | 95% interval | p one-sided | p two-sided | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for name, cmp in self.comparisons.items():
                for m in COMPARED:
                    c = cmp[m]
                    lines.append(f"| {name} | {m} | {c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | "
                                 f"{c['p_one_sided']:.3f} | {c['p_two_sided']:.3f} | {verdict(c)} |")
        seeded = {n: r for n, r in self.systems.items() if "per_seed" in r}
        if seeded:
            lines += ["", f"## Spread over seeds ({n_seeds} seeds)", "",
                      "Mean ± standard deviation of the per-seed means: how much refitting moves a figure, "
                      "not an interval over users.", ""]
            lines += _table(seeded, cols, lambda r, c: f"{r['metrics'][c]:.4f} ± {r['std'][c]:.4f}")
            lines += ["", "| system | seed | ndcg@10 | recall@10 | recall@20 |", "|---|---|---|---|---|"]
            for name, r in seeded.items():
                for row in r["per_seed"]:
                    lines.append(f"| {name} | {row['seed']} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | "
                                 f"{row['recall@20']:.4f} |")
        all_cols = [f"{m}@{k}" for m in metrics.METRICS for k in metrics.KS]
        lines += ["", "## All metrics (means over users)", ""]
        lines += _table(self.systems, all_cols, lambda r, c: f"{r['metrics'][c]:.4f}")
        subset = {n: r for n, r in self.systems.items() if "retrieved_subset" in r}
        if subset:
            lines += ["", "## Users whose true item is in the top 20 (the system's own; for retriever+ranker, "
                      "the retriever's)", "",
                      "Means over these users (no interval: who is in the subset depends on the system).", ""]
            lines += _table(subset, ["users"] + all_cols,
                            lambda r, c: _users(r["retrieved_subset"]["users"]) if c == "users"
                            else f"{r['retrieved_subset']['metrics'][c]:.4f}")
        if self.retrievers:
            lines += ["", "## Fitted retrievers", ""]
            for r in self.retrievers:
                w = ", ".join(f"{k} {v:g}" for k, v in r.get("weights", {}).items())
                lines.append(f"- seed {r.get('seed')}: fusion weights {w}; seq encoder {r.get('epochs')} epochs "
                             f"(best {r.get('best_epoch')}), fit {r.get('fit_seconds')} s wall / "
                             f"{r.get('fit_cpu_seconds')} s CPU; {r.get('path') or ''}")
        if self.timings:
            lines += ["", "## Timings (s)", ""] + [f"- {k}: {v}" for k, v in self.timings.items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """PNG with NDCG@k, Recall@k and MRR@k curves (k = 1..20) for every system."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        ks = list(range(1, CURVE_K + 1))
        for ax, metric in zip(axes, metrics.METRICS):
            for name, r in self.systems.items():
                ax.plot(ks, r["curves"][metric], marker=".", label=name)
            ax.set_xlabel("k")
            ax.set_title(f"{metric.upper() if metric != 'recall' else 'Recall'}@k")
            ax.set_xticks([1, 5, 10, 15, 20])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{self.data.get('name')}: {self.protocol.get('phase')} split, all users, all items")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md, report.png and ranks.npz into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png",
                 "ranks": out / "ranks.npz"}
        paths["json"].write_text(self.to_json() + "\n")
        paths["markdown"].write_text(self.to_markdown())
        self.plot(paths["plot"])
        arrays = {f"{name}/seed{seed}": np.asarray(r, dtype=np.float32)
                  for name, per_seed in self.ranks.items() for seed, r in zip(self.seeds or [0], per_seed)}
        np.savez_compressed(paths["ranks"], user_ids=np.asarray(self.user_ids, dtype=str), **arrays)
        return paths


def load(folder: str | Path) -> Report:
    """A saved report (report.json + ranks.npz) read back, e.g. to render it again."""
    folder = Path(folder)
    saved = json.loads((folder / "report.json").read_text())
    ranks: dict[str, list[np.ndarray]] = {}
    with np.load(folder / "ranks.npz", allow_pickle=False) as z:
        user_ids = [str(u) for u in z["user_ids"]]
        keys = [k for k in z.files if k != "user_ids"]  # "<system>/seed<N>", in the order saved
        for key in keys:
            ranks.setdefault(key.rsplit("/seed", 1)[0], []).append(z[key].astype(np.float64))
    seeds = list(dict.fromkeys(int(k.rsplit("/seed", 1)[1]) for k in keys))
    keep = ("data", "protocol", "systems", "comparisons", "retrievers", "timings", "environment", "notes", "command")
    return Report(**{k: saved[k] for k in keep if k in saved}, ranks=ranks, seeds=seeds, user_ids=user_ids)


def build(ranks: dict[str, list[np.ndarray]], retrieved: dict[str, list[np.ndarray]], *, seeds: list[int],
          reference: str = REFERENCE, **fields) -> Report:
    """A Report from each system's per-seed target ranks (1-based, inf = miss) over the same users, and the
    masks of users whose true item the system's retriever put in its top 20. Every other system is
    compared with `reference` (when evaluated) by a paired bootstrap."""
    seeded = [s for s in ranks if len(ranks[s]) > 1]
    systems = {name: system_result(rk, retrieved=retrieved.get(name), seeds=list(seeds) if name in seeded else None)
               for name, rk in ranks.items()}
    comparisons = {name: {"vs": reference, **compare(rk, ranks[reference])}
                   for name, rk in ranks.items() if reference in ranks and name != reference}
    return Report(systems=systems, comparisons=comparisons, ranks=ranks, seeds=list(seeds),
                  environment=environment(), command=fields.pop("command", None) or command_line(), **fields)


def _users(value) -> str:
    if isinstance(value, list):
        return "/".join(str(v) for v in sorted(set(value))) if len(set(value)) > 1 else str(value[0])
    return str(value)


def _table(systems: dict, cols: list[str], cell) -> list[str]:
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in systems.items():
        lines.append(f"| {name} | " + " | ".join(cell(r, c) for c in cols) + " |")
    return lines


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def environment() -> dict:
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return env
