"""Sequential collaborative encoder (SASRec-style) over item ids: model, training, checkpoint.

The encoder maps a history (item ids, oldest first) to a user vector u; an item's score is exactly
the dot product u . v with its item vector v (the output bias is folded in as the last coordinate:
u = [h, 1], v = [e, b]), so a Chroma collection in inner-product space reproduces the ranking.

Training: next-item prediction at every position with full-softmax cross-entropy over all items,
on the train split only; early stopping on validation NDCG@10 after a minimum number of epochs.
Checkpoint: `seq.safetensors` (weights) + `seq.json` (config, item ids, training log); no pickle.

The fused retriever built on it (`recllm.seqrec.CollaborativeRetriever`) lives in `recllm.seqrec`.
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


def first_line(exc: BaseException) -> str:
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
            raise ModelError(f"{directory}: cannot load the sequential encoder ({first_line(exc)}): "
                             f"{REFIT}") from None
        config = SeqConfig.from_dict(meta["config"])
        model = SASRec(len(meta["item_ids"]), config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"{directory}: weights do not match the config ({exc})") from None
        return cls(model, meta["item_ids"], config, meta.get("info"))


# ---------------------------------------------------------------- training


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

    from recllm import metrics

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
            ranks = metrics.ranks_excluding(enc.scores_idx(vseqs), vseqs, vtargets)
            entry["valid_ndcg@10"] = metrics.ndcg_at_k(ranks, 10)
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
