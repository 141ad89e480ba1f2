"""What each part of sftflow's training loss buys: tokens/s of a bare forward + backward + AdamW step.

Same setting as train_throughput.py (SmolLM2-135M-Instruct, fp32, LoRA r=8 on q_proj,v_proj, cutoff 256,
batch 4, the alpaca demo rows in file order), but without the Trainer around it, so the variants differ
only in the loss path:

- `model loss`: the model's own loss on the right-padded batch (what the plain HF Trainer runs);
- `flattened`: one padding-free row, logits only at trained positions, plain sdpa (a dense
  block-diagonal mask over the row), logits materialised (`fused_head=False`);
- `+ per-example attention`: the same with `sftflow_sdpa` (attention.py);
- `+ fused head` (sftflow's default): the output head multiplied into the loss chunk by chunk.

Variants run interleaved for `--rounds` rounds (the best round is kept) after one warm-up step each, so
a noisy neighbour hits them alike. Peak RSS is not separable in one process; train_throughput.py has it.

    .venv/bin/python benchmarks/step_breakdown.py --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference-data" / "alpaca_en_demo.json"
VARIANTS = ["model loss", "flattened", "+ per-example attention", "+ fused head"]


def batches(tokenizer, steps: int, cutoff: int = 256, batch: int = 4) -> list[dict]:
    from sftflow.data.collator import SftCollator

    def ids(messages: list[dict], **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    rows = json.loads(REFERENCE.read_text(encoding="utf-8"))[: steps * batch]
    examples = []
    for row in rows:
        user = [
            {"role": "user", "content": row["instruction"] + ("\n" + row["input"] if row["input"] else "")}
        ]
        prompt = ids(user, add_generation_prompt=True)
        full = ids([*user, {"role": "assistant", "content": row["output"]}])[:cutoff]
        examples.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    collate = SftCollator(tokenizer.pad_token_id)
    return [collate(examples[i : i + batch]) for i in range(0, len(examples), batch)]


def step(model, batch: dict, variant: str) -> None:
    from sftflow.train.loss import causal_lm_loss

    if variant == "model loss":
        loss = model(**batch, use_cache=False).loss
    else:
        loss, _ = causal_lm_loss(model, batch, fused_head=variant == "+ fused head")
    loss.backward()


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftflow.model.loader import resolve_model_path
    from sftflow.train.attention import segment_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    cli = parser.parse_args()

    path = str(resolve_model_path("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = batches(tokenizer, cli.steps + 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = sum(int(b["attention_mask"].sum()) for b in data[1:])
    best = dict.fromkeys(VARIANTS, 0.0)
    for round_ in range(cli.rounds):
        for variant in VARIANTS:
            segments = variant in ("+ per-example attention", "+ fused head")
            with segment_attention(model) if segments else contextlib.nullcontext():
                for i, batch in enumerate(data):
                    if i == 1:  # the first batch warms up
                        start = time.perf_counter()
                    step(model, batch, variant)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            rate = tokens / (time.perf_counter() - start)
            best[variant] = max(best[variant], rate)
            print(f"round {round_ + 1}: {variant:<26} {rate:7.1f} tokens/s", flush=True)
    print(f"\n{cli.steps} steps x batch 4 ({tokens} non-pad tokens), best of {cli.rounds} rounds\n")
    print("| loss path | tokens/s (non-pad) | vs model loss |\n|---|---:|---:|")
    for variant in VARIANTS:
        print(f"| {variant} | {best[variant]:.1f} | {best[variant] / best['model loss']:.2f}x |")


if __name__ == "__main__":
    main()
