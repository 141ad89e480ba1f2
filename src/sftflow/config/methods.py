"""Per-method rules: a tuning method (LLaMA-Factory's key names) that cannot run with the rest of the
config is refused before anything loads, naming the key, the reason and what to set instead.

The methods themselves live where they act: optimizers in train/optim.py, adapters in model/adapter.py,
the DFT loss in train/loss.py, KTO in stages/kto.py, SimPO in train/preference.py.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from sftflow.config.args import DataArguments, FinetuningArguments, ModelArguments

# the optimizer-side methods: key -> (import name, pip package, tuning types it works with)
OPTIMIZER_METHODS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "loraplus_lr_ratio": (None, None, ("lora",)),
    "use_muon": (None, None, ("lora", "oft", "full", "freeze")),
    "use_galore": ("galore_torch", "galore-torch", ("full", "freeze")),
    "use_apollo": ("apollo_torch", "apollo-torch", ("full", "freeze")),
    "use_badam": ("badam", "badam", ("full",)),
    "use_adam_mini": ("adam_mini", "adam-mini", ("full", "freeze", "lora")),
}

HQQ = (
    "quantization_method: hqq is refused: transformers 5.24's HqqConfig raises NotImplementedError, and "
    "sftflow does not patch hqq into the model itself. Use quantization_method: bnb with quantization_bit: 4 "
    "(QLoRA) or 8."
)


NEFTUNE_FAST_LOSS = (
    "neftune_noise_alpha with fast_loss: true is refused: NEFTune's noise is alpha / sqrt(L * d) with L the "
    "row length, and the fast loss runs the whole batch as one padding-free row, so every example would get "
    "noise sqrt(batch) times weaker than NEFTune defines. Set fast_loss: false (the padded batch, as in "
    "LLaMA-Factory and the HF Trainer)."
)


def _chosen_optimizer_methods(finetuning: FinetuningArguments) -> list[str]:
    return [
        key
        for key in OPTIMIZER_METHODS
        if (
            finetuning.loraplus_lr_ratio is not None
            if key == "loraplus_lr_ratio"
            else getattr(finetuning, key)
        )
    ]


def check_methods(
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    training: Seq2SeqTrainingArguments,
) -> None:
    """Refuse a method that does not fit the stage, the tuning type or the other keys, or whose package is
    not installed.

    Raises:
        SftflowError: naming the key, the reason and the fix.
    """
    stage, kind = finetuning.stage, finetuning.finetuning_type
    if model.quantization_method == "hqq":
        raise SftflowError(HQQ)
    chosen = _chosen_optimizer_methods(finetuning)
    if len(chosen) > 1:
        raise SftflowError(f"{' and '.join(chosen)} each build the optimizer; set only one of them.")
    for key in chosen:
        module, package, kinds = OPTIMIZER_METHODS[key]
        if kind not in kinds:
            raise SftflowError(f"{key} works with finetuning_type: {' or '.join(kinds)}, not {kind}.")
        if module and importlib.util.find_spec(module) is None:
            raise SftflowError(
                f"{key} needs the {package} package: pip install {package} (or 'sftflow[methods]')."
            )
    if finetuning.loraplus_lr_ratio is not None and finetuning.loraplus_lr_ratio <= 0:
        raise SftflowError(
            f"loraplus_lr_ratio must be > 0 (16 in the LoRA+ paper), got {finetuning.loraplus_lr_ratio}."
        )
    for name in ("galore", "apollo"):
        if (
            getattr(finetuning, f"use_{name}")
            and getattr(finetuning, f"{name}_layerwise")
            and training.gradient_accumulation_steps != 1
        ):
            raise SftflowError(
                f"{name}_layerwise updates each weight in backward, once per micro-batch, so it cannot accumulate "
                f"gradients (LLaMA-Factory refuses it too): set gradient_accumulation_steps: 1 (got "
                f"{training.gradient_accumulation_steps}) and raise per_device_train_batch_size instead."
            )
    if (chosen or training.neftune_noise_alpha is not None) and (training.deepspeed or training.fsdp):
        raise SftflowError(
            f"{(chosen or ['neftune_noise_alpha'])[0]} is not supported with DeepSpeed/FSDP in sftflow (they build or "
            "shard the optimizer themselves); remove deepspeed/fsdp or the method."
        )
    if finetuning.pissa_init:
        if kind != "lora":
            raise SftflowError(
                f"pissa_init initialises a LoRA adapter: needs finetuning_type: lora, not {kind}."
            )
        if model.quantization_bit is not None or model.adapter_name_or_path:
            raise SftflowError(
                "pissa_init rewrites the base weights into their residual: it needs an unquantized base and a new "
                "adapter (remove quantization_bit / adapter_name_or_path)."
            )
        if finetuning.pissa_iter != -1 and not finetuning.pissa_convert:
            raise SftflowError(
                f"pissa_init with pissa_iter: {finetuning.pissa_iter} (randomised SVD) needs pissa_convert: true: "
                "the adapter in output_dir is relative to a residual base that PEFT recomputes when it loads it, "
                "which only reproduces with an exact SVD. Set pissa_convert: true (pissa_converted/ is a plain LoRA "
                "for the original base) or pissa_iter: -1."
            )
    if kind == "oft" and stage not in ("sft", "pt"):
        raise SftflowError(
            f"finetuning_type: oft runs with stage: sft or pt, not {stage}; use lora for {stage}."
        )
    if kind == "oft" and (
        model.quantization_bit is not None or model.adapter_name_or_path or model.new_special_tokens
    ):
        raise SftflowError(
            "finetuning_type: oft builds a new adapter on an unquantized base and trains no embedding rows; remove "
            "quantization_bit / adapter_name_or_path / new_special_tokens (or use finetuning_type: lora)."
        )
    if finetuning.use_llama_pro and kind not in ("freeze", "lora"):
        raise SftflowError(
            f"use_llama_pro trains the expanded blocks with finetuning_type: freeze or lora, not {kind}."
        )
    if training.neftune_noise_alpha is not None:
        if stage not in ("sft", "pt"):
            raise SftflowError(f"neftune_noise_alpha applies to stage: sft or pt, not {stage}.")
        if finetuning.fast_loss:
            raise SftflowError(NEFTUNE_FAST_LOSS)
    if finetuning.use_dft_loss:
        if stage != "sft":
            raise SftflowError(f"use_dft_loss is an sft loss; stage {stage} has its own loss.")
        if not finetuning.fast_loss:
            raise SftflowError("use_dft_loss is computed by sftflow's fused loss: set fast_loss: true.")
    if finetuning.pref_loss == "simpo" and stage != "dpo":
        raise SftflowError(f"pref_loss: simpo runs in stage: dpo, not {stage}.")
    if finetuning.simpo_gamma < 0:
        raise SftflowError(f"simpo_gamma must be >= 0, got {finetuning.simpo_gamma}.")
    if stage == "kto":
        check_kto(data, finetuning, training)


def check_kto(
    data: DataArguments, finetuning: FinetuningArguments, training: Seq2SeqTrainingArguments
) -> None:
    """KTO's reference KL term comes from mismatched answers (stages/kto.py pairs them, also at batch size 1).

    Raises:
        SftflowError: streaming, packing, predict, train_on_prompt or a negative weight.
    """
    if data.train_on_prompt:
        raise SftflowError("stage: kto scores the last answer only; set train_on_prompt: false.")
    if data.streaming or data.packing:
        raise SftflowError(
            "stage: kto reads whole tagged examples into memory; set streaming: false and packing: false."
        )
    if training.do_predict:
        raise SftflowError(
            "stage: kto does not predict; set do_predict: false (`sftflow predict` answers prompts)."
        )
    if min(finetuning.kto_chosen_weight, finetuning.kto_rejected_weight) <= 0:
        raise SftflowError("kto_chosen_weight and kto_rejected_weight must be > 0.")


# stages LLaMA-Factory has and sftflow does not: the reason, for `check_stage_name`
OUT_OF_SCOPE_STAGES = {
    "ppo": (
        "stage: ppo is out of scope: PPO generates answers in the training loop and scores them with a separate "
        "reward model and value head (TRL's experimental PPOTrainer). Train a reward model with stage: rm, or "
        "tune on preference data with stage: dpo (pref_loss: sigmoid/ipo/hinge/orpo/simpo) or stage: kto."
    ),
}


def check_stage_name(stage: Any) -> None:
    """Refuse a LLaMA-Factory stage that sftflow leaves out, with the reason (before the value is coerced).

    Raises:
        SftflowError: stage is ppo.
    """
    if isinstance(stage, str) and stage.strip().lower() in OUT_OF_SCOPE_STAGES:
        raise SftflowError(OUT_OF_SCOPE_STAGES[stage.strip().lower()])
