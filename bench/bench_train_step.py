"""CPU cost of one LoRA training step of the default model on real rank prompts, by LoRA placement and padding.

    python bench/bench_train_step.py [--threads 2] [--batch-size 4]

Builds 8 rank prompts (10 history titles, 20 candidates, as the shipped adapter's rank_config) from the bundled
MovieLens, then times forward + backward of the candidate-letter loss (best of 2) for LoRA on the top 8 layers'
attention, all layers' attention, and all layers' attention + MLP, each with left padding + attention mask
and with right padding and no mask (what `recllm train` does: the fused causal attention kernel runs).
Prints training examples per second for each.
"""

from __future__ import annotations

import argparse
import copy
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from recllm import llm, split
    from recllm.catalog import load_catalog
    from recllm.rank import LLMRanker, RankConfig

    torch.set_num_threads(args.threads)
    catalog = load_catalog()
    data = split.prepare(*split.load_inputs(catalog))
    lm = llm.load_model()
    ranker = LLMRanker(lm, config=RankConfig(max_history=10, title_chars=30))
    titles = [catalog.get(i).label for i in data.item_ids]
    prompts = [ranker.build_prompt([titles[i] for i in data.train[u][-10:]], [titles[i] for i in data.train[u + 10][:20]])
               for u in range(args.batch_size)]
    print(f"prompt tokens: {[lm.token_count(x) for x in prompts]}, threads {args.threads}", flush=True)
    letters = torch.tensor(ranker.letter_ids)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    n = args.batch_size
    for name, layers, modules in (("top 8 layers, attention", list(range(22, 30)), attention),
                                  ("all layers, attention", None, attention),
                                  ("all layers, attention + MLP", None, [*attention, "gate_proj", "up_proj", "down_proj"])):
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=modules, layers_to_transform=layers,
                            task_type="CAUSAL_LM")
        model = get_peft_model(copy.deepcopy(lm.model), config)
        model.train()
        ids, lengths = lm.encode(prompts)
        left = lm.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt",
                            add_special_tokens=not lm.has_chat_template)
        for mode in ("left padding + mask", "right padding, no mask"):
            times = []
            for _ in range(2):
                t = time.perf_counter()
                if mode.startswith("left"):
                    logits = model(**left, logits_to_keep=1).logits[:, -1, :][:, letters]
                else:
                    keep = torch.unique(lengths - 1)
                    out = model(input_ids=ids, logits_to_keep=keep).logits
                    logits = out[torch.arange(n), torch.searchsorted(keep, lengths - 1)][:, letters]
                logits.logsumexp(-1).mean().backward()
                times.append(time.perf_counter() - t)
            print(f"{name:30s} {mode:24s} {n / min(times):.2f} examples/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
