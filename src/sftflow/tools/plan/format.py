"""The plan as the terminal shows it: the run, memory per device, time, the data, advice."""

from __future__ import annotations

from sftflow.tools.plan.advice import UNITS
from sftflow.tools.plan.estimate import Plan
from sftflow.tools.plan.memory import GIB

# what a stage runs per training row, for the header
STAGE_WORK = {
    "pt": "cutoff_len rows of concatenated texts, every token trained",
    "sft": "one sequence per example, answers trained",
    "rm": "chosen + rejected per pair through a score head",
    "dpo": "policy on chosen + rejected per pair",
    "kto": "one tagged answer per example, counted as sft (KTO's reference and KL forwards not counted)",
}
REFERENCE_WORK = {
    "adapter disabled": ", + a no-grad reference forward (the base, adapter disabled)",
    "model copy": ", + a no-grad forward of a frozen reference copy",
}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pct(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def format_plan(plan: Plan) -> str:
    """The plan as the terminal shows it."""
    return "\n".join([*header(plan), "", *memory_lines(plan), "", *time_lines(plan), "", *data_lines(plan)])


def header(plan: Plan) -> list[str]:
    s, setup = plan.shape, plan.setup
    lora = f" r={setup.lora_rank} on {','.join(sorted(setup.lora_targets))}" if setup.lora_rank else ""
    head = ", score head" if s.head == "score" else ""
    work = STAGE_WORK.get(plan.stage, plan.stage) + REFERENCE_WORK.get(plan.reference, "")
    device = plan.device
    return [
        f"sftflow plan: stage {plan.stage}, {s.model_type}{head}, {plan.total_params / 1e6:.1f}M parameters, "
        f"{setup.kind}{lora}",
        f"  trains: {work}",
        f"  device: {device.name}, {_gib(device.memory)} ({_gib(device.available)} free), dtype {plan.dtype}",
    ]


def memory_lines(plan: Plan) -> list[str]:
    s, m = plan.shape, plan.memory
    batch = plan.largest_batch
    tokens = batch * plan.sequences * plan.largest_seq
    rows = f"{batch} x {plan.largest_seq} tokens"
    if plan.sequences == 2:
        rows = f"{batch} pairs = {2 * batch} x {plan.largest_seq} tokens"
    lines = [
        f"Memory per device (largest batch: {rows})",
        f"  weights              {_gib(m.weights)}",
        f"  trainable params     {plan.trainable_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)",
        f"  gradients            {_gib(m.grads)}",
        f"  optimizer states     {_gib(m.optimizer)}",
    ]
    if m.reference:
        lines.append(f"  reference model      {_gib(m.reference)} (a frozen copy for dpo)")
    lines += [
        f"  activations          {_gib(m.activations)} ({m.activations / tokens / 1024:.0f} KiB/token)"
        + ("" if m.gradient_checkpointing else "  <- used"),
        f"    with checkpointing {_gib(m.activations_checkpointed)} "
        f"({m.activations_checkpointed / tokens / 1024:.0f} KiB/token)"
        + ("  <- used" if m.gradient_checkpointing else ""),
    ]
    if s.head == "lm":
        lines.append(
            f"  logits in backward   {_gib(m.logits_extra)} (2 x batch x seq x vocab {s.vocab} x 4 B)"
        )
    else:
        lines.append("  logits               none (one score per sequence)")
    lines.append(
        f"  {'process (measured)' if plan.device.kind == 'cpu' else 'CUDA context':<20} {_gib(m.runtime)}"
    )
    if m.allocator:
        lines.append(f"  allocator retention  {_gib(m.allocator)} (glibc keeps freed activations)")
    fits = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  predicted peak       {_gib(m.peak)}  -> {fits} in {_gib(plan.device.memory)}")
    return lines


def time_lines(plan: Plan) -> list[str]:
    s, a = plan.shape, plan.audit
    rule = "4N" if plan.setup.kind == "lora" else "6N"
    reference = " + 2N reference forward" if plan.reference else ""
    lines = [
        "Time",
        f"  tokens per epoch     {a.tokens:,} "
        + (
            "(padding-free rows: no FLOP on padding)"
            if plan.padding_free
            else f"({plan.computed_tokens_per_epoch:,} with padding)"
        ),
        f"  FLOPs per token      {plan.flops_per_token(plan.largest_seq) / 1e9:.2f} GFLOP "
        f"({rule} + attention{reference}, N={s.matmul_params() / 1e6:.0f}M in matmuls)",
        f"  throughput           {plan.flops_per_second / 1e9:.1f} GFLOP/s ({plan.throughput_source})",
        f"  predicted            {_duration(plan.seconds)} for {plan.steps} steps ({plan.epochs:g} epochs), "
        f"{_duration(plan.seconds / max(1, plan.steps))} per step",
    ]
    if plan.measured:
        meas = plan.measured
        lines.append(
            f"  measured             {meas['step_seconds']:.2f} s/step at {plan.batch_size} x {int(meas['seq'])} tokens, "
            f"peak {_gib(meas['peak_bytes'])} during the steps"
        )
    return lines


def data_lines(plan: Plan) -> list[str]:
    a, stage = plan.audit, plan.stage
    unit = UNITS.get(stage, "examples")
    lines = [
        "Data",
        "  datasets             " + ", ".join(f"{k}: {v}" for k, v in a.per_dataset.items()),
        f"  train / held out     {a.examples} / {a.eval_examples} {unit}",
    ]
    if stage == "pt":
        lines += [
            f"  texts                {a.get('texts')} texts -> {a.examples} rows of at most {a.cutoff_len} tokens",
            "  row length (tokens)  " + _pct(a.get("length", {})),
            "  trained share        100% (every token)",
        ]
    else:
        label = "length (longer side)" if plan.sequences == 2 else "length (tokens)"
        lines += [
            f"  {label:<21}" + _pct(a.get("full_length", {})),
            "  trained tokens       " + _pct(a.get("trained", {})),
            f"  cutoff_len {a.cutoff_len:<9} {a.get('truncated')} truncated, {a.get('dropped')} dropped",
            f"  trained share        {a.trained_share:.0%} of tokens are trained (the rest is prompt)",
            f"  duplicates           {a.get('duplicates')} exact"
            + (f", {a.get('conflicting')} prompts with differing answers" if stage == "sft" else ""),
            f"  empty responses      {a.get('empty_responses')}",
            f"  end-of-turn trained  {a.examples - a.get('eot_untrained')} of {a.examples} {unit} "
            f"({', '.join(a.eot_tokens)})",
        ]
    lines += ["", "Advice"]
    lines += [f"  - {x.change}\n      because {x.reason}" for x in plan.advice] or [
        "  none: the config looks sound"
    ]
    return lines
