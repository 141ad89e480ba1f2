"""Time: the rows training batches, the FLOPs of an epoch over them, and the device's FLOP/s.

FLOPs come from `sftflow.train.perf` (the model the logged MFU uses). sft (with fast_loss, the default)
and pt train on padding-free rows, each example attending within itself (`sftflow.train.loss`), so an
epoch computes each example once at its own length: what the logged MFU counts. Otherwise (rm and dpo
through TRL's trainers, sft with fast_loss: false) each batch is padded to its longest row, and a pair
runs both its sequences; dpo adds its reference model's no-grad forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sftflow.data.audit import DataAudit
from sftflow.data.packing import packed_row_lengths
from sftflow.tools.plan.memory import Memory, sequences_per_row
from sftflow.train.perf import (
    ModelShape,
    TrainSetup,
    flops_per_token,
    forward_flops_per_token,
    known_gpu_flops,
    matmul_rates,
    sustained_matmul_flops,
)

if TYPE_CHECKING:
    from sftflow.config.args import ModelArguments
    from sftflow.config.parser import RunArgs


# The share of a GPU's dense bf16 peak a fine-tuning run typically reaches (model FLOPs utilisation).
GPU_MFU = 0.35
# On CPU, a training step reaches this share of the fp32 matmul throughput probed at the model's
# shapes (the rest goes to attention, norms, softmax over the vocabulary and the optimizer); calibrated
# on the demo (SmolLM2-135M LoRA: 75 GFLOP/s in training against a 116 GFLOP/s probe on 2 cores).
CPU_STEP_EFFICIENCY = 0.65


@dataclass
class Device:
    """Where training would run and how much memory it has."""

    name: str
    kind: str  # "cuda" or "cpu"
    memory: int  # total bytes (GPU memory, or RAM)
    available: int  # bytes free now
    count: int = 1


def find_device() -> Device:
    """The first CUDA GPU, else this machine's RAM (via psutil)."""
    import psutil
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        return Device(props.name, "cuda", total, free, torch.cuda.device_count())
    name = "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    vm = psutil.virtual_memory()
    return Device(f"{name} ({torch.get_num_threads()} threads)", "cpu", vm.total, vm.available)


def probe_cpu_flops(shape: ModelShape, tokens: int = 2048, seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s at the model's own shapes: a (tokens x hidden) by (hidden x intermediate)
    product, timed in CPU seconds per torch thread (other processes on the cores do not lower it); the
    median of as many runs (3 to 15) as fit in about `seconds`."""
    size = (max(64, min(tokens, 4096)), shape.hidden, shape.intermediate)
    first = matmul_rates(size=size, runs=1, cpu_time=True)[0]
    runs = max(3, min(15, int(seconds * first / (2 * size[0] * size[1] * size[2]))))
    return sustained_matmul_flops(size=size, runs=runs, cpu_time=True)


@dataclass
class Advice:
    change: str
    reason: str


@dataclass
class Plan:
    """Everything `sftflow plan` prints."""

    stage: str
    shape: ModelShape
    setup: TrainSetup
    device: Device
    dtype: str
    batch_size: int
    largest_batch: int  # rows in the largest batch: batch_size, or every row when the data holds fewer
    accumulation: int
    audit: DataAudit
    memory: Memory
    rows: list[int]  # what the trainer batches: examples, packed rows, pt rows or pairs (longer side)
    largest_seq: int
    reference: str  # dpo's reference model: "adapter disabled", "model copy", or "" (none)
    padding_free: bool  # sft (fast_loss) and pt: no FLOP on padding, each example at its own length
    steps: int
    epochs: float
    computed_tokens_per_epoch: int  # padding included where batches are padded
    flops_per_epoch: float
    flops_per_second: float
    throughput_source: str
    advice: list[Advice] = field(default_factory=list)
    measured: dict[str, float] | None = None

    @property
    def total_params(self) -> int:
        return self.shape.total_params()

    @property
    def trainable_params(self) -> int:
        return self.setup.trainable_params(self.shape)

    @property
    def sequences(self) -> int:
        """Sequences per row (2 for the pairs of rm and dpo)."""
        return sequences_per_row(self.stage)

    @property
    def seconds(self) -> float:
        return self.flops_per_epoch * self.epochs / self.flops_per_second

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.device.memory

    def flops_per_token(self, seq: float) -> float:
        """Training FLOPs per computed token of a sequence of `seq` tokens, dpo's reference forward
        included."""
        flops = flops_per_token(self.shape, self.setup, seq, self.memory.gradient_checkpointing)
        return flops + (forward_flops_per_token(self.shape, seq) if self.reference else 0.0)


def batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The lengths of each batch of one epoch, shuffled as the trainer's random sampler would."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [[lengths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def padded_tokens(lengths: list[int], batch_size: int, seed: int) -> int:
    """Tokens computed in one epoch when each batch is padded to its longest example."""
    return sum(len(b) * max(b) for b in batches(lengths, batch_size, seed))


def dtype_name_and_bytes(model_args: ModelArguments, device: Device) -> tuple[str, int]:
    """The dtype `load_model` will use on this device."""
    if model_args.dtype != "auto":
        name = model_args.dtype
    elif device.kind == "cuda":
        import torch

        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        name = "float32"
    return name, 4 if name == "float32" else 2


def training_rows(audit: DataAudit, packing: bool) -> list[int]:
    """The row lengths the trainer batches: with sft packing, the rows `pack_dataset` builds."""
    if packing and audit.stage == "sft":
        return packed_row_lengths(audit.lengths, audit.cutoff_len)
    return audit.lengths


def padding_free(args: RunArgs) -> bool:
    """Whether the stage's trainer computes padding-free rows: sft with fast_loss, and pt (its recipe
    always trains with the trained-token loss)."""
    return args.finetuning.stage == "pt" or (args.finetuning.stage == "sft" and args.finetuning.fast_loss)


def computed_tokens(plan_rows: list[int], audit: DataAudit, batch: int, seed: int, free: bool) -> int:
    """Tokens one epoch computes: the real tokens on padding-free rows, else the padded batches (pairs:
    both sequences of each pair, padded to the longest of the batch)."""
    if free:
        return audit.tokens
    return sequences_per_row(audit.stage) * padded_tokens(plan_rows, batch, seed)


REFERENCE_FREE = ("orpo", "simpo")  # pref_loss values that train without a reference model


def reference_kind(args: RunArgs) -> str:
    """dpo's reference model, as stages/dpo.py builds it (none for orpo and simpo)."""
    if args.finetuning.stage != "dpo" or args.finetuning.pref_loss in REFERENCE_FREE:
        return ""
    return "adapter disabled" if args.finetuning.finetuning_type == "lora" else "model copy"


def epoch_flops(plan: Plan, seed: int) -> float:
    """FLOPs of one epoch: on padding-free rows each example at its own length (as the logged MFU
    counts), else each batch padded to its longest row (pairs: both sequences)."""
    if plan.padding_free:
        return sum(s * plan.flops_per_token(s) for s in plan.audit.lengths)
    return sum(
        plan.sequences * len(b) * max(b) * plan.flops_per_token(max(b))
        for b in batches(plan.rows, plan.batch_size, seed)
    )


def throughput(plan: Plan, dtype: str) -> tuple[float, str]:
    """FLOP/s a training step reaches: a known GPU's peak x typical utilisation, or a CPU matmul probe."""
    device = plan.device
    if device.kind == "cuda":
        peak = known_gpu_flops(device.name)
        if peak is not None:
            scale = 0.5 if dtype == "float32" else 1.0  # tf32 at best without bf16/fp16
            return peak * scale * GPU_MFU, f"{device.name} peak x {GPU_MFU:.0%} utilisation"
        return 100e12 * GPU_MFU, "unknown GPU: assumed 100 TFLOP/s peak; run with --measure"
    probed = probe_cpu_flops(plan.shape)
    if dtype != "float32":
        probed /= 30  # bf16/fp16 matmuls run 30-100x slower than fp32 on most CPUs
    return probed * CPU_STEP_EFFICIENCY, (
        f"fp32 matmul probe {probed / 1e9:.0f} GFLOP/s x {CPU_STEP_EFFICIENCY:.0%} step efficiency"
    )
