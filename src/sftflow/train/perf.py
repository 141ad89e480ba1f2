"""The one performance model: FLOPs per token, the device's matmul rate, peak memory, throughput logs.

Training logs (`ThroughputMeter`: tokens/s, MFU, peak memory), `sftflow plan` (predicted time) and the
benchmarks all count FLOPs with `flops_per_token`, on a `ModelShape` read from a config or a model and a
`TrainSetup` read from the finetuning arguments or from which parameters of a model train, so the MFU a
run logs and the time plan predicts agree for every model, tied embeddings or not. The formulas are
written out in docs/plan.md and checked against torch's FLOP counter in tests/test_plan.py.

Shapes are those of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM, ...): seven linear layers per
block, with either the vocabulary output head (`head="lm"`) or a one-output sequence-classification head
(`head="score"`, the reward model).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from sftflow.config.args import FinetuningArguments


ATTN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs.
GPU_PEAK_TFLOPS = {
    "H200": 989,
    "H100": 989,
    "A100": 312,
    "L40S": 362,
    "A10": 125,
    "L4": 121,
    "4090": 165,
    "3090": 71,
    "V100": 125,
    "T4": 65,
}


# ---------------------------------------------------------------------------------------------------
# Model shape and parameter counts


@dataclass
class ModelShape:
    """The sizes of a Llama-style decoder, read from its config.json (or a loaded model)."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    head: str = "lm"  # "lm": the vocabulary output head; "score": one reward output per sequence

    @classmethod
    def from_config(cls, config: PretrainedConfig, head: str = "lm") -> ModelShape:
        """Read the sizes from a `transformers.PretrainedConfig` (its text part for multimodal models).

        Raises:
            SftflowError: the config lacks a size a Llama-style decoder has.
        """
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        names = ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size")
        missing = [name for name in names if getattr(config, name, None) is None]
        if missing:
            raise SftflowError(
                f"model config ({getattr(config, 'model_type', '?')}) has no {', '.join(missing)}: the "
                "performance model covers Llama-style decoders only."
            )
        get = getattr
        heads = get(config, "num_attention_heads")
        hidden = get(config, "hidden_size")
        return cls(
            model_type=get(config, "model_type", "?"),
            vocab=get(config, "vocab_size"),
            hidden=hidden,
            layers=get(config, "num_hidden_layers"),
            heads=heads,
            kv_heads=get(config, "num_key_value_heads", None) or heads,
            head_dim=get(config, "head_dim", None) or hidden // heads,
            intermediate=get(config, "intermediate_size"),
            tied=bool(get(config, "tie_word_embeddings", False)) and head == "lm",
            attention_bias=bool(get(config, "attention_bias", False)) or config.model_type == "qwen2",
            mlp_bias=bool(get(config, "mlp_bias", False)),
            head=head,
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        """The shape of a loaded (possibly PEFT-wrapped) model: its config, the vocabulary its embedding
        holds (resized for new tokens) and its head (a `*ForSequenceClassification` model: score)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = "score" if type(base).__name__.endswith("ForSequenceClassification") else "lm"
        shape = cls.from_config(base.config, head=head)
        embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        if embedding is not None and hasattr(embedding, "weight"):
            shape.vocab = int(embedding.weight.shape[0])
        return shape

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of a decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self, name: str) -> int:
        """Weights (and bias) of one linear layer of a block."""
        n_in, n_out = self.linear_shapes()[name]
        bias = (self.attention_bias and name in ATTN) or (self.mlp_bias and name not in (*ATTN, "o_proj"))
        return n_in * n_out + (n_out if bias else 0)

    def layer_params(self) -> int:
        """One decoder block: seven linear layers and two RMSNorm weights."""
        return sum(self.linear_params(n) for n in LINEARS) + 2 * self.hidden

    def head_params(self) -> int:
        """The output head: vocab x hidden (lm), or hidden x 1 (score)."""
        return self.vocab * self.hidden if self.head == "lm" else self.hidden

    def total_params(self) -> int:
        """Embedding + blocks + final norm (+ the output head when not tied to the embedding)."""
        embed = self.vocab * self.hidden
        return (
            embed + self.layers * self.layer_params() + self.hidden + (0 if self.tied else self.head_params())
        )

    def matmul_params(self) -> int:
        """Parameters used in a matrix product per token: every linear layer and the output head."""
        return self.layers * sum(self.linear_params(n) for n in LINEARS) + self.head_params()


@dataclass
class TrainSetup:
    """What trains: LoRA targets and rank, whole layers (full/freeze), embedding, final norm, output head."""

    kind: str
    lora_targets: frozenset[str] = frozenset()
    lora_rank: int = 0
    trained_layers: frozenset[int] = frozenset()
    embedding: bool = False  # the input embedding (and a tied output head) trains
    final_norm: bool = False
    head: bool = False  # the output head trains (full tuning; a reward model's score head always)

    @classmethod
    def from_args(cls, shape: ModelShape, finetuning: FinetuningArguments) -> TrainSetup:
        """The setup `sftflow.train.steps.build_model` builds for these arguments.

        Raises:
            SftflowError: a lora_target is not a linear layer of a block.
        """
        kind = finetuning.finetuning_type
        score = shape.head == "score"  # build_model trains a reward head in full under lora and freeze
        if kind == "lora":
            targets = set(LINEARS) if finetuning.lora_target == ["all"] else set(finetuning.lora_target)
            unknown = targets - set(LINEARS)
            if unknown:
                raise SftflowError(
                    f"lora_target {sorted(unknown)} is not a linear layer of a {shape.model_type} block "
                    f"({', '.join(LINEARS)})."
                )
            return cls(kind, frozenset(targets), finetuning.lora_rank, head=score)
        if kind == "freeze":
            n = finetuning.freeze_trainable_layers
            layers = range(shape.layers)
            chosen = list(layers)[-n:] if n > 0 else list(layers)[:-n]
            return cls(kind, trained_layers=frozenset(chosen), head=score)
        return cls(
            kind, trained_layers=frozenset(range(shape.layers)), embedding=True, final_norm=True, head=True
        )

    @classmethod
    def from_model(cls, shape: ModelShape, model: nn.Module) -> TrainSetup:
        """The setup of a built model, from which of its parameters require gradients (LoRA: the
        `lora_A` weights give targets and rank).

        Raises:
            SftflowError: LoRA adapts a layer that is not a linear layer of a block.
        """
        targets: set[str] = set()
        rank, layers = 0, set()
        embedding = final_norm = head = False
        embed_weight = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        for name, param in model.named_parameters():
            parts = name.split(".")
            if "lora_A" in parts:
                targets.add(parts[parts.index("lora_A") - 1])
                rank = int(param.shape[0])
                continue
            if not param.requires_grad or "lora_B" in parts:
                continue
            index = parts[parts.index("layers") + 1] if "layers" in parts[:-1] else ""
            if index.isdigit():
                layers.add(int(index))
            elif param is embed_weight:
                embedding = True
                head = head or shape.tied
            elif len(parts) > 1 and "norm" in parts[-2]:
                final_norm = True
            else:  # lm_head / score (a LoRA run's modules_to_save copy included)
                head = True
        unknown = targets - set(LINEARS)
        if unknown:
            raise SftflowError(f"LoRA on {sorted(unknown)}: not a linear layer of a decoder block.")
        if targets:
            return cls("lora", frozenset(targets), rank, head=head)
        kind = "full" if embedding and len(layers) == shape.layers else "freeze"
        return cls(
            kind, trained_layers=frozenset(layers), embedding=embedding, final_norm=final_norm, head=head
        )

    def adapter_params(self, shape: ModelShape) -> int:
        """LoRA: r * (in + out) per adapted layer; 0 otherwise."""
        if self.kind != "lora":
            return 0
        shapes = shape.linear_shapes()
        return shape.layers * sum(self.lora_rank * sum(shapes[name]) for name in self.lora_targets)

    def trainable_params(self, shape: ModelShape) -> int:
        """LoRA adapters, or the parameters of the trained blocks; plus embedding, final norm and head."""
        n = self.adapter_params(shape) + len(self.trained_layers) * shape.layer_params()
        if self.embedding:
            n += shape.vocab * shape.hidden
        if self.head and not (shape.tied and self.embedding):  # a tied head is the embedding
            n += shape.head_params()
        return n + (shape.hidden if self.final_norm else 0)


# ---------------------------------------------------------------------------------------------------
# FLOPs


def attention_flops_per_token(shape: ModelShape, seq: float) -> float:
    """Attention scores and values, forward and backward: 12 * layers * heads * head_dim * seq (QK^T and
    PV are 2 * ... each forward, backward twice that; causal masking not discounted)."""
    return 12 * shape.layers * shape.heads * shape.head_dim * seq


def forward_flops_per_token(shape: ModelShape, seq: float) -> float:
    """One forward pass per token (a recomputed block, or dpo's reference model): 2N + a third of
    the attention."""
    return 2 * shape.matmul_params() + attention_flops_per_token(shape, seq) / 3


def flops_per_token(shape: ModelShape, setup: TrainSetup, seq: float, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token of a sequence of length `seq`.

    N is the parameters in matmuls (block linears and the output head). LoRA: 4N (forward 2N, input
    gradients 2N, no gradients for frozen weights) plus 6 per adapter parameter; full: 6N; freeze: 4N
    plus 2 per trained linear parameter; a trained head adds 2 per head parameter. Attention adds
    12 * layers * heads * head_dim * seq. Gradient checkpointing adds another forward.
    """
    n = shape.matmul_params()
    head = shape.head_params() if setup.head else 0
    if setup.kind == "lora":
        core = 4 * n + 6 * setup.adapter_params(shape) + 2 * head
    else:  # weight gradients of the trained linear layers (norms and embedding lookups are no matmuls)
        block = sum(shape.linear_params(name) for name in LINEARS)
        core = 4 * n + 2 * (len(setup.trained_layers) * block + head)
    attention = attention_flops_per_token(shape, seq)
    return core + attention + (forward_flops_per_token(shape, seq) if gradient_checkpointing else 0)


# ---------------------------------------------------------------------------------------------------
# The device: matmul rate, known peaks, peak memory


def matmul_rates(
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    size: tuple[int, int, int] | None = None,
    runs: int = 9,
    cpu_time: bool = False,
) -> list[float]:
    """FLOP/s of each of `runs` timed (m x k) @ (k x n) matmuls on `device` in `dtype`, after a warm-up.

    Args:
        device: a torch device (default CPU).
        dtype: float32, bfloat16 or float16 (anything else: float32).
        size: (m, k, n); default square 1024 on CPU, 4096 on GPU.
        runs: timed runs.
        cpu_time: on CPU, time each run in CPU seconds of this process per torch thread, so other
            processes competing for the cores do not lower it (what the cores give a run that has them).
    """
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    m, k, n = size or ((4096,) * 3 if device.type == "cuda" else (1024,) * 3)
    # a private generator: the measurement runs at a run's first log (the first after a resume too), and
    # drawing from the global one there would change what a resumed GRPO run samples next
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up (thread pool, GPU kernels)
    by_cpu = cpu_time and device.type == "cpu"
    rates = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.process_time() if by_cpu else time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if by_cpu:
            seconds = (time.process_time() - start) / torch.get_num_threads()
        else:
            seconds = time.perf_counter() - start
        rates.append(2 * m * k * n / max(seconds, 1e-9))
    return rates


def sustained_matmul_flops(
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    size: tuple[int, int, int] | None = None,
    runs: int = 9,
    cpu_time: bool = False,
) -> float:
    """The median of `matmul_rates`: the rate a multi-second training step sustains (single runs on a
    shared CPU burst 20% above it or fall far below). The MFU denominator, and plan's CPU probe."""
    return statistics.median(matmul_rates(device, dtype, size, runs, cpu_time))


def known_gpu_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like `name`, if we know it."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak allocated GPU memory on a CUDA device, else the peak resident set size of this process."""
    import resource
    import sys

    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------------
# Throughput logs


def sequence_lengths(inputs: dict[str, Any], pad_token_id: int | None = None) -> list[int]:
    """The non-pad length of every example in a padded (attention_mask) or packed (position_ids) batch.

    In packed rows an example starts where position_ids is 0; the collator's trailing pad block (all
    pad ids, never trained) is not an example.

    >>> import torch
    >>> sequence_lengths({"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "labels": torch.tensor([[-100, 6, 7,
    ...     -100, -100]]), "position_ids": torch.tensor([[0, 1, 0, 0, 1]])}, pad_token_id=0)
    [2, 1]
    """
    if "attention_mask" in inputs:
        return [int(n) for n in inputs["attention_mask"].sum(1).tolist()]
    ids, labels = inputs["input_ids"], inputs.get("labels")
    positions = inputs.get("position_ids")
    if positions is None:
        return [ids.size(1)] * ids.size(0)
    lengths = []
    for row in range(ids.size(0)):
        starts = (positions[row] == 0).nonzero().squeeze(1).tolist() + [ids.size(1)]
        for begin, end in zip(starts[:-1], starts[1:], strict=True):
            pad_block = pad_token_id is not None and bool((ids[row, begin:end] == pad_token_id).all())
            if pad_block and (labels is None or bool((labels[row, begin:end] == IGNORE_INDEX).all())):
                continue
            lengths.append(end - begin)
    return lengths


class ThroughputMeter:
    """Non-pad tokens/s, MFU and peak memory between two training logs (this process).

    `add` is called with the example lengths of every training batch; `report` returns the figures for
    the batches since the last report:

    - tokens_per_second: non-pad tokens / wall seconds;
    - mfu: model FLOPs per second (`flops_per_token` on the model's shape and what trains, each example
      at its own length, recomputation not counted) / this device's sustained matmul rate in the
      model's dtype (`sustained_matmul_flops`), so it is the fraction of what the matmul units reach
      here, not of a datasheet figure; absent for models that are not Llama-style decoders; with
      `reference_forward` (dpo) each sequence also counts a no-grad forward of the reference model;
    - peak_memory_gb: the peak resident set size of the process (CPU) or the peak allocated GPU memory.
    """

    def __init__(self, model: nn.Module, reference_forward: bool = False) -> None:
        self.reference_forward = reference_forward
        try:
            self.shape: ModelShape | None = ModelShape.from_model(model)
            self.setup: TrainSetup | None = TrainSetup.from_model(self.shape, model)
        except (SftflowError, AttributeError, TypeError):
            self.shape = self.setup = None
        param = next(iter(model.parameters()), None)
        self.device = param.device if param is not None else None
        self.dtype = param.dtype if param is not None else None
        self.peak_flops: float | None = None
        self._lengths: list[int] = []
        self._start: float | None = None

    def flops(self, lengths: list[int]) -> float:
        """Model FLOPs of one training pass over examples of these lengths."""
        if self.shape is None or self.setup is None:
            return 0.0
        total = 0.0
        for s in lengths:
            total += s * flops_per_token(self.shape, self.setup, s, False)
            if self.reference_forward:  # dpo: the reference's no-grad forward of the same sequence
                total += s * forward_flops_per_token(self.shape, s)
        return total

    def add(self, lengths: list[int]) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        self._lengths.extend(lengths)

    def report(self) -> dict[str, float]:
        """The figures since the last report (empty when no batch was seen), then start a new window."""
        if self._start is None or not self._lengths:
            return {}
        seconds = max(time.perf_counter() - self._start, 1e-9)
        out = {"tokens_per_second": round(sum(self._lengths) / seconds, 2)}
        flops = self.flops(self._lengths)
        if flops and self.peak_flops is None:
            self.peak_flops = sustained_matmul_flops(self.device, self.dtype)
        if flops and self.peak_flops:
            out["mfu"] = round(flops / seconds / self.peak_flops, 4)
        out["peak_memory_gb"] = round(peak_memory_bytes(self.device) / 2**30, 3)
        self._lengths, self._start = [], time.perf_counter()
        return out
