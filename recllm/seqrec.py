"""Sequential collaborative encoder (SASRec-style) over item ids: model, training, checkpoint.

The encoder maps a history (item ids, oldest first) to a user vector u; an item's score is exactly
the dot product u . v with its item vector v (the output bias is folded in as the last coordinate:
u = [h, 1], v = [e, b]), so a Chroma collection in inner-product space reproduces the ranking.

Training: next-item prediction at every position with full-softmax cross-entropy over all items,
on the train split only; early stopping on validation NDCG@10 after a minimum number of epochs.
Checkpoint: `seq.safetensors` (weights) + `seq.json` (config, item ids, training log); no pickle.

`CollaborativeRetriever` bundles the encoder with the count signals of `recllm.signals` (transitions,
popularity) and the items' text vectors, fused with weights chosen on validation; `fit_retriever`
fits and saves one folder (`recllm fit-retriever`), `CollaborativeRetriever.load` reads it back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from recllm.errors import ModelError

WEIGHTS_FILE = "seq.safetensors"
CONFIG_FILE = "seq.json"
REFIT = "the folder is incomplete or damaged: run `recllm fit-retriever` again"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


@dataclass
class SeqConfig:
    """Model and training settings. Defaults are the ones measured best on ml-latest-small."""

    dim: int = 64  # embedding / hidden size (128 overfits ml-latest-small)
    blocks: int = 2  # transformer blocks
    heads: int = 1  # attention heads
    max_len: int = 50  # most recent history items the encoder reads
    dropout: float = 0.3  # on embeddings, attention and feed-forward
    item_dropout: float = 0.0  # training only: chance an input item is replaced by padding
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 32  # training windows per step (small batches: more steps per epoch on tiny data)
    max_epochs: int = 40  # hard cap on epochs
    min_epochs: int = 10  # no early stop before this (validation NDCG dips early on)
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    time_budget_s: float = 240.0  # stop after this many CPU seconds of training (best epoch kept); CPU, not
    # wall time, so a busy machine trains the same number of epochs, only more slowly
    valid_users: int = 5000  # validation users (a fixed sample) scored after each epoch
    bias: bool = True  # per-item output bias (folded into the vectors as a last coordinate)
    threads: int = 1  # torch CPU threads (more only on an idle machine: busy cores make OpenMP spin)

    @classmethod
    def from_dict(cls, data: dict) -> "SeqConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown sequential-encoder config keys: {', '.join(unknown)}")
        return cls(**data)


class SASRec(nn.Module):
    """Causal self-attention over item embeddings; item 0 is padding, item i+1 is catalog index i."""

    def __init__(self, n_items: int, cfg: SeqConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(d)
        self.out_bias = nn.Parameter(torch.zeros(n_items + 1)) if cfg.bias else None
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) left-padded item indices -> hidden states (B, T, d)."""
        B, T = seq.shape
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.cfg.dim) + self.pos_emb(pos)[None]
        x = self.emb_drop(x)
        valid = seq > 0  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)
        mask = causal[None] & (valid[:, None, :] | eye[None])  # (B, T, T); a pad query sees itself
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def item_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N+1, d) output embeddings (shared with the input) and (N+1,) bias."""
        w = self.item_emb.weight
        b = self.out_bias if self.out_bias is not None else torch.zeros(w.shape[0])
        return w, b

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> scores over items (..., N+1); column 0 (padding) is -inf."""
        w, b = self.item_matrix()
        out = h @ w.T + b
        out[..., 0] = -torch.inf
        return out


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.p if self.training else 0.0
        )  # (B, H, T, d/H)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ff(self.ln2(x)))


# ---------------------------------------------------------------- batching


def _left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """(B, length) int64, each sequence's last `length` items right-aligned, 0 = padding."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for b, s in enumerate(seqs):
        s = np.asarray(s[-length:], dtype=np.int64)
        if len(s):
            out[b, length - len(s) :] = s + 1
    return out


def _windows(seqs: list[np.ndarray], max_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Training windows of up to max_len+1 items: the most recent one, then windows every max_len items
    going back from a random offset, so each epoch cuts a long sequence at different places."""
    out = []
    for s in seqs:
        n = len(s)
        if n < 2:
            continue
        ends = [n]
        if n > max_len + 1:
            ends += range(n - int(rng.integers(0, max_len)), 1, -max_len)
        for e in dict.fromkeys(ends):
            out.append(s[max(0, e - max_len - 1) : e])
    return out


# ---------------------------------------------------------------- the encoder


class SeqEncoder:
    """A trained SASRec with its item ids: history (ids) -> user vector; item ids -> item vectors."""

    def __init__(self, model: SASRec, item_ids: list[str], config: SeqConfig, info: dict | None = None):
        self.model = model.eval()
        self.item_ids = list(item_ids)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.config = config
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        """Length of user and item vectors (hidden size + 1 for the folded bias)."""
        return self.config.dim + 1

    def _encode_idx(self, histories: list[np.ndarray], batch: int = 512) -> np.ndarray:
        torch.set_num_threads(max(1, min(self.config.threads, torch.get_num_threads())))
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        L = self.config.max_len
        with torch.no_grad():
            for lo in range(0, len(histories), batch):
                chunk = histories[lo : lo + batch]
                T = max(1, min(L, max(len(h) for h in chunk)))
                seq = torch.from_numpy(_left_pad(chunk, T))
                h = self.model(seq)[:, -1]  # (B, d)
                out[lo : lo + len(chunk), :-1] = h.numpy()
                out[lo : lo + len(chunk), -1] = 1.0
        return out

    def encode_users(self, histories: list[list[str]]) -> np.ndarray:
        """(B, d+1) float32 user vectors; unknown item ids are skipped (an empty history is allowed)."""
        idx = [np.array([self.index[i] for i in h if i in self.index], dtype=np.int64) for h in histories]
        return self._encode_idx(idx)

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """(item ids, (N, d+1) float32): score(user, item) = encode_users(...) @ item_vectors.T exactly."""
        with torch.no_grad():
            w, b = self.model.item_matrix()
            vecs = torch.cat([w[1:], b[1:, None]], dim=1).numpy().astype(np.float32)
        return list(self.item_ids), vecs

    def scores_idx(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, N) float32 scores over this encoder's items for histories given as item indices."""
        _, items = self.item_vectors()
        return self._encode_idx(histories) @ items.T

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        meta = {"format": 1, "config": asdict(self.config), "item_ids": self.item_ids, "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SeqEncoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:  # noqa: BLE001 - missing, truncated or damaged files (SafetensorError too)
            raise ModelError(f"{directory}: cannot load the sequential encoder ({_first_line(exc)}): "
                             f"{REFIT}") from None
        config = SeqConfig.from_dict(meta["config"])
        model = SASRec(len(meta["item_ids"]), config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"{directory}: weights do not match the config ({exc})") from None
        return cls(model, meta["item_ids"], config, meta.get("info"))


# ---------------------------------------------------------------- training


def _ndcg10(scores: np.ndarray, histories: list[np.ndarray], targets: np.ndarray) -> float:
    from recllm import metrics

    scores = scores.copy()
    for b, h in enumerate(histories):
        scores[b, h] = -np.inf
    return metrics.ndcg_at_k(metrics.rank_of_targets(scores, targets), 10)


def train(
    train_seqs: list[np.ndarray],
    item_ids: list[str],
    *,
    valid_targets: np.ndarray | None = None,
    config: SeqConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SeqEncoder:
    """Fit on `train_seqs` (item indices into `item_ids`, oldest first).

    With `valid_targets` (one per sequence, the item that follows it), validation NDCG@10 (history
    excluded, all items ranked) is measured after each epoch; the best epoch's weights are kept and
    training stops after `patience` epochs without improvement, never before `min_epochs`.
    """
    from tqdm.auto import tqdm

    cfg = config or SeqConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(item_ids)
    model = SASRec(n, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    enc = SeqEncoder(model, item_ids, cfg)
    if valid_targets is not None:
        vusers = np.arange(len(train_seqs))
        if len(vusers) > cfg.valid_users:
            vusers = np.sort(rng.choice(vusers, cfg.valid_users, replace=False))
        vseqs = [train_seqs[u] for u in vusers]
        vtargets = np.asarray(valid_targets)[vusers]
    log: list[dict] = []
    best, best_state, best_epoch, bad = -1.0, None, 0, 0
    start, start_cpu = time.monotonic(), time.process_time()
    bar = tqdm(total=cfg.max_epochs, desc="seq encoder", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        wins = _windows(train_seqs, cfg.max_len, rng)
        order = rng.permutation(len(wins))
        total, count = 0.0, 0
        for lo in range(0, len(order), cfg.batch_size):
            batch = [wins[i] for i in order[lo : lo + cfg.batch_size]]
            T = min(cfg.max_len + 1, max(len(w) for w in batch))
            arr = torch.from_numpy(_left_pad(batch, T))
            inp, tgt = arr[:, :-1], arr[:, 1:]
            if cfg.item_dropout > 0:
                drop = torch.rand(inp.shape) < cfg.item_dropout
                inp = inp.masked_fill(drop, 0)
            h = model(inp)
            keep = tgt > 0
            logits = model.logits(h[keep])
            loss = F.cross_entropy(logits, tgt[keep], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(keep.sum())
            count += int(keep.sum())
        entry = {"epoch": epoch, "loss": total / max(count, 1), "seconds": round(time.monotonic() - start, 1),
                 "cpu_seconds": round(time.process_time() - start_cpu, 1)}
        if valid_targets is not None:
            model.eval()
            entry["valid_ndcg@10"] = _ndcg10(enc.scores_idx(vseqs), vseqs, vtargets)
            if entry["valid_ndcg@10"] > best:
                best, best_epoch, bad = entry["valid_ndcg@10"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        log.append(entry)
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k not in ("epoch", "seconds", "cpu_seconds")})
        if valid_targets is not None and epoch >= cfg.min_epochs and bad >= cfg.patience:
            break
        if time.process_time() - start_cpu > cfg.time_budget_s:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {
        "seed": seed,
        "epochs": len(log),
        "best_epoch": best_epoch or len(log),
        "best_valid_ndcg@10": best if best >= 0 else None,
        "train_seconds": round(time.monotonic() - start, 1),
        "train_cpu_seconds": round(time.process_time() - start_cpu, 1),
        "log": log,
    }
    return SeqEncoder(model, item_ids, cfg, info)


# ---------------------------------------------------------------- the fitted, fused retriever

FUSION_FILE = "fusion.json"
TRANSITIONS_FILE = "transitions.npz"
CONTENT_FILE = "content.npy"
SIGNALS = ("seq", "transition", "content", "popularity")


class CollaborativeRetriever:
    """A fitted retriever folder: sequential encoder + transition counts + popularity (+ content
    vectors), fused with the weights chosen on validation.

    Implements `recllm.retrieve.CollaborativeSignal` (`kind`, `user_vector`) for the Chroma path:
    `item_vectors()` go into the `seq` collection and `user_vector(history)` queries it; the dot
    product equals the `seq` signal exactly, and every item vector has the same norm, so a cosine
    collection ranks exactly as an inner-product one. `signal_scores` + `signals.fuse` give the fused
    score for any set of candidate items.
    """

    kind = "seq"

    def __init__(self, encoder: SeqEncoder, transitions, popularity: np.ndarray, weights: dict[str, float],
                 content: np.ndarray | None = None, meta: dict | None = None):
        self.encoder = encoder
        self.transitions = transitions
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.weights = dict(weights)
        self.content = content
        self.meta = dict(meta or {})
        self.item_ids = encoder.item_ids
        self.index = encoder.index
        _, vecs = encoder.item_vectors()
        norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
        self._max_norm = float(norms.max()) if len(norms) else 1.0
        pad = np.sqrt(np.maximum(self._max_norm**2 - norms**2, 0.0))
        self._item_vecs = np.concatenate([vecs, pad[:, None].astype(np.float32)], axis=1)

    # --- Chroma path
    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """(item ids, (N, d+2) float32), all of norm `max_norm`; dot with `user_vector` = seq score."""
        return list(self.item_ids), self._item_vecs.copy()

    def user_vector(self, history: list[str]) -> np.ndarray | None:
        """(d+2,) query vector for a history of item ids; None when no item of it is known."""
        if not any(i in self.index for i in history):
            return None
        return self.user_vectors([history])[0]

    def user_vectors(self, histories: list[list[str]]) -> np.ndarray:
        u = self.encoder.encode_users(histories)
        return np.concatenate([u, np.zeros((len(u), 1), dtype=np.float32)], axis=1)

    # --- numpy path
    def _idx(self, histories: list[list[str]]) -> list[np.ndarray]:
        return [np.array([self.index[i] for i in h if i in self.index], dtype=np.int64) for h in histories]

    def signal_scores_idx(self, histories: list[np.ndarray], signals=SIGNALS) -> dict[str, np.ndarray]:
        """(B, N) float32 per signal over `item_ids`, histories given as item indices."""
        from recllm.signals import content_user_vectors

        out: dict[str, np.ndarray] = {}
        if "seq" in signals:
            out["seq"] = self.encoder.scores_idx(histories)
        if "transition" in signals:
            out["transition"] = np.log1p(self.transitions.scores(histories))
        if "popularity" in signals:
            out["popularity"] = np.broadcast_to(np.log1p(self.popularity).astype(np.float32),
                                                (len(histories), len(self.item_ids))).copy()
        if "content" in signals and self.content is not None:
            u = content_user_vectors(histories, self.content, **self.meta.get("content_params", {}))
            out["content"] = u @ self.content.T
        return out

    def signal_scores(self, histories: list[list[str]], signals=SIGNALS) -> dict[str, np.ndarray]:
        """(B, N) per signal over `item_ids` for histories of item ids (unknown ids are skipped)."""
        return self.signal_scores_idx(self._idx(histories), signals)

    def scores_idx(self, histories: list[np.ndarray]) -> np.ndarray:
        from recllm.signals import fuse

        used = [n for n, w in self.weights.items() if w]
        return fuse(self.signal_scores_idx(histories, used), self.weights)

    def scores(self, histories: list[list[str]]) -> np.ndarray:
        """(B, N) fused scores over `item_ids`."""
        return self.scores_idx(self._idx(histories))

    def candidate_signals(self, history: list[str], item_ids: list[str],
                          content: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(M,) per signal for any candidate ids (e.g. the union of Chroma hits), ready for `signals.fuse`.

        Items this retriever was not fitted on (cold items) get the user's lowest seq score and zero
        transition/popularity, so only their content score can lift them. `content`: the caller's
        cosine similarities for `item_ids` (e.g. from the text collection); when None the saved text
        vectors are used and cold items get the user's lowest content score.
        """
        full = self.signal_scores([history], signals=tuple(n for n, w in self.weights.items() if w))
        pos = np.array([self.index.get(i, -1) for i in item_ids], dtype=np.int64)
        known = pos >= 0
        out: dict[str, np.ndarray] = {}
        for name, s in full.items():
            row = s[0]
            if name == "content" and content is not None:
                continue
            floor = float(row.min()) if name in ("seq", "content") else 0.0
            col = np.full(len(item_ids), floor, dtype=np.float32)
            col[known] = row[pos[known]]
            out[name] = col
        if content is not None and self.weights.get("content"):
            out["content"] = np.asarray(content, dtype=np.float32)
        return out

    def make_fuse(self, history: list[str]):
        """A `recllm.retrieve.Fuse` (ranked lists per signal, k) -> [(item id, score)] that re-scores the
        union of the lists with this retriever's signals and weights (score fusion, not rank fusion).
        Content similarities come from the list named "content"; items missing from it get its lowest."""
        from recllm.signals import fuse

        def fuse_ranked(ranked: dict[str, list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
            ids = list(dict.fromkeys(i for hits in ranked.values() for i, _ in hits))
            if not ids:
                return []
            content = None
            if ranked.get("content"):
                table = dict(ranked["content"])
                low = min(table.values())
                content = np.array([table.get(i, low) for i in ids], dtype=np.float32)
            scores = fuse(self.candidate_signals(history, ids, content), self.weights)
            order = np.argsort(-scores, kind="stable")[:k]
            return [(ids[i], float(scores[i])) for i in order]

        return fuse_ranked

    def rank(self, history: list[str], k: int = 20, exclude=()) -> list[tuple[str, float]]:
        """Top-k (item id, fused score), best first, never an item of `history` or `exclude`."""
        s = self.scores([history])[0]
        drop = [self.index[i] for i in set(history) | set(exclude) if i in self.index]
        s[drop] = -np.inf
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.item_ids[i], float(s[i])) for i in order if np.isfinite(s[i])]

    def save(self, directory: str | Path) -> Path:
        """Write the folder atomically (`paths.replace_dir`): a killed save never leaves a partial one."""
        from recllm.paths import replace_dir

        def build(tmp: Path) -> None:
            self.encoder.save(tmp)
            self.transitions.save(tmp / TRANSITIONS_FILE)
            if self.content is not None:
                np.save(tmp / CONTENT_FILE, self.content.astype(np.float32), allow_pickle=False)
            meta = dict(self.meta, weights=self.weights, popularity=self.popularity.tolist(), format=1)
            (tmp / FUSION_FILE).write_text(json.dumps(meta, indent=1))

        return replace_dir(Path(directory), build)

    @classmethod
    def load(cls, directory: str | Path) -> "CollaborativeRetriever":
        from recllm.signals import Transitions

        directory = Path(directory)
        if not (directory / FUSION_FILE).is_file():
            raise ModelError(f"{directory}: no fitted retriever here (run `recllm fit-retriever`)")
        encoder = SeqEncoder.load(directory)
        try:
            meta = json.loads((directory / FUSION_FILE).read_text())
            transitions = Transitions.load(directory / TRANSITIONS_FILE)
            content = None
            if (directory / CONTENT_FILE).is_file():
                content = np.load(directory / CONTENT_FILE, allow_pickle=False)
            weights = meta.pop("weights")
            popularity = np.asarray(meta.pop("popularity"), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - missing, truncated or damaged files (BadZipFile too)
            raise ModelError(f"{directory}: cannot load the fitted retriever ({_first_line(exc)}): {REFIT}") from None
        return cls(encoder, transitions, popularity, weights, content, meta)


def data_fingerprint(data) -> str:
    """Hash of an EvalData's items, users and train/validation split (never the test items)."""
    import hashlib

    h = hashlib.sha256()
    h.update("\n".join(data.item_ids).encode())
    h.update("\n".join(data.user_ids).encode())
    for seq in data.train:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    h.update(np.asarray(data.valid, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


TRANSITION_GRID = {
    "gaps": (1, 2, 3, 5, 8),
    "gap_decay": (0.5, 0.7, 0.85, 1.0),
    "last": (3, 5, 10, 20),
    "last_decay": (0.5, 0.7, 0.85, 1.0),
    "normalize": (0.0, 0.5, 0.75, 1.0),
    "backward": (0.0, 0.3, 0.6, 1.0),
}
TUNE_USERS = 2000  # validation users used to choose transition settings and fusion weights


def tune_transitions(data, users: np.ndarray, *, start=None, rounds: int = 2):
    """Coordinate search over `TRANSITION_GRID` for the transition settings with the best validation
    NDCG@10 on `users` (indices). Returns (TransitionConfig, value)."""
    from recllm import metrics
    from recllm.signals import TransitionConfig, Transitions, popularity

    hist = [data.train[u] for u in users]
    targets = data.valid[users]
    pop = np.log1p(popularity(data.train, data.n_items)).astype(np.float32)
    tie = 1e-3 * pop / max(float(pop.max()), 1.0)
    fits: dict[tuple, Transitions] = {}

    def value(cfg: dict) -> float:
        key = (cfg["gaps"], cfg["gap_decay"], cfg["backward"])
        if key not in fits:
            fits.clear()
            fits[key] = Transitions.fit(data.train, data.n_items, TransitionConfig(**cfg))
        trans = fits[key]
        trans.config = TransitionConfig(**cfg)
        s = np.log1p(trans.scores(hist)) + tie
        for b, h in enumerate(hist):
            s[b, h] = -np.inf
        return metrics.ndcg_at_k(metrics.rank_of_targets(s, targets), 10)

    cfg = asdict(start or TransitionConfig(gaps=5, gap_decay=0.85, last=20, last_decay=0.7, normalize=0.75, backward=0.6))
    best = value(cfg)
    for _ in range(rounds):
        improved = False
        for key, grid in TRANSITION_GRID.items():
            for v in grid:
                trial = dict(cfg, **{key: v})
                if trial == cfg:
                    continue
                val = value(trial)
                if val > best + 1e-6:
                    best, cfg, improved = val, trial, True
        if not improved:
            break
    return TransitionConfig(**cfg), best


def fit_on_split(data, *, seed: int = 0, config: SeqConfig | None = None, content: np.ndarray | None = None,
                 transition_config=None, progress: bool = True) -> CollaborativeRetriever:
    """Fit every signal on `data.train` (an `evaluate.EvalData`); choose transition settings and fusion
    weights on the validation split (at most `TUNE_USERS` users, a fixed random sample)."""
    from recllm import metrics
    from recllm.signals import Transitions, choose_weights, popularity

    start, start_cpu = time.monotonic(), time.process_time()
    rng = np.random.default_rng(seed)
    users = np.arange(data.n_users)
    if len(users) > TUNE_USERS:
        users = np.sort(rng.choice(users, TUNE_USERS, replace=False))
    tuned = None
    if transition_config is None:
        transition_config, tuned = tune_transitions(data, users)
    transitions = Transitions.fit(data.train, data.n_items, transition_config)
    encoder = train(data.train, data.item_ids, valid_targets=data.valid, config=config, seed=seed, progress=progress)
    pop = popularity(data.train, data.n_items)
    fitted = CollaborativeRetriever(encoder, transitions, pop, {"seq": 1.0}, content,
                                    {"content_params": {"last": 20, "decay": 0.7}})
    hist = [data.train[u] for u in users]
    signal = fitted.signal_scores_idx(hist)
    for b, h in enumerate(hist):
        signal["seq"][b, h] = -np.inf  # seq always has weight 1: this excludes the history from the fusion

    def valid_ndcg(fused: np.ndarray) -> float:
        return metrics.ndcg_at_k(metrics.rank_of_targets(fused, data.valid[users]), 10)

    weights, best = choose_weights(signal, valid_ndcg, base="seq")
    fitted.weights = weights
    fitted.meta.update(
        data=data.name,
        data_fingerprint=data_fingerprint(data),
        data_stats=data.stats,
        seed=seed,
        tune_users=int(len(users)),
        valid_ndcg10_seq=encoder.info.get("best_valid_ndcg@10"),
        valid_ndcg10_transition=tuned,
        valid_ndcg10_fused=best,
        transition_config=asdict(transition_config),
        fit_seconds=round(time.monotonic() - start, 1),
        fit_cpu_seconds=round(time.process_time() - start_cpu, 1),
    )
    return fitted


def check_fitted_on(fitted: CollaborativeRetriever, data) -> None:
    """ModelError unless `fitted` was fitted on exactly this data's train/validation split."""
    want = data_fingerprint(data)
    have = fitted.meta.get("data_fingerprint")
    if have != want:
        raise ModelError(
            f"the fitted retriever was fitted on other data ({fitted.meta.get('data')}, split {have}); "
            f"this data's split is {want}: run `recllm fit-retriever` on it first"
        )


def fit_retriever(catalog=None, interactions=None, out_dir=None, *, seed: int = 0, config: SeqConfig | None = None,
                  content_vectors=None, embedder=None, progress: bool = True) -> Path:
    """Fit the fused collaborative retriever on the train split of (catalog, interactions) and save it.

    catalog / interactions: paths or loaded objects (None = bundled MovieLens). out_dir: default
    `paths.retrievers_dir() / catalog.name`. content_vectors / embedder: see `evaluate.content_matrix`;
    when no embedding model is available the retriever is fitted without the content signal.
    Returns the folder (load it with `CollaborativeRetriever.load`).
    """
    from recllm import evaluate, paths
    from recllm.catalog import Catalog, load_catalog, load_interactions
    from recllm.errors import RecllmError

    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    if interactions is None or isinstance(interactions, (str, Path)):
        interactions = load_interactions(interactions)
    data = evaluate.prepare(catalog, interactions)
    try:
        content = evaluate.content_matrix(data, catalog, vectors=content_vectors, embedder=embedder, progress=progress)
    except (RecllmError, ImportError) as exc:
        print(f"recllm: fitting without the content signal: {exc}", file=sys.stderr)
        content = None
    fitted = fit_on_split(data, seed=seed, config=config, content=content, progress=progress)
    out = Path(out_dir) if out_dir is not None else paths.retrievers_dir() / catalog.name
    fitted.meta["catalog"] = catalog.name
    fitted.save(out)
    return out
