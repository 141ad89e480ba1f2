"""Per-stage rules: settings a stage cannot honour are refused before anything loads, with the reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
