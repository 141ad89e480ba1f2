"""Memory of one training step on one device: weights, gradients, optimizer states, and the activations
autograd keeps for backward (exact for Llama-style decoders with sdpa in fp32: tests/test_plan.py counts
the tensors autograd saves in a tiny model). Formulas: docs/plan.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sftflow.train.perf import ATTN, LINEARS, MLP_IN, ModelShape, TrainSetup

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from sftflow.config.args import ModelArguments


GIB = 1024**3
QUANTIZED_BYTES = {4: 4.127 / 8, 8: 1.0}  # NF4 with double-quantized absmax; int8 with a scale per row
# On CPU, glibc keeps freed heap memory (tensors under its 32 MB mmap threshold) in its arenas, so the
# process RSS exceeds the live tensors by about this share of the block activations (benchmarks/
# plan_accuracy.py; with MALLOC_MMAP_THRESHOLD_=65536 the RSS matches the live bytes within 1%).
CPU_ALLOCATOR_RETENTION = 0.9


# ---------------------------------------------------------------------------------------------------
# Activations: what autograd keeps for the backward pass


@dataclass
class Activations:
    """Bytes autograd saves in one forward pass of a batch, by where they come from."""

    layers: list[int]
    final: int  # final norm, output head input, log-softmax over the vocabulary
    other: int  # rotary cos/sin, labels, token ids

    @property
    def total(self) -> int:
        return sum(self.layers) + self.final + self.other


def _norm_saved(h: int, grad_in: bool, weight_trains: bool) -> tuple[int, bool]:
    """RMSNorm keeps its input and 1/rms when a gradient flows through, and the normalized input
    when its weight trains. Returns (elements per token, whether the output needs a gradient)."""
    n = (h + 1 if grad_in else 0) + (h if weight_trains else 0)
    return n, grad_in or weight_trains


def layer_saved_elements(
    shape: ModelShape, grad_in: bool, trained: set[str], lora: set[str], rank: int, seq: int, eager: bool
) -> tuple[int, int, bool]:
    """Elements per token one decoder block saves for backward.

    Each op keeps only what the gradients it must produce need: a linear layer keeps its input when its
    weight (or a LoRA adapter on it) trains; sdpa keeps q, k, v, its output and the log-sum-exp.

    Args:
        grad_in: the block's input needs a gradient (something before it trains).
        trained: linear layers (and "input_norm", "post_norm") whose weights train.
        lora: linear layers that carry a LoRA adapter of rank `rank`.
        seq: sequence length (eager attention keeps seq probabilities per head and token).
        eager: eager attention instead of sdpa/flash.

    Returns:
        (elements in the model dtype, fp32 elements, whether the block's output needs a gradient).
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    adapted = trained | lora
    n, y_req = _norm_saved(h, grad_in, "input_norm" in trained)
    fp32 = 0
    if adapted & set(ATTN):
        n += h  # the normed input, shared by q/k/v (and their LoRA A)
    n += rank * len(lora & set(ATTN))
    attn_req = y_req or bool(adapted & set(ATTN))
    if attn_req:
        if eager:  # q, k and v repeated to every head, the probabilities
            n += 3 * q + shape.heads * seq
        else:
            n += 2 * q + 2 * kv  # q, k, v and the output
            fp32 += shape.heads  # log-sum-exp
    o_trains = "o_proj" in adapted
    if o_trains and (eager or not attn_req):
        n += q  # the attention output (sdpa already keeps it)
    n += rank * ("o_proj" in lora)
    x2_req = grad_in or attn_req or o_trains
    m, y2_req = _norm_saved(h, x2_req, "post_norm" in trained)
    n += m
    if adapted & set(MLP_IN):
        n += h
    n += rank * len(lora & set(MLP_IN))
    gate_req = y2_req or "gate_proj" in adapted
    up_req = y2_req or "up_proj" in adapted
    n += 2 * i if gate_req else 0  # silu input, and up's output for the product's gradient
    n += i if up_req else 0  # silu output, for up's gradient
    if "down_proj" in adapted:
        n += i + rank * ("down_proj" in lora)
    out_req = x2_req or gate_req or up_req or "down_proj" in adapted
    return n, fp32, out_req


def activation_bytes(
    shape: ModelShape,
    setup: TrainSetup,
    batch: int,
    seq: int,
    dtype_bytes: int = 4,
    eager: bool = False,
    gradient_checkpointing: bool = False,
) -> Activations:
    """Bytes autograd keeps after the forward pass of a `batch` x `seq` batch (the loss included).

    With gradient checkpointing each block keeps only its input; the backward pass recomputes one block
    at a time, so one block's full activations come on top.
    """
    tokens = batch * seq
    grad = setup.embedding
    per_layer: list[int] = []
    full_layer = 0
    for index in range(shape.layers):
        trains_layer = index in setup.trained_layers
        trained = set(LINEARS) | {"input_norm", "post_norm"} if trains_layer else set()
        lora = set(setup.lora_targets)
        n, fp32, out_req = layer_saved_elements(shape, grad, trained, lora, setup.lora_rank, seq, eager)
        layer = tokens * (n * dtype_bytes + fp32 * 4)
        if gradient_checkpointing and (grad or out_req):
            full_layer = max(full_layer, layer)
            layer = tokens * shape.hidden * dtype_bytes if grad else 0
        per_layer.append(layer)
        grad = out_req
    if gradient_checkpointing:
        per_layer.append(full_layer)  # the block being recomputed during backward
    norm, y_req = _norm_saved(shape.hidden, grad, setup.final_norm)
    head = shape.hidden if setup.head else 0  # the head's input, for its weight gradient
    # rotary cos and sin (one per position, shared by the batch)
    rope = 2 * seq * shape.head_dim * dtype_bytes
    ids = tokens * 8 if setup.embedding else 0  # token ids (int64) when the embedding trains
    if shape.head == "score":
        # one output per token, read at each sequence's last token (two int64 indices per sequence);
        # the pairwise loss keeps its input and a buffer (fp32, one per sequence). Nothing vocabulary-wide.
        return Activations(per_layer, tokens * (norm + head) * dtype_bytes, rope + batch * 20 + ids)
    final = tokens * ((norm + head) * dtype_bytes + (shape.vocab * 4 if y_req or head else 0))
    # the shifted labels (int64: a view of the padded labels for one row, a copy of batch x seq for
    # more); the loss normaliser
    labels = (seq + 1 if batch == 1 else tokens) * 8
    other = rope + labels + ids + 4
    return Activations(per_layer, final, other)


def logits_bytes(batch: int, seq: int, vocab: int) -> int:
    """One fp32 copy of the logits: batch x seq x vocab x 4 bytes."""
    return batch * seq * vocab * 4


# ---------------------------------------------------------------------------------------------------
# Memory


@dataclass
class Memory:
    """Predicted bytes of one training step on one device, by part."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    logits_extra: int
    runtime: int  # the process itself (CPU: Python, torch, data) or the CUDA context
    gradient_checkpointing: bool
    allocator: int = 0  # CPU: freed heap memory glibc keeps
    reference: int = 0  # dpo under full/freeze: the frozen reference copy of the model

    @property
    def peak(self) -> int:
        act = self.activations_checkpointed if self.gradient_checkpointing else self.activations
        return (
            self.weights
            + self.grads
            + self.optimizer
            + act
            + self.logits_extra
            + self.runtime
            + self.allocator
            + self.reference
        )


def optimizer_bytes_per_param(optim: str) -> int:
    """Optimizer state bytes per trainable parameter (AdamW: two fp32 moments)."""
    optim = str(getattr(optim, "value", optim)).lower()
    if "8bit" in optim:
        return 1 if "lion" in optim else 2
    if "lion" in optim or "sgd" in optim and "momentum" in optim:
        return 4
    if "sgd" in optim or "adafactor" in optim:
        return 0
    return 8


def weight_bytes(shape: ModelShape, setup: TrainSetup, dtype_bytes: int, quantization_bit: int | None) -> int:
    """Frozen weights in their dtype (or quantized), trainable ones in fp32 (sftflow keeps them in fp32)."""
    total, trainable = shape.total_params(), setup.trainable_params(shape)
    frozen = total if setup.kind == "lora" else total - trainable  # LoRA adapters come on top of the base
    if quantization_bit:
        linear = shape.layers * sum(shape.linear_params(n) for n in LINEARS)
        # peft's prepare_model_for_kbit_training casts the rest (embeddings, norms) to fp32
        frozen_bytes = linear * QUANTIZED_BYTES[quantization_bit] + (frozen - linear) * 4
    else:
        frozen_bytes = frozen * dtype_bytes
    return int(frozen_bytes + trainable * 4)


def sequences_per_row(stage: str) -> int:
    """Sequences a training row runs through the model: rm and dpo score chosen and rejected of a pair
    in one batch (2 x per_device_train_batch_size sequences)."""
    return 2 if stage in ("rm", "dpo") else 1


def step_memory(
    shape: ModelShape,
    setup: TrainSetup,
    stage: str,
    batch: int,
    seq: int,
    dtype_bytes: int,
    training: Seq2SeqTrainingArguments,
    model_args: ModelArguments,
    reference_model: bool,
    runtime: int,
    on_cpu: bool,
) -> Memory:
    """Bytes of one training step of `stage` on its largest batch: `batch` rows padded to `seq` tokens.

    rm and dpo run both sequences of a pair (2 x batch). rm's score head keeps no vocabulary-wide
    logits. dpo with `reference_model` (full/freeze tuning) holds a frozen copy of the model in its dtype;
    under LoRA the reference is the base with the adapter disabled (no extra weights). The reference's
    no-grad forward runs between the policy's forward and backward; its transient logits are no larger
    than the two copies the loss backward holds, so it adds no peak of its own.
    """
    sequences = batch * sequences_per_row(stage)
    eager = model_args.attn_implementation == "eager"
    gc = bool(training.gradient_checkpointing)
    act = activation_bytes(shape, setup, sequences, seq, dtype_bytes, eager)
    act_gc = activation_bytes(shape, setup, sequences, seq, dtype_bytes, eager, gradient_checkpointing=True)
    trainable = setup.trainable_params(shape)
    lm = shape.head == "lm"
    memory = Memory(
        weights=weight_bytes(shape, setup, dtype_bytes, model_args.quantization_bit),
        grads=trainable * 4,
        optimizer=trainable * optimizer_bytes_per_param(training.optim),
        activations=act.total,
        activations_checkpointed=act_gc.total,
        # backward of the loss holds the gradient of the log-softmax and of the logits (fp32) besides
        # the saved log-softmax
        logits_extra=2 * logits_bytes(sequences, seq, shape.vocab) if lm else 0,
        runtime=runtime,
        gradient_checkpointing=gc,
    )
    if reference_model:
        frozen = TrainSetup("lora")  # nothing trains: every weight in its dtype (or quantized)
        memory.reference = weight_bytes(shape, frozen, dtype_bytes, model_args.quantization_bit)
    if on_cpu:  # the log-softmax is big enough for mmap, which glibc returns at once
        used = act_gc if gc else act
        log_softmax = logits_bytes(sequences, seq, shape.vocab) if lm else 0
        memory.allocator = int(CPU_ALLOCATOR_RETENTION * (used.total - log_softmax))
    return memory
