"""LoRA training with transformers' Trainer (used by `recllm.train`): fresh LoRA layers (`add_lora`), the
training loop of the two tasks one adapter learns (`train_letter_lora`: the verbalizer ranker's letter loss and
the explanation writer's next-token loss), and Trainer checkpoints that are complete or skipped
(`checkpoint_complete`, `last_complete_checkpoint`)."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recllm.errors import AdapterError
from recllm.llm.adapters import ADAPTER_WEIGHTS
from recllm.llm.model import LM

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "trainer_state.json"  # written last into a Trainer checkpoint folder


def add_lora(lm: LM, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), layers: int | None = None) -> LM:
    """A trainable copy of `lm` with fresh LoRA layers (`.model` is a peft.PeftModel in train mode); `lm` is
    untouched. `layers`: LoRA on the top `layers` decoder layers only (None: all)."""
    from peft import LoraConfig, get_peft_model

    n_layers = int(getattr(lm.model.config, "num_hidden_layers", 0) or 0)
    to_transform = list(range(max(0, n_layers - layers), n_layers)) if layers and n_layers else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=to_transform, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(lm.model), config)
    out = LM(peft_model, lm.tokenizer, lm.model_id)
    out.model.train()
    return out


def checkpoint_complete(folder: str | Path) -> bool:
    """True when a Trainer checkpoint folder has everything resuming reads, whole: trainer_state.json parses,
    the adapter weights load, optimizer and scheduler states are intact zip archives (checked without
    unpickling them)."""
    import zipfile

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        load_file(str(folder / ADAPTER_WEIGHTS))
        for name in ("optimizer.pt", "scheduler.pt"):
            with zipfile.ZipFile(folder / name) as archive:
                if archive.testzip() is not None:
                    return False
    except Exception:  # noqa: BLE001 - missing, truncated or damaged files
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-<step>` under `output_dir` that is complete (`checkpoint_complete`), or None.

    Newer incomplete ones (a run killed while saving, a truncated copy) are removed, so that resuming never
    reads them and the Trainer never mixes them with new files of the same step.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, folder in sorted(found, reverse=True):
        if checkpoint_complete(folder):
            return str(folder)
        log.warning("Removing incomplete checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def train_letter_lora(lm: LM, examples: Sequence[tuple[str, int, int]], *, letter_ids: Sequence[int],
                      output_dir: str | Path, evaluate: Any = None, r: int = 8, alpha: int = 16,
                      dropout: float = 0.05, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                      layers: int | None = None, batch_size: int = 4, lr: float = 1e-3, epochs: float = 1.0,
                      max_steps: int = -1, warmup_steps: int = 0, eval_steps: int = 25, save_steps: int = 25,
                      logging_steps: int = 5, seed: int = 0, resume: bool = False, finish: bool = False,
                      progress: bool = True, threads: int | None = None,
                      text_examples: Sequence[tuple[str, str]] = (), init_adapter: str | Path | None = None,
                      keep_best: bool = True) -> tuple[LM, dict]:
    """LoRA-tune `lm` with transformers' Trainer; returns (trained LM, run info).

    examples: ranking examples `(prompt, target index, number of candidates)`; the loss is the cross-entropy
      over the first `n` candidate-letter logits (`letter_ids`) at the prompt's last position (the answer slot).
    text_examples: explanation examples `(prompt, completion)`; the loss is the next-token cross-entropy of the
      completion and the end-of-sequence token (the prompt is not learned). Each optimizer step trains on
      `batch_size` examples of one task; the steps of both tasks are shuffled together.
    init_adapter: an adapter folder whose weights the LoRA layers start from (same r / alpha / modules), e.g.
      the shipped ranking adapter when teaching it a second task.
    evaluate: `fn(LM) -> {"ndcg10": float, ...}`, called at every evaluation step (with `keep_best`, the best
      step by `ndcg10` is loaded at the end); None evaluates nothing and keeps the last step.
    layers: LoRA on the top `layers` decoder layers only (None: all): back-propagation then stops there,
      which roughly halves a CPU step.
    Checkpoints (adapter + optimizer + RNG state) go to `output_dir/checkpoint-<step>` every `save_steps`;
    `resume=True` continues from the newest complete one (`last_complete_checkpoint`; AdapterError when
    there is none); `finish=True` (implies resume) trains no further and returns the weights of the best
    evaluated step so far (or of the newest checkpoint without evaluation): stopping a long run early.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    if threads:
        torch.set_num_threads(int(threads))
    output_dir = Path(output_dir)
    resume = resume or finish
    last = last_complete_checkpoint(output_dir) if resume else None
    if resume and last is None:
        raise AdapterError(f"Nothing to resume: no checkpoint under {output_dir}")
    model = add_lora(lm, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, layers=layers).model
    if init_adapter is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        found = set_peft_model_state_dict(model, load_file(str(Path(init_adapter) / ADAPTER_WEIGHTS)))
        if getattr(found, "unexpected_keys", None):
            raise AdapterError(f"{init_adapter} does not fit these LoRA settings (r={r}, modules={list(target_modules)})")
    to_transform = model.peft_config["default"].layers_to_transform
    tokenizer = lm.tokenizer
    add_special = not lm.has_chat_template
    letters = torch.tensor(list(letter_ids), dtype=torch.long)
    end_id = tokenizer.eos_token_id

    class _Batches(torch.utils.data.Dataset):
        """Pre-made batches of one task each (the Trainer's batch size is 1 batch)."""

        def __init__(self, rows, size):
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            by_kind = {kind: [rows[i] for i in order if isinstance(rows[i][1], str) == kind] for kind in (False, True)}
            self.batches = [rows_[i:i + size] for rows_ in by_kind.values() for i in range(0, len(rows_), size)]
            random.Random(seed + 1).shuffle(self.batches)

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            return self.batches[i]

    def collate(batches: list[list[tuple]]) -> dict:
        (batch,) = batches
        if isinstance(batch[0][1], str):  # explanation rows: prompt + completion + end, loss on the completion
            rows, masks = [], []
            for prompt, completion in batch:
                head = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
                tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end_id]
                rows.append(head + tail)
                masks.append([-100] * len(head) + tail)
            width = max(map(len, rows))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
            return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                    "labels": torch.tensor([m + [-100] * (width - len(m)) for m in masks])}
        # Right-padded with no attention mask, exactly as the ranker scores (`LM.encode`): the answer slot of a
        # row is its own last token, positions run 0..len-1, and fused causal attention runs (~1.5x faster a
        # step than left padding with a mask on CPU). Pads after a row's end never reach its loss.
        enc = tokenizer([p for p, _, _ in batch], padding=True, padding_side="right", return_tensors="pt",
                        add_special_tokens=add_special)
        n = torch.tensor([k for _, _, k in batch])
        return {"input_ids": enc["input_ids"], "last": enc["attention_mask"].sum(-1) - 1,
                "labels": torch.tensor([t for _, t, _ in batch]),
                "letter_mask": torch.arange(len(letters))[None, :] < n[:, None]}  # (B, 20)

    class LetterTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # our loss is already a mean over the batch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            if "last" not in inputs:  # explanation rows: next-token loss on the completion
                out = model(input_ids=inputs["input_ids"], use_cache=False)
                logits = out.logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
                return (loss, out) if return_outputs else loss
            letter_mask = inputs.pop("letter_mask")
            last = inputs.pop("last").to(inputs["input_ids"].device)
            keep = torch.unique(last)  # the positions whose logits are needed, as in `next_token_logits`
            out = model(**inputs, use_cache=False, logits_to_keep=keep)
            rows = out.logits[torch.arange(len(last), device=last.device), torch.searchsorted(keep, last)]
            logits = rows[:, letters.to(rows.device)].float()  # (B, 20)
            logits = logits.masked_fill(~letter_mask.to(logits.device), float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device))
            return (loss, out) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            was_training = self.model.training
            try:
                found = evaluate(LM(self.model, tokenizer, lm.model_id)) if evaluate else {}
            finally:
                self.model.train(was_training)
            metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in found.items()}
            metrics[f"{metric_key_prefix}_step"] = self.state.global_step
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    use_cuda = lm.device.type == "cuda"
    do_eval = evaluate is not None
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=1, learning_rate=lr,
        num_train_epochs=epochs, max_steps=max_steps, warmup_steps=warmup_steps, lr_scheduler_type="linear",
        logging_steps=logging_steps, eval_strategy="steps" if do_eval else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=3,
        load_best_model_at_end=do_eval and keep_best, metric_for_best_model="ndcg10" if do_eval else None,
        greater_is_better=True, seed=seed, data_seed=seed,
        remove_unused_columns=False, label_names=["labels"], report_to=[], use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0, disable_tqdm=not progress,
        weight_decay=0.0,
    )
    dataset = _Batches(list(examples) + list(text_examples), batch_size)
    trainer = LetterTrainer(model=model, args=args, train_dataset=dataset,
                            eval_dataset=torch.utils.data.Subset(dataset, [0]) if do_eval else None,
                            data_collator=collate)
    total_steps = max_steps if max_steps > 0 else math.ceil(epochs * len(dataset))
    if last and (finish or json.loads((Path(last) / CHECKPOINT_STATE).read_text())["global_step"] >= total_steps):
        # The run had finished before it was stopped (e.g. while scoring or saving the adapter), or `finish`
        # ends it early. Trainer would still train (one step past the end when finished), so take the run's
        # weights at its best evaluated step so far instead.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(Path(last) / CHECKPOINT_STATE))
        best = Path((trainer.state.best_model_checkpoint if keep_best else None) or last)
        if not checkpoint_complete(best):
            best = Path(last)
        set_peft_model_state_dict(model, load_file(str(best / ADAPTER_WEIGHTS)))
        metrics = {}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            metrics = trainer.train(resume_from_checkpoint=last if resume else None).metrics
    trained = LM(trainer.model, tokenizer, lm.model_id)
    info = {
        "global_step": int(trainer.state.global_step),
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": round(float(metrics.get("train_runtime", 0.0)), 1),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "resumed_from": last if resume else None,
        "log_history": list(trainer.state.log_history),
        "lora": {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules),
                 "layers": list(to_transform) if to_transform else None},
        "device": str(lm.device),
    }
    return trained, info
