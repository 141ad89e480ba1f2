"""Decide what trains: LoRA adapters (PEFT), every weight (full), or the last layers (freeze)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import FinetuningArguments, ModelArguments

logger = logging.getLogger(__name__)


def linear_module_names(model: Any) -> list[str]:
    """Short names of the linear layers LoRA can target (the output head excluded)."""
    import torch

    output_head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_head
    }
    return sorted(names)


def apply_finetuning(model: Any, model_args: ModelArguments, finetuning_args: FinetuningArguments) -> Any:
    """Return the model ready to train: wrapped in a LoRA PeftModel, or with the right params frozen.

    Raises:
        SftflowError: lora_target names no module of the model.
    """
    kind = finetuning_args.finetuning_type
    if kind == "lora":
        model = _apply_lora(model, model_args, finetuning_args)
    elif kind == "freeze":
        _freeze_all_but_last_layers(model, finetuning_args.freeze_trainable_layers)
    else:
        model.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != _float32():
            param.data = param.data.float()  # optimizer states and updates in fp32 even on a bf16 base
    trainable, total = count_parameters(model)
    logger.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def _float32() -> Any:
    import torch

    return torch.float32


def _apply_lora(model: Any, model_args: ModelArguments, args: FinetuningArguments) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if model_args.adapter_name_or_path:
        return PeftModel.from_pretrained(model, model_args.adapter_name_or_path, is_trainable=True)
    available = linear_module_names(model)
    if args.lora_target == ["all"]:
        targets: list[str] | str = available
    else:
        unknown = [t for t in args.lora_target if t not in available]
        if unknown:
            raise SftflowError(
                f"lora_target {unknown} not found in the model; its linear layers are {available} (or use all)."
            )
        targets = args.lora_target
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
    )
    return get_peft_model(model, config)


def _freeze_all_but_last_layers(model: Any, n: int) -> None:
    layers = _decoder_layers(model)
    chosen = layers[-n:] if n > 0 else layers[:-n]
    if not chosen:
        raise SftflowError(f"freeze_trainable_layers={n} selects no layer (the model has {len(layers)}).")
    model.requires_grad_(False)
    for layer in chosen:
        layer.requires_grad_(True)


def _decoder_layers(model: Any) -> Any:
    import torch

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise SftflowError("freeze tuning needs a model with a `layers` list of decoder blocks.")


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
