"""Training a model that sees: which of its parts train (`freeze_vision_tower`,
`freeze_multi_modal_projector`, `freeze_language_model`, as LLaMA-Factory) and the run settings image
batches cannot take.

Parts, by module name (transformers 5 layouts):
  - llava: vision tower `model.vision_tower`, projector `model.multi_modal_projector`, language model
    `model.language_model` + `lm_head`;
  - qwen2_vl: vision tower `model.visual` (its blocks and patch embedding), projector `model.visual.merger`,
    language model `model.language_model` + `lm_head`.
A frozen part gets no LoRA and, with finetuning_type: full, no gradient. LoRA targets (lora_target, `all`
by default) are matched in the unfrozen parts only: the language model unless told otherwise.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sftflow.data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FAMILIES, Vision, load_vision
from sftflow.errors import SftflowError
from sftflow.model.loader import model_path

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.args import FinetuningArguments, ModelArguments
    from sftflow.config.parser import RunArgs

logger = logging.getLogger(__name__)

PARTS = {
    "llava": {
        "vision_tower": ["model.vision_tower"],
        "multi_modal_projector": ["model.multi_modal_projector"],
        "language_model": ["model.language_model", "lm_head"],
    },
    "qwen2_vl": {
        "vision_tower": ["model.visual.patch_embed", "model.visual.blocks", "model.visual.rotary_pos_emb"],
        "multi_modal_projector": ["model.visual.merger"],
        "language_model": ["model.language_model", "lm_head"],
    },
}
FLAGS = {
    "vision_tower": "freeze_vision_tower",
    "multi_modal_projector": "freeze_multi_modal_projector",
    "language_model": "freeze_language_model",
}


def model_family(model: nn.Module) -> str | None:
    """llava or qwen2_vl for a model whose parts `PARTS` knows, else None (a text model)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vision_config"):
        return None
    return FAMILIES.get(getattr(config, "model_type", ""))


def _strip(name: str) -> str:
    """A module name without PEFT's wrapper prefixes (base_model.model.)."""
    return name.removeprefix("base_model.model.")


def frozen_prefixes(family: str, finetuning: FinetuningArguments) -> list[str]:
    """Module name prefixes of the parts the freeze_* flags keep frozen."""
    return [
        prefix
        for part, prefixes in PARTS[family].items()
        if getattr(finetuning, FLAGS[part])
        for prefix in prefixes
    ]


def in_parts(name: str, prefixes: list[str]) -> bool:
    """Whether module `name` lies under one of `prefixes`.

    >>> in_parts("model.visual.merger.mlp.0", ["model.visual.merger"]), in_parts("model.visualx", ["model.visual"])
    (True, False)
    """
    name = _strip(name)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def lora_modules(model: nn.Module, targets: list[str], frozen: list[str]) -> list[str]:
    """Full names of the linear layers LoRA adapts: named in `targets` (short names) and not frozen.

    Raises:
        SftflowError: nothing is left to adapt.
    """
    import torch

    head = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not head
        and name.rsplit(".", 1)[-1] in targets
        and not in_parts(name, frozen)
    ]
    if not names:
        raise SftflowError(
            f"lora_target {targets} matches no linear layer outside the frozen parts ({', '.join(frozen)}); "
            "set freeze_language_model: false, or unfreeze a vision part."
        )
    return names


def freeze_parts(model: nn.Module, frozen: list[str]) -> None:
    """Stop gradients to every parameter under `frozen` (full tuning of a model that sees)."""
    for name, param in model.named_parameters():
        if in_parts(name, frozen):
            param.requires_grad_(False)


def load_run_vision(args: RunArgs, tokenizer: PreTrainedTokenizerBase) -> Vision | None:
    """The run's `Vision` (None for a text model) after checking the run suits it.

    Raises:
        SftflowError: image keys set for a text model, or settings image batches cannot take.
    """
    model_args: ModelArguments = args.model
    vision = load_vision(
        model_path(model_args), tokenizer, model_args.image_max_pixels, model_args.image_min_pixels
    )
    if vision is None:
        _check_text_model(args)
        return None
    finetuning, data = args.finetuning, args.data
    reasons = {
        "packing: true": (data.packing, "packed rows would need image features placed per example"),
        "use_dft_loss: true": (finetuning.use_dft_loss, "it needs the padding-free loss (fast_loss)"),
        f"finetuning_type: {finetuning.finetuning_type}": (
            finetuning.finetuning_type not in ("lora", "full"),
            "image models train with lora or full (freeze_* flags choose the parts)",
        ),
        "use_llama_pro: true": (finetuning.use_llama_pro, "LLaMA Pro expands text decoder stacks only"),
        f"stage: {finetuning.stage}": (finetuning.stage != "sft", "image models train in the sft stage"),
    }
    for key, (bad, why) in reasons.items():
        if bad:
            raise SftflowError(f"{key} is not supported for image models ({vision.model_type}): {why}.")
    if finetuning.fast_loss:
        logger.warning(
            "fast_loss does not apply to image batches (pixel inputs cannot be flattened padding-free); "
            "%s trains on the model's own loss.",
            vision.model_type,
        )
    return vision


def _check_text_model(args: RunArgs) -> None:
    """A text model with an image key set: refuse it rather than ignore it."""
    set_keys = [
        key
        for key, value, default in (
            ("image_max_pixels", args.model.image_max_pixels, DEFAULT_MAX_PIXELS),
            ("image_min_pixels", args.model.image_min_pixels, DEFAULT_MIN_PIXELS),
            ("freeze_vision_tower", args.finetuning.freeze_vision_tower, True),
            ("freeze_multi_modal_projector", args.finetuning.freeze_multi_modal_projector, True),
            ("freeze_language_model", args.finetuning.freeze_language_model, False),
        )
        if value != default
    ]
    if set_keys:
        raise SftflowError(
            f"{', '.join(set_keys)} apply to models that see; {args.model.model_name_or_path} is text-only "
            "(no vision_config). Remove them."
        )


def vision_generate_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The image inputs of a batch that `generate` must also get."""
    return {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
