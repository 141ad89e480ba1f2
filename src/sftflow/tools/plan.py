"""`sftflow plan CONFIG [--measure]`: will this run fit, how long will it take, is the data sound?

Everything is computed from the config, the model's config.json and the tokenized data, without loading
the weights (seconds); `--measure` also times a few real training steps on the longest examples. The
formulas are written out in docs/plan.md; the activation count is exact for Llama-style decoders
(Llama, Mistral, Qwen2, SmolLM, ...) with sdpa attention in fp32, which tests/test_plan.py checks by
counting the tensors autograd saves in a tiny model.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError

GIB = 1024**3
ATTN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZED_BYTES = {4: 4.127 / 8, 8: 1.0}  # NF4 with double-quantized absmax; int8 with a scale per row
# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, and the share of it a fine-tuning
# run typically reaches (model FLOPs utilisation).
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
GPU_MFU = 0.35
# On CPU, a training step reaches this share of the fp32 matmul throughput probed at the model's
# shapes (the rest goes to attention, norms, softmax over the vocabulary and the optimizer); calibrated
# on the demo (SmolLM2-135M LoRA: 75 GFLOP/s in training against a 116 GFLOP/s probe on 2 cores).
CPU_STEP_EFFICIENCY = 0.65
# On CPU, glibc keeps freed heap memory (tensors under its 32 MB mmap threshold) in its arenas, so the
# process RSS exceeds the live tensors by about this share of the block activations (benchmarks/
# plan_accuracy.py; with MALLOC_MMAP_THRESHOLD_=65536 the RSS matches the live bytes within 1%).
CPU_ALLOCATOR_RETENTION = 0.9


# ---------------------------------------------------------------------------------------------------
# Model shape and parameter counts


@dataclass
class ModelShape:
    """The sizes of a Llama-style decoder, read from its config.json."""

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

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the sizes from a `transformers.PretrainedConfig`."""
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
            tied=bool(get(config, "tie_word_embeddings", False)),
            attention_bias=bool(get(config, "attention_bias", False)) or config.model_type == "qwen2",
            mlp_bias=bool(get(config, "mlp_bias", False)),
        )

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

    def total_params(self) -> int:
        """Embedding + blocks + final norm (+ the output head when not tied to the embedding)."""
        embed = self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + (0 if self.tied else embed)

    def matmul_params(self) -> int:
        """Parameters used in a matrix product per token: every linear layer and the output head."""
        return self.layers * sum(self.linear_params(n) for n in LINEARS) + self.vocab * self.hidden


@dataclass
class TrainSetup:
    """What trains: LoRA targets and rank, whole layers (full/freeze), embedding and final norm."""

    kind: str
    lora_targets: frozenset[str] = frozenset()
    lora_rank: int = 0
    trained_layers: frozenset[int] = frozenset()
    embedding: bool = False  # the input embedding (and a tied output head) trains
    final_norm: bool = False

    @classmethod
    def from_args(cls, shape: ModelShape, finetuning: Any) -> TrainSetup:
        """The setup `sftflow.model.adapter.apply_finetuning` builds for these arguments."""
        kind = finetuning.finetuning_type
        if kind == "lora":
            targets = set(LINEARS) if finetuning.lora_target == ["all"] else set(finetuning.lora_target)
            unknown = targets - set(LINEARS)
            if unknown:
                raise SftflowError(
                    f"lora_target {sorted(unknown)} is not a linear layer of a {shape.model_type} block "
                    f"({', '.join(LINEARS)})."
                )
            return cls(kind, frozenset(targets), finetuning.lora_rank)
        if kind == "freeze":
            n = finetuning.freeze_trainable_layers
            layers = range(shape.layers)
            chosen = list(layers)[-n:] if n > 0 else list(layers)[:-n]
            return cls(kind, trained_layers=frozenset(chosen))
        return cls(kind, trained_layers=frozenset(range(shape.layers)), embedding=True, final_norm=True)

    def trainable_params(self, shape: ModelShape) -> int:
        """LoRA: r * (in + out) per adapted layer; full/freeze: the parameters of the trained blocks."""
        if self.kind == "lora":
            shapes = shape.linear_shapes()
            per_layer = sum(self.lora_rank * sum(shapes[name]) for name in self.lora_targets)
            return shape.layers * per_layer
        n = len(self.trained_layers) * shape.layer_params()
        if self.embedding:
            n += shape.vocab * shape.hidden * (1 if shape.tied else 2)
        return n + (shape.hidden if self.final_norm else 0)


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
    head = shape.hidden if setup.embedding or (setup.kind == "full" and not shape.tied) else 0
    final = tokens * ((norm + head) * dtype_bytes + (shape.vocab * 4 if y_req or head else 0))
    # rotary cos and sin (one per position, shared by the batch); the shifted labels (int64: a view of
    # the padded labels for one row, a copy of batch x seq for more); token ids when the embedding
    # trains; the loss normaliser
    rope = 2 * seq * shape.head_dim * dtype_bytes
    labels = (seq + 1 if batch == 1 else tokens) * 8
    other = rope + labels + (tokens * 8 if setup.embedding else 0) + 4
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


# ---------------------------------------------------------------------------------------------------
# Data audit


@dataclass
class DataAudit:
    """What the tokenized training data looks like at this cutoff_len."""

    per_dataset: dict[str, int]
    eval_examples: int
    examples: int
    lengths: list[int]  # tokens after cutoff_len, kept examples only
    full_lengths: list[int]  # tokens before cutoff_len, every example
    trained: list[int]  # trained (label) tokens after cutoff_len, kept examples only
    truncated: int
    dropped: int
    duplicates: int
    conflicting: int  # same prompt, different answers
    empty_responses: int  # nothing trained but the end-of-turn token
    eot_untrained: int  # kept examples whose last trained token is not an end-of-turn token
    eot_tokens: list[str]
    cutoff_len: int

    def percentiles(self, values: list[int] | None = None) -> dict[str, int]:
        values = sorted(self.full_lengths if values is None else values)
        if not values:
            return {}
        pick = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
        out = {k: values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] for k, q in pick.items()}
        return {"min": values[0], **out, "max": values[-1]}

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def trained_share(self) -> float:
        return sum(self.trained) / max(1, self.tokens)


def batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The lengths of each batch of one epoch, shuffled as the trainer's random sampler would."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [[lengths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def packed_rows(lengths: list[int], cutoff_len: int) -> list[int]:
    """Row lengths when examples are packed into rows of at most cutoff_len tokens (greedy, in order)."""
    rows, current = [], 0
    for length in lengths:
        if current and current + length > cutoff_len:
            rows.append(current)
            current = 0
        current += length
    return [*rows, current] if current else rows


def padded_tokens(lengths: list[int], batch_size: int, seed: int) -> int:
    """Tokens computed in one epoch when each batch is padded to its longest example."""
    return sum(len(b) * max(b) for b in batches(lengths, batch_size, seed))


def audit_conversations(
    conversations: list[list[dict[str, str]]], tokenizer: Any, data: Any, stop_ids: set[int]
) -> dict[str, Any]:
    """Tokenize every conversation as training will (and without cutoff_len) and count what matters."""
    from sftflow.data.encode import IGNORE_INDEX, encode_sft

    options = {"mask_history": data.mask_history, "cutoff_policy": data.cutoff_policy}
    out: dict[str, Any] = {
        "lengths": [],
        "full_lengths": [],
        "trained": [],
        "truncated": 0,
        "dropped": 0,
        "empty_responses": 0,
        "eot_untrained": 0,
    }
    seen: set[str] = set()
    answers: dict[str, str] = {}
    duplicates = conflicting = 0
    for messages in conversations:
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        prompt_key = json.dumps(messages[:-1], sort_keys=True, ensure_ascii=False)
        duplicates += key in seen
        seen.add(key)
        answer = messages[-1]["content"]
        if prompt_key in answers and answers[prompt_key] != answer:
            conflicting += 1
        answers.setdefault(prompt_key, answer)
        full = encode_sft(tokenizer, messages, 10**9, data.train_on_prompt, stop_ids, **options)
        encoded = encode_sft(tokenizer, messages, data.cutoff_len, data.train_on_prompt, stop_ids, **options)
        out["full_lengths"].append(len(full.input_ids))
        if encoded.dropped:
            out["dropped"] += 1
            continue
        out["truncated"] += encoded.truncated
        labels = [t for t in encoded.labels if t != IGNORE_INDEX]
        out["lengths"].append(len(encoded.input_ids))
        out["trained"].append(len(labels))
        if not [t for t in labels if t not in stop_ids]:
            out["empty_responses"] += 1
        if not labels or labels[-1] not in stop_ids:
            out["eot_untrained"] += 1
    out["duplicates"], out["conflicting"] = duplicates, conflicting
    return out


def audit_data(args: Any, tokenizer: Any) -> DataAudit:
    """Load the run's datasets as `sftflow train` does and audit the training split.

    Raises:
        SftflowError: a dataset is missing or malformed (the same errors `sftflow train` gives), or
            streamed (the audit reads every example).
    """
    from sftflow.data.encode import stop_token_ids
    from sftflow.data.loader import LoadReport
    from sftflow.data.prepare import load_datasets

    if args.data.streaming:
        raise SftflowError("plan reads every example to count tokens; run it with streaming=false.")
    report = LoadReport()
    train, held_out = load_datasets(args.data, args.training.seed, "sft", True, report)
    if train is None:
        raise SftflowError("plan needs training data: set dataset and do_train: true.")
    per_dataset = {name: count.kept for name, count in report.datasets.items()}
    stop_ids = stop_token_ids(tokenizer)
    counts = audit_conversations(train["messages"], tokenizer, args.data, stop_ids)
    return DataAudit(
        per_dataset=per_dataset,
        eval_examples=len(held_out) if held_out is not None else 0,
        examples=len(train),
        cutoff_len=args.data.cutoff_len,
        eot_tokens=sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))),
        **counts,
    )


# ---------------------------------------------------------------------------------------------------
# Device and throughput


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
    """fp32 matmul FLOP/s at the model's own shapes: a (tokens x hidden) by (hidden x intermediate) product.

    Timed in CPU seconds of this process per torch thread, so other processes competing for the cores
    do not lower it: the figure is what the cores give when the run has them to itself.
    """
    import torch

    tokens = max(64, min(tokens, 4096))
    a = torch.randn(tokens, shape.hidden)
    b = torch.randn(shape.hidden, shape.intermediate)
    torch.mm(a, b)  # warm up
    runs, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    busy = (time.process_time() - cpu) / torch.get_num_threads()
    return 2 * tokens * shape.hidden * shape.intermediate * runs / max(busy, 1e-9)


def known_gpu_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like `name`, if we know it."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def flops_per_token(shape: ModelShape, setup: TrainSetup, seq: float, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token.

    N is the parameters in matmuls (block linears and the output head). LoRA: 4N (forward 2N, input
    gradients 2N, no gradients for frozen weights) plus 6 per adapter parameter; full: 6N; freeze: 4N
    plus 2 per trained linear parameter. Attention adds 12 * layers * heads * head_dim * seq (forward
    QK^T and PV, 4 * ..., backward twice that). Gradient checkpointing adds another forward.
    """
    n = shape.matmul_params()
    if setup.kind == "lora":
        core = 4 * n + 6 * setup.trainable_params(shape)
    else:  # weight gradients of the trained linear layers (norms and embedding lookups are no matmuls)
        block = sum(shape.linear_params(name) for name in LINEARS)
        head = shape.vocab * shape.hidden if setup.embedding else 0
        core = 4 * n + 2 * (len(setup.trained_layers) * block + head)
    forward = 2 * n
    attention = 12 * shape.layers * shape.heads * shape.head_dim * seq
    return core + attention + ((forward + attention / 3) if gradient_checkpointing else 0)


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Advice:
    change: str
    reason: str


@dataclass
class Plan:
    """Everything `sftflow plan` prints."""

    shape: ModelShape
    setup: TrainSetup
    device: Device
    dtype: str
    batch_size: int
    accumulation: int
    audit: DataAudit
    memory: Memory
    largest_seq: int
    total_params: int
    trainable_params: int
    steps: int
    epochs: float
    padded_tokens_per_epoch: int
    flops_per_epoch: float
    flops_per_second: float
    throughput_source: str
    advice: list[Advice] = field(default_factory=list)
    measured: dict[str, float] | None = None

    @property
    def seconds(self) -> float:
        return self.flops_per_epoch * self.epochs / self.flops_per_second

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.device.memory


def dtype_name_and_bytes(model_args: Any, device: Device) -> tuple[str, int]:
    """The dtype `load_model` will use on this device."""
    if model_args.dtype != "auto":
        name = model_args.dtype
    elif device.kind == "cuda":
        import torch

        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        name = "float32"
    return name, 4 if name == "float32" else 2


def epoch_flops(
    lengths: list[int], batch_size: int, seed: int, shape: ModelShape, setup: TrainSetup, gc: bool
) -> float:
    """FLOPs of one epoch, each batch padded to its longest example."""
    return sum(
        len(b) * max(b) * flops_per_token(shape, setup, max(b), gc)
        for b in batches(lengths, batch_size, seed)
    )


def build_plan(args: Any, measure_steps_count: int = 0) -> Plan:
    """Predict memory and time, audit the data and gather advice for the run `args` describes."""
    import psutil
    from transformers import AutoConfig

    from sftflow.data.template import apply_template
    from sftflow.model.loader import load_tokenizer, model_path

    config = AutoConfig.from_pretrained(
        model_path(args.model), trust_remote_code=args.model.trust_remote_code
    )
    config = getattr(config, "text_config", None) or config
    tokenizer = load_tokenizer(args.model)
    apply_template(tokenizer, args.data.template, args.data.template_file)
    shape = ModelShape.from_config(config)
    shape.vocab = max(shape.vocab, len(tokenizer))  # new_special_tokens grow the embeddings
    setup = TrainSetup.from_args(shape, args.finetuning)
    audit = audit_data(args, tokenizer)
    if not audit.lengths:
        raise SftflowError(f"no training example fits cutoff_len={args.data.cutoff_len}; raise cutoff_len.")
    # what the trainer batches: examples, or with packing rows of cutoff_len tokens
    rows = packed_rows(audit.lengths, args.data.cutoff_len) if args.data.packing else audit.lengths

    device = find_device()
    dtype, dtype_bytes = dtype_name_and_bytes(args.model, device)
    training = args.training
    batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    largest = max(rows)  # the largest batch: the longest example padded across the batch
    eager = args.model.attn_implementation == "eager"
    act = activation_bytes(shape, setup, batch, largest, dtype_bytes, eager)
    act_gc = activation_bytes(shape, setup, batch, largest, dtype_bytes, eager, gradient_checkpointing=True)
    trainable = setup.trainable_params(shape)
    runtime = psutil.Process().memory_info().rss if device.kind == "cpu" else int(0.5 * GIB)
    memory = Memory(
        weights=weight_bytes(shape, setup, dtype_bytes, args.model.quantization_bit),
        grads=trainable * 4,
        optimizer=trainable * optimizer_bytes_per_param(training.optim),
        activations=act.total,
        activations_checkpointed=act_gc.total,
        # backward of the loss holds the gradient of the log-softmax and of the logits (fp32) besides
        # the saved log-softmax
        logits_extra=2 * logits_bytes(batch, largest, shape.vocab),
        runtime=runtime,
        gradient_checkpointing=bool(training.gradient_checkpointing),
    )
    if device.kind == "cpu":  # the log-softmax is big enough for mmap, which glibc returns at once
        used = act_gc if memory.gradient_checkpointing else act
        memory.allocator = int(
            CPU_ALLOCATOR_RETENTION * (used.total - logits_bytes(batch, largest, shape.vocab))
        )
    world = max(1, getattr(training, "world_size", 1))
    steps_per_epoch = max(1, math.ceil(len(rows) / (batch * world)) // accumulation)
    epochs = training.num_train_epochs
    if training.max_steps and training.max_steps > 0:
        epochs = training.max_steps / steps_per_epoch
    flops = epoch_flops(rows, batch, training.seed, shape, setup, memory.gradient_checkpointing)
    plan = Plan(
        shape=shape,
        setup=setup,
        device=device,
        dtype=dtype,
        batch_size=batch,
        accumulation=accumulation,
        audit=audit,
        memory=memory,
        largest_seq=largest,
        total_params=shape.total_params(),
        trainable_params=trainable,
        steps=math.ceil(epochs * steps_per_epoch),
        epochs=epochs,
        padded_tokens_per_epoch=padded_tokens(rows, batch, training.seed),
        flops_per_epoch=flops / world,
        flops_per_second=1.0,
        throughput_source="",
    )
    plan.flops_per_second, plan.throughput_source = throughput(plan, dtype)
    if measure_steps_count:
        plan.measured = measure_steps(args, measure_steps_count)
        plan.flops_per_second = plan.measured["flops_per_second"]
        plan.throughput_source = f"measured over {measure_steps_count} steps"
    plan.advice = advise(plan, args)
    return plan


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


def advise(plan: Plan, args: Any) -> list[Advice]:
    """Concrete config changes, each with the reason, for what looks off."""
    out: list[Advice] = []
    audit, memory, device = plan.audit, plan.memory, plan.device
    pct = audit.percentiles(audit.full_lengths)
    if not plan.fits:
        per_sample = (memory.activations + memory.logits_extra) / plan.batch_size
        fixed = memory.peak - memory.activations - memory.logits_extra
        fitting = int((device.memory * 0.9 - fixed) // per_sample) if per_sample else 0
        if fitting >= 1:
            ga = math.ceil(plan.batch_size * plan.accumulation / fitting)
            out.append(
                Advice(
                    f"per_device_train_batch_size: {fitting}, gradient_accumulation_steps: {ga}",
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
            out.append(
                Advice("finetuning_type: lora", "no gradients or optimizer states for the base weights")
            )
        elif not args.model.quantization_bit and device.kind == "cuda":
            out.append(Advice("quantization_bit: 4", "QLoRA stores the frozen base in ~4 bits"))
    if audit.truncated or audit.dropped:
        target = _round_up(pct.get("p99", audit.cutoff_len), 64)
        if target > audit.cutoff_len:
            out.append(
                Advice(
                    f"cutoff_len: {target}",
                    f"{audit.truncated} examples are truncated and {audit.dropped} dropped at cutoff_len "
                    f"{audit.cutoff_len}; 99% are at most {pct['p99']} tokens",
                )
            )
    if audit.eot_untrained:
        out.append(
            Advice(
                "raise cutoff_len or shorten the longest answers",
                f"{audit.eot_untrained} examples lose their end-of-turn token to truncation: the model "
                "does not learn to stop there",
            )
        )
    padded = plan.padded_tokens_per_epoch
    pad_share = 1 - audit.tokens / padded if padded else 0.0
    if pad_share > 0.25 and plan.batch_size > 1:
        smaller = max(1, plan.batch_size // 2)
        smaller_pad = 1 - audit.tokens / padded_tokens(audit.lengths, smaller, args.training.seed)
        out.append(
            Advice(
                f"per_device_train_batch_size: {smaller}, gradient_accumulation_steps: {plan.accumulation * 2}",
                f"padding is {pad_share:.0%} of the computed tokens (lengths vary from {pct['min']} to "
                f"{pct['max']}); half the batch with twice the accumulation pads {smaller_pad:.0%} "
                "for the same effective batch",
            )
        )
    if audit.duplicates:
        out.append(
            Advice(
                "remove duplicate examples",
                f"{audit.duplicates} examples repeat an earlier one exactly and count twice in the loss",
            )
        )
    if audit.conflicting:
        out.append(
            Advice(
                "check examples that share a prompt",
                f"{audit.conflicting} prompts appear with different answers; fine for varied data, "
                "a labelling mistake otherwise",
            )
        )
    if audit.empty_responses:
        out.append(
            Advice(
                "fix or drop empty answers",
                f"{audit.empty_responses} examples train nothing but the end-of-turn token: the model "
                "learns to answer with nothing",
            )
        )
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


# ---------------------------------------------------------------------------------------------------
# Measuring real steps


def measure_steps(args: Any, steps: int, warmup: int = 1) -> dict[str, float]:
    """Train `warmup + steps` real steps on the longest examples (the worst batches) and measure.

    Memory is sampled only inside the training steps (not while the model loads): peak process RSS on
    CPU, `torch.cuda.max_memory_allocated` on GPU.

    Returns:
        step_seconds (mean wall time of the timed steps), busy_step_seconds (CPU: CPU seconds per torch
        thread, the step time on an idle machine), peak_bytes, baseline_bytes (RSS before the first
        step), tokens_per_step, seq (padded length), flops_per_second (from busy_step_seconds).
    """
    import copy
    import tempfile

    import psutil
    import torch
    from transformers import Trainer, TrainerCallback

    from sftflow.data.collator import SftCollator
    from sftflow.data.prepare import prepare
    from sftflow.data.template import apply_template
    from sftflow.model.adapter import apply_finetuning
    from sftflow.model.loader import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    apply_template(tokenizer, args.data.template, args.data.template_file)
    dataset = prepare("sft", args.data, tokenizer, args.training.seed, True).train
    if dataset is None:
        raise SftflowError("--measure needs training data: set dataset and do_train: true.")
    batch = args.training.per_device_train_batch_size * args.training.gradient_accumulation_steps
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    # every batch is the largest one the data can form: the longest example, batch times
    dataset = dataset.select([longest] * batch * (steps + warmup))
    seq = lengths[longest]

    model = apply_finetuning(
        load_model(args.model, tokenizer),
        args.model,
        args.finetuning,
        tokenizer=tokenizer,
        gradient_checkpointing=bool(args.training.gradient_checkpointing),
        gradient_checkpointing_kwargs=args.training.gradient_checkpointing_kwargs,
    )
    on_gpu = torch.cuda.is_available()
    process = psutil.Process()
    state: dict[str, Any] = {"sampling": False, "peak": 0, "times": [], "cpu": [], "start": 0.0, "step": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if state["sampling"]:
                state["peak"] = max(state["peak"], process.memory_info().rss)
            time.sleep(0.002)

    class Timer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            state["start"], state["cpu_start"] = time.perf_counter(), time.process_time()
            state["sampling"] = state["step"] >= warmup  # the first steps allocate optimizer states

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if state["step"] >= warmup:
                state["times"].append(time.perf_counter() - state["start"])
                state["cpu"].append((time.process_time() - state["cpu_start"]) / torch.get_num_threads())
            state["step"] += 1

    training = copy.deepcopy(args.training)
    with tempfile.TemporaryDirectory() as tmp:
        for key, value in {
            "output_dir": tmp,
            "max_steps": steps + warmup,
            "logging_strategy": "no",
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": [],
            "do_eval": False,
            "disable_tqdm": True,
        }.items():
            setattr(training, key, value)
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=dataset,
            data_collator=SftCollator(tokenizer.pad_token_id),
            callbacks=[Timer()],
        )
        thread = threading.Thread(target=sample, daemon=True)
        baseline = process.memory_info().rss
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        thread.start()
        try:
            trainer.train()
        finally:
            stop.set()
            thread.join()
    peak = torch.cuda.max_memory_allocated() if on_gpu else state["peak"]
    shape = ModelShape.from_config(getattr(model.config, "text_config", None) or model.config)
    setup = TrainSetup.from_args(shape, args.finetuning)
    step_seconds = sum(state["times"]) / max(1, len(state["times"]))
    # CPU: seconds of the cores' time per thread, i.e. the step time on an otherwise idle machine
    busy_seconds = sum(state["cpu"]) / max(1, len(state["cpu"])) if not on_gpu else step_seconds
    step_flops = batch * seq * flops_per_token(shape, setup, seq, bool(training.gradient_checkpointing))
    return {
        "step_seconds": step_seconds,
        "busy_step_seconds": busy_seconds,
        "peak_bytes": float(peak),
        "baseline_bytes": float(baseline),
        "tokens_per_step": float(batch * seq),
        "seq": float(seq),
        "flops_per_second": step_flops / busy_seconds if busy_seconds else 1.0,
    }


# ---------------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """The plan as the terminal shows it."""
    s, m, a = plan.shape, plan.memory, plan.audit
    lines = [
        f"sftflow plan: {s.model_type}, {plan.total_params / 1e6:.1f}M parameters, {plan.setup.kind}"
        + (
            f" r={plan.setup.lora_rank} on {','.join(sorted(plan.setup.lora_targets))}"
            if plan.setup.lora_rank
            else ""
        ),
        f"  device: {plan.device.name}, {_gib(plan.device.memory)} ({_gib(plan.device.available)} free), dtype {plan.dtype}",
        "",
        f"Memory per device (largest batch: {plan.batch_size} x {plan.largest_seq} tokens)",
        f"  weights              {_gib(m.weights)}",
        f"  trainable params     {plan.trainable_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)",
        f"  gradients            {_gib(m.grads)}",
        f"  optimizer states     {_gib(m.optimizer)}",
        f"  activations          {_gib(m.activations)} ({m.activations / (plan.batch_size * plan.largest_seq) / 1024:.0f} KiB/token)"
        + ("" if m.gradient_checkpointing else "  <- used"),
        f"    with checkpointing {_gib(m.activations_checkpointed)} "
        f"({m.activations_checkpointed / (plan.batch_size * plan.largest_seq) / 1024:.0f} KiB/token)"
        + ("  <- used" if m.gradient_checkpointing else ""),
        f"  logits in backward   {_gib(m.logits_extra)} (2 x batch x seq x vocab {s.vocab} x 4 B)",
        f"  {'process (measured)' if plan.device.kind == 'cpu' else 'CUDA context':<20} {_gib(m.runtime)}",
        *(
            [f"  allocator retention  {_gib(m.allocator)} (glibc keeps freed activations)"]
            if m.allocator
            else []
        ),
        f"  predicted peak       {_gib(m.peak)}  -> "
        + ("fits" if plan.fits else "DOES NOT FIT")
        + f" in {_gib(plan.device.memory)}",
        "",
        "Time",
        f"  tokens per epoch     {a.tokens:,} ({plan.padded_tokens_per_epoch:,} with padding)",
        f"  FLOPs per token      {flops_per_token(s, plan.setup, plan.largest_seq, m.gradient_checkpointing) / 1e9:.2f} GFLOP "
        f"({'4N' if plan.setup.kind == 'lora' else '6N'} + attention, N={s.matmul_params() / 1e6:.0f}M in matmuls)",
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
    pct = a.percentiles()
    trained_pct = a.percentiles(a.trained)
    lines += [
        "",
        "Data",
        "  examples             " + ", ".join(f"{k}: {v}" for k, v in a.per_dataset.items()),
        f"  train / held out     {a.examples} / {a.eval_examples}",
        "  length (tokens)      " + ", ".join(f"{k} {v}" for k, v in pct.items()),
        "  trained tokens       " + ", ".join(f"{k} {v}" for k, v in trained_pct.items()),
        f"  cutoff_len {a.cutoff_len:<9} {a.truncated} truncated, {a.dropped} dropped",
        f"  trained share        {a.trained_share:.0%} of tokens are trained (the rest is prompt)",
        f"  duplicates           {a.duplicates} exact, {a.conflicting} prompts with differing answers",
        f"  empty responses      {a.empty_responses}",
        f"  end-of-turn trained  {len(a.lengths) - a.eot_untrained} of {len(a.lengths)} examples "
        f"({', '.join(a.eot_tokens)})",
        "",
        "Advice",
    ]
    lines += [f"  - {x.change}\n      because {x.reason}" for x in plan.advice] or [
        "  none: the config looks sound"
    ]
    return "\n".join(lines)
