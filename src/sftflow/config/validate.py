"""Per-stage rules: settings a stage cannot honour are refused before anything loads, with the reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sftflow.config.methods import check_methods
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config.args import DataArguments, FinetuningArguments, ModelArguments


def check_stage(
    model: ModelArguments, data: DataArguments, finetuning: FinetuningArguments, training: Any
) -> None:
    """Refuse what the configured stage does not support.

    Raises:
        SftflowError: pt or dpo with do_predict; rm or dpo with streaming or packing; rm with LoRA and a
            setting that needs a causal-LM adapter.
    """
    stage = finetuning.stage
    if stage == "pt" and training.do_predict:
        raise SftflowError(
            "stage: pt has nothing to predict (plain text has no prompts and answers). Set do_predict: false; "
            "do_eval reports the held-out loss and perplexity."
        )
    if stage == "dpo" and training.do_predict:
        raise SftflowError(
            "stage: dpo does not predict; set do_predict: false (do_eval reports the preference metrics on the "
            "held-out pairs; `sftflow predict` answers prompts with the tuned adapter)."
        )
    if stage in ("rm", "dpo"):
        check_pairwise(model, data, finetuning)
    check_methods(model, data, finetuning, training)  # per-method rules (config/methods.py)


def check_pairwise(model: ModelArguments, data: DataArguments, finetuning: FinetuningArguments) -> None:
    """The pairwise stages (rm, dpo) read whole pairs into memory; rm's LoRA is a SEQ_CLS adapter.

    Raises:
        SftflowError: streaming, packing, or (rm) a LoRA setting that needs a causal-LM adapter.
    """
    stage = finetuning.stage
    if data.streaming:
        raise SftflowError(f"stage: {stage} reads the pairs into memory; set streaming: false.")
    if data.packing:
        raise SftflowError(f"stage: {stage} scores whole pairs; packing does not apply. Set packing: false.")
    if stage == "rm" and finetuning.finetuning_type == "lora":
        unsupported = {
            "adapter_name_or_path": model.adapter_name_or_path,
            "quantization_bit": model.quantization_bit,
            "new_special_tokens": model.new_special_tokens,
        }
        given = [key for key, value in unsupported.items() if value]
        if given:
            raise SftflowError(
                f"stage: rm with LoRA does not support {', '.join(given)} yet (the reward adapter is a PEFT "
                "SEQ_CLS adapter built here, not the causal-LM one). Remove it, or use finetuning_type: full/freeze."
            )


def check_training(training: Any) -> None:
    """Range checks on HF training keys that transformers only trips over later (deep inside torch, or
    when the Trainer is built after the model loaded), so they fail here, before anything loads.

    Raises:
        SftflowError: naming the key and the fix.
    """
    at_least_one = (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    )
    for key in at_least_one:
        if getattr(training, key) < 1:
            raise SftflowError(f"{key} must be >= 1, got {getattr(training, key)}.")
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
        if getattr(training, key) < 0:
            raise SftflowError(f"{key} must be >= 0, got {getattr(training, key)}.")
    if training.max_steps < -1 or training.max_steps == 0:
        raise SftflowError(
            f"max_steps must be a positive number of steps or -1 (use num_train_epochs), got {training.max_steps}."
        )
    if training.max_steps == -1 and training.num_train_epochs <= 0:
        raise SftflowError(
            f"num_train_epochs must be > 0 (or set max_steps), got {training.num_train_epochs}."
        )
    check_report_to(training.report_to)


def check_report_to(report_to: list[str] | None) -> None:
    """Each tracker of report_to must be one transformers knows and installed (the Trainer would fail on it
    only after the model has loaded).

    Raises:
        SftflowError: an unknown or missing tracker.
    """
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    for name in report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise SftflowError(
                f"report_to: {name!r} is not a tracker transformers knows; use none, all or one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}."
            )
        if name not in installed:
            raise SftflowError(
                f"report_to: {name} is not installed (pip install {name}), or set report_to: none."
            )
