"""Advice: concrete config changes, each with its reason, for what a plan shows to be off (per stage)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sftflow.data.packing import packed_row_lengths
from sftflow.tools.plan.estimate import Advice, Plan, padded_tokens
from sftflow.tools.plan.memory import GIB

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs


# what a training row is, per stage, in the advice's words
UNITS = {"pt": "rows", "sft": "examples", "rm": "pairs", "dpo": "pairs"}
BATCH = "per_device_train_batch_size:"


def advise(plan: Plan, args: RunArgs) -> list[Advice]:
    """Concrete config changes, each with the reason, for what looks off."""
    memory, data = memory_advice(plan, args), data_advice(plan, args)
    if any(a.change.startswith(BATCH) for a in memory):  # one batch change: the one that fits
        data = [a for a in data if not a.change.startswith(BATCH)]
    return [*memory, *data, *device_advice(plan)]


def memory_advice(plan: Plan, args: RunArgs) -> list[Advice]:
    """When the run does not fit: a batch that fits, checkpointing, LoRA (dpo: no reference copy), QLoRA."""
    memory, device = plan.memory, plan.device
    if plan.fits:
        return []
    out: list[Advice] = []
    act = memory.activations_checkpointed if memory.gradient_checkpointing else memory.activations
    per_row = (act + memory.logits_extra) / plan.largest_batch
    fixed = memory.peak - act - memory.logits_extra
    fitting = int((device.memory * 0.9 - fixed) // per_row) if per_row else 0
    if fitting >= 1:
        ga = math.ceil(plan.batch_size * plan.accumulation / fitting)
        out.append(
            Advice(
                f"{BATCH} {fitting}, gradient_accumulation_steps: {ga}",
                f"the predicted peak {memory.peak / GIB:.1f} GiB exceeds the {device.memory / GIB:.1f} GiB of "
                f"{device.name}; batch {fitting} fits and the accumulation keeps the effective batch",
            )
        )
    if not memory.gradient_checkpointing and memory.activations_checkpointed < memory.activations:
        saved = memory.activations - memory.activations_checkpointed
        out.append(
            Advice(
                "gradient_checkpointing: true",
                f"keeps only each block's input: {saved / GIB:.1f} GiB less, for ~1/3 more compute",
            )
        )
    if plan.setup.kind != "lora":
        reason = "no gradients or optimizer states for the base weights"
        if plan.reference == "model copy":
            reason += f", and the reference is the base with the adapter disabled ({memory.reference / GIB:.1f} GiB less)"
        out.append(Advice("finetuning_type: lora", reason))
    elif not args.model.quantization_bit and device.kind == "cuda":
        out.append(Advice("quantization_bit: 4", "QLoRA stores the frozen base in ~4 bits"))
    return out


def data_advice(plan: Plan, args: RunArgs) -> list[Advice]:
    """cutoff_len, lost end-of-turn tokens, padding, duplicates, conflicting and empty answers."""
    audit, stage = plan.audit, plan.stage
    unit = UNITS.get(stage, "examples")
    pct = audit.get("full_length", {})
    out: list[Advice] = []
    truncated, dropped = audit.get("truncated"), audit.get("dropped")
    if (truncated or dropped) and stage != "pt":  # pt cuts its concatenated texts by design
        target = _round_up(pct.get("p99", audit.cutoff_len), 64)
        if target > audit.cutoff_len:
            out.append(
                Advice(
                    f"cutoff_len: {target}",
                    f"{truncated} {unit} are truncated and {dropped} dropped at cutoff_len {audit.cutoff_len}; "
                    f"99% are at most {pct['p99']} tokens",
                )
            )
    if audit.get("eot_untrained"):
        out.append(
            Advice(
                "raise cutoff_len or shorten the longest answers",
                f"{audit.get('eot_untrained')} {unit} lose an end-of-turn token to truncation: the model "
                "does not learn to stop there",
            )
        )
    out += padding_advice(plan, args)
    if audit.get("duplicates"):
        out.append(
            Advice(
                f"remove duplicate {unit}",
                f"{audit.get('duplicates')} {unit} repeat an earlier one exactly and count twice in the loss",
            )
        )
    if audit.get("conflicting") and stage == "sft":  # pairs share prompts by design (ranked answers)
        out.append(
            Advice(
                "check examples that share a prompt",
                f"{audit.get('conflicting')} prompts appear with different answers; fine for varied data, "
                "a labelling mistake otherwise",
            )
        )
    if audit.get("empty_responses"):
        what = "examples train" if stage == "sft" else "pairs have an answer that trains"
        out.append(
            Advice(
                "fix or drop empty answers",
                f"{audit.get('empty_responses')} {what} nothing but the end-of-turn token: the model "
                "learns to answer with nothing",
            )
        )
    return out


def padding_advice(plan: Plan, args: RunArgs) -> list[Advice]:
    """Over 25% padding computed: packing (sft) or half the batch with twice the accumulation. Padding-free
    rows (sft with fast_loss, pt) compute no padding."""
    audit, rows, batch, seed = plan.audit, plan.rows, plan.batch_size, args.training.seed
    padded = plan.computed_tokens_per_epoch
    pad_share = 1 - audit.tokens / padded if padded else 0.0
    if plan.padding_free or pad_share <= 0.25 or batch <= 1:
        return []
    pct = audit.get("length", {})
    spread = f"lengths vary from {pct.get('min')} to {pct.get('max')}"
    if plan.stage == "sft" and not args.data.packing:
        packed = padded_tokens(packed_row_lengths(rows, audit.cutoff_len), batch, seed)
        return [
            Advice(
                "packing: true",
                f"padding is {pad_share:.0%} of the computed tokens ({spread}); packed rows of cutoff_len "
                f"{audit.cutoff_len} compute {1 - packed / padded:.0%} fewer tokens, each example's loss unchanged",
            )
        ]
    smaller = max(1, batch // 2)
    smaller_pad = 1 - audit.tokens / (plan.sequences * padded_tokens(rows, smaller, seed))
    return [
        Advice(
            f"{BATCH} {smaller}, gradient_accumulation_steps: {plan.accumulation * 2}",
            f"padding is {pad_share:.0%} of the computed tokens ({spread}); half the batch with twice the "
            f"accumulation pads {smaller_pad:.0%} for the same effective batch",
        )
    ]


def device_advice(plan: Plan) -> list[Advice]:
    """fp32 on CPU; no checkpointing on a GPU with room to spare."""
    memory, device = plan.memory, plan.device
    out: list[Advice] = []
    if device.kind == "cpu" and plan.dtype != "float32":
        out.append(Advice("dtype: float32", f"{plan.dtype} matmuls are 30-100x slower than fp32 on CPU"))
    if device.kind == "cuda" and plan.fits and memory.gradient_checkpointing:
        no_gc = memory.peak - memory.activations_checkpointed + memory.activations
        if no_gc < 0.8 * device.memory:
            out.append(
                Advice(
                    "gradient_checkpointing: false",
                    f"the run fits without it ({no_gc / GIB:.1f} GiB) and skips recomputing the forward",
                )
            )
    return out


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
