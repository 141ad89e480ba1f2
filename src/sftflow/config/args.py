"""The typed configuration of a run. Each field's docstring is its documentation (`sftflow train --help`).

Training keys (learning rate, batch size, epochs, ...) are those of HF `Seq2SeqTrainingArguments`;
the four dataclasses here hold everything else. Field names are unique across all five classes, so a
flat `key: value` config maps to exactly one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sftflow.errors import SftflowError


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: str | None = None
    """Local HF model dir, hub id (when online), a .gguf file, or a bundled name (smollm2-135m-instruct)."""

    adapter_name_or_path: str | None = None
    """A PEFT adapter dir to load on top of the model (continue training it, or chat with it)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU (bf16 is ~100x slower on CPU)."""

    quantization_bit: int | None = None
    """Load the base model in 4 or 8 bits with bitsandbytes (QLoRA). Needs finetuning_type: lora."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to from_pretrained."""

    trust_remote_code: bool = False
    """Allow model code from the model dir/hub repo to run. Only enable for sources you trust."""

    cache_dir: str | None = None
    """Where bundled/GGUF models are converted once to safetensors (default: $SFTFLOW_CACHE or ~/.cache/sftflow)."""

    def __post_init__(self) -> None:
        if self.quantization_bit not in (None, 4, 8):
            raise SftflowError(f"quantization_bit must be 4, 8 or unset, got {self.quantization_bit}.")


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into tokens."""

    dataset: list[str] | None = None
    """Training dataset names from dataset_dir/dataset_info.json, comma-separated."""

    eval_dataset: list[str] | None = None
    """Held-out dataset names used for eval and predict (instead of splitting off val_size)."""

    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files it names (relative to the working dir)."""

    template: str | None = None
    """Chat template: unset uses the tokenizer's own; or a built-in name (alpaca, default, chatml)."""

    cutoff_len: int = 1024
    """Max tokens per example. Longer examples lose later turns, then the end of the response; examples whose prompt alone is too long are dropped (and counted)."""

    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on assistant responses)."""

    max_samples: int | None = None
    """Use at most this many examples from each dataset (for quick runs)."""

    val_size: float = 0.0
    """Held-out share of the training data: a fraction in (0, 1) or a number of examples (>= 1)."""

    preview_rows: int = 2
    """How many converted and tokenized examples to print before training."""

    preprocessing_num_workers: int | None = None
    """Processes for tokenization (datasets.map num_proc)."""

    def __post_init__(self) -> None:
        if self.cutoff_len < 8:
            raise SftflowError(f"cutoff_len must be at least 8, got {self.cutoff_len}.")
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            raise SftflowError(
                f"val_size must be a fraction in [0, 1) or a whole number of examples, got {self.val_size}."
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise SftflowError(f"max_samples must be a positive number, got {self.max_samples}.")


@dataclass
class FinetuningArguments:
    """What to train and what to write besides the model."""

    stage: Literal["sft"] = "sft"
    """Training stage. sft: supervised fine-tuning on conversations."""

    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    """lora: train low-rank adapters; full: train every weight; freeze: train only the last layers."""

    lora_rank: int = 8
    """LoRA rank r."""

    lora_alpha: int | None = None
    """LoRA scaling alpha (default: 2 * lora_rank)."""

    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""

    lora_target: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt, comma-separated (e.g. q_proj,v_proj), or all = every linear layer but the output head."""

    freeze_trainable_layers: int = 2
    """freeze: train the last n decoder layers (the first n with a negative number)."""

    plot_loss: bool = True
    """Write training_loss.png (and training_eval_loss.png when there is eval loss)."""

    compare_base: bool = True
    """With LoRA, also run predict with the adapter disabled and write generated_predictions_base.jsonl."""

    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that already holds files (else the run stops before loading anything)."""

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise SftflowError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise SftflowError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank


@dataclass
class GeneratingArguments:
    """Decoding settings for predict (and chat)."""

    do_sample: bool = False
    """Sample instead of greedy decoding."""

    temperature: float = 0.95
    """Sampling temperature (with do_sample)."""

    top_p: float = 0.7
    """Nucleus sampling mass (with do_sample)."""

    top_k: int = 50
    """Top-k sampling (with do_sample)."""

    num_beams: int = 1
    """Beam search width (1 = no beam search)."""

    max_new_tokens: int = 128
    """Max tokens generated per answer."""

    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeating tokens."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise SftflowError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise SftflowError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise SftflowError("max_new_tokens and num_beams must be >= 1.")

    def to_generation_kwargs(self) -> dict:
        """The kwargs for `transformers.GenerationConfig` (sampling knobs only when sampling)."""
        kwargs = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs
