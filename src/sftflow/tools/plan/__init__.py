"""`sftflow plan CONFIG [--measure]`: will this run fit, how long will it take, is the data sound?

Everything is computed from the config, the model's config.json and the data step training runs
(`sftflow.data.prepare.prepare`, its tokenized cache included), without loading the weights (seconds);
`--measure` also times a few real training steps on the longest examples. Per stage:

  - sft: one sequence per example (with packing: per row `pack_dataset` builds, best-fit decreasing);
  - pt: the cutoff_len rows of concatenated texts, every token trained;
  - rm: chosen and rejected of each pair through a sequence-classification (score) head, no LM logits;
  - dpo: the policy on chosen and rejected, plus a no-grad forward of the reference (the base with the
    adapter disabled under LoRA, a second copy of the model under full/freeze; none for orpo, simpo).

The parts: `memory` (bytes of the largest step), `estimate` (rows, FLOPs, device, time), `advice`,
`measure` (real steps), `format` (what the terminal shows); FLOPs and the model's shape come from
`sftflow.train.perf`. The formulas are written out in docs/plan.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sftflow.data.audit import DataAudit
from sftflow.data.prepare import prepare
from sftflow.errors import SftflowError
from sftflow.model.loader import load_chat_tokenizer, model_path
from sftflow.tools.plan.advice import advise
from sftflow.tools.plan.estimate import (
    Plan,
    computed_tokens,
    dtype_name_and_bytes,
    epoch_flops,
    find_device,
    padding_free,
    reference_kind,
    throughput,
    training_rows,
)
from sftflow.tools.plan.format import format_plan
from sftflow.tools.plan.measure import check_measurable, measure_steps
from sftflow.tools.plan.memory import GIB, step_memory
from sftflow.train.perf import ModelShape, TrainSetup

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs


__all__ = ["Plan", "build_plan", "format_plan", "measure_steps"]


def build_plan(args: RunArgs, measure_steps_count: int = 0) -> Plan:
    """Predict memory and time, audit the data and gather advice for the run `args` describes.

    Raises:
        SftflowError: the data cannot be prepared (as `sftflow train` would say), is streamed, or the
            model is not a Llama-style decoder.
    """
    import psutil
    from transformers import AutoConfig

    stage, training = args.finetuning.stage, args.training
    if args.data.streaming:
        raise SftflowError("plan reads every example to count tokens; run it with streaming=false.")
    if stage == "grpo":  # its step is G generations plus the policy's pass: not in the memory/time model
        raise SftflowError(
            "sftflow plan does not model a grpo step yet (num_generations completions per prompt, then the "
            "policy's forward and backward). Run a few steps (max_steps: 5) and read tokens/s and "
            "peak_memory_gb in trainer_log.jsonl, or benchmarks/grpo_step.py for the step's split."
        )
    if measure_steps_count:
        check_measurable(stage)
    config = AutoConfig.from_pretrained(
        model_path(args.model), trust_remote_code=args.model.trust_remote_code
    )
    tokenizer = load_chat_tokenizer(args.model, args.data)
    shape = ModelShape.from_config(config, head="score" if stage == "rm" else "lm")
    shape.vocab = max(shape.vocab, len(tokenizer))  # new_special_tokens grow the embeddings
    setup = TrainSetup.from_args(shape, args.finetuning)
    audit = DataAudit.from_prepared(prepare(stage, args.data, tokenizer, training.seed, True))
    rows = training_rows(audit, args.data.packing)

    device = find_device()
    dtype, dtype_bytes = dtype_name_and_bytes(args.model, device)
    batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    largest = max(rows)  # the largest batch: the longest row padded across the batch
    largest_batch = min(batch, len(rows))  # a batch larger than the data holds every row once
    reference, free = reference_kind(args), padding_free(args)
    memory = step_memory(
        shape,
        setup,
        stage,
        largest_batch,
        largest,
        dtype_bytes,
        training,
        args.model,
        reference_model=reference == "model copy",
        runtime=psutil.Process().memory_info().rss if device.kind == "cpu" else int(0.5 * GIB),
        on_cpu=device.kind == "cpu",
    )
    world = max(1, getattr(training, "world_size", 1))
    steps_per_epoch = max(1, math.ceil(len(rows) / (batch * world)) // accumulation)
    epochs = training.num_train_epochs
    if training.max_steps and training.max_steps > 0:
        epochs = training.max_steps / steps_per_epoch
    plan = Plan(
        stage=stage,
        shape=shape,
        setup=setup,
        device=device,
        dtype=dtype,
        batch_size=batch,
        largest_batch=largest_batch,
        accumulation=accumulation,
        audit=audit,
        memory=memory,
        rows=rows,
        largest_seq=largest,
        reference=reference,
        padding_free=free,
        steps=math.ceil(epochs * steps_per_epoch),
        epochs=epochs,
        computed_tokens_per_epoch=computed_tokens(rows, audit, batch, training.seed, free),
        flops_per_epoch=0.0,
        flops_per_second=1.0,
        throughput_source="",
    )
    plan.flops_per_epoch = epoch_flops(plan, training.seed) / world
    plan.flops_per_second, plan.throughput_source = throughput(plan, dtype)
    if measure_steps_count:
        plan.measured = measure_steps(args, measure_steps_count)
        plan.flops_per_second = plan.measured["flops_per_second"]
        plan.throughput_source = f"measured over {measure_steps_count} steps"
    plan.advice = advise(plan, args)
    return plan
