"""Decide what trains: LoRA or OFT adapters (PEFT), every weight (full), or chosen layers (freeze).

Methods on top: PiSSA (`pissa_init`: the LoRA starts from the principal singular vectors of each weight and
the base keeps the residual, PEFT `init_lora_weights="pissa_niter_N"`; `pissa_convert` saves the trained
adapter as a plain LoRA on the original base, `PissaConvert`), OFT (`finetuning_type: oft`, PEFT OFTConfig)
and LLaMA Pro (`use_llama_pro`: only the expanded blocks train, `llama_pro_layers`).

Whatever the tuning type, trainable parameters end up in fp32 (optimizer states and updates stay exact on a
bf16/fp16/quantized base), gradient checkpointing is on only when asked, and existing adapters are either
continued or merged into the base before a new one is trained. On a model that sees, the freeze_* flags
choose its trained parts (`sftflow.model.vision`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError
from sftflow.model.loader import check_safe_weights, is_quantized, new_token_ids
from sftflow.model.vision import freeze_parts, frozen_prefixes, lora_modules, model_family

if TYPE_CHECKING:
    from torch import nn
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from sftflow.config.args import FinetuningArguments, ModelArguments

logger = logging.getLogger(__name__)


def adapter_paths(value: str | None) -> list[str]:
    """Split `adapter_name_or_path` (comma-separated) into adapter dirs, in stacking order.

    >>> adapter_paths("saves/a, saves/b")
    ['saves/a', 'saves/b']
    """
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def check_adapter_dir(path: str, allow_pickle: bool) -> None:
    """Raise SftflowError unless `path` is a local PEFT adapter dir with loadable weights."""
    adapter = Path(path).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise SftflowError(
            f"adapter_name_or_path: {path} is not a PEFT adapter dir (no adapter_config.json). Point it at the "
            "output_dir of a LoRA run."
        )
    check_safe_weights(adapter, "adapter", allow_pickle)


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (the output head excluded)."""
    import torch

    output_head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is output_head or ".lora_" in name or name.endswith("base_layer"):
            continue
        # bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear, so quantized bases are covered
        if isinstance(module, torch.nn.Linear):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_finetuning(
    model: PreTrainedModel,
    model_args: ModelArguments,
    finetuning_args: FinetuningArguments,
    tokenizer: PreTrainedTokenizerBase | None = None,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
    task_type: str = "CAUSAL_LM",
) -> Any:
    """Return the model ready to train: wrapped in a LoRA PeftModel, or with the right params frozen.

    Args:
        model: the base model from `load_model` (already resized for new_special_tokens).
        model_args: the model section (adapters to continue or stack, new_special_tokens).
        finetuning_args: tuning type and its settings.
        tokenizer: needed with new_special_tokens, to find the rows of the new tokens.
        gradient_checkpointing: recompute activations in backward (less memory, ~20% slower).
        gradient_checkpointing_kwargs: passed to torch.utils.checkpoint (default: use_reentrant=False).
        task_type: PEFT task type of the LoRA wrapper (SEQ_CLS for a reward model).

    Raises:
        SftflowError: a setting that does not fit the model (unknown module names, adapters with
            full/freeze tuning, adapters to merge into a quantized base, ...).
    """
    kind = finetuning_args.finetuning_type
    quantized = is_quantized(model)
    if finetuning_args.use_llama_pro and kind not in ("freeze", "lora"):
        raise SftflowError(
            f"use_llama_pro trains the expanded blocks with finetuning_type: freeze or lora, not {kind}."
        )
    if adapter_paths(model_args.adapter_name_or_path) and kind != "lora":
        raise SftflowError(
            f"adapter_name_or_path works with finetuning_type: lora, not {kind}. To train a merged model "
            "fully, merge it first with `sftflow export` and point model_name_or_path at export_dir."
        )
    new_ids = new_token_ids(tokenizer, model_args) if tokenizer is not None else []
    if model_args.new_special_tokens and tokenizer is None:
        raise SftflowError("new_special_tokens needs the tokenizer passed to apply_finetuning.")
    if quantized:
        from peft import prepare_model_for_kbit_training

        # casts the non-quantized weights (norms, embeddings) to fp32 and freezes everything
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
    family = model_family(model)
    frozen = frozen_prefixes(family, finetuning_args) if family else None
    if kind == "lora":
        model = _apply_lora(model, model_args, finetuning_args, new_ids, quantized, task_type, frozen)
    elif kind == "oft":
        model = _apply_oft(model, finetuning_args, task_type)
    elif kind == "freeze" and finetuning_args.use_llama_pro:
        freeze_layers(
            model,
            0,
            finetuning_args.freeze_trainable_modules,
            finetuning_args.freeze_extra_modules,
            layer_ids=llama_pro_layers(len(_decoder_layers(model)), finetuning_args.freeze_trainable_layers),
        )
    elif kind == "freeze":
        freeze_layers(
            model,
            finetuning_args.freeze_trainable_layers,
            finetuning_args.freeze_trainable_modules,
            finetuning_args.freeze_extra_modules,
        )
        if new_ids:  # the new rows must learn; freeze saves whole weights anyway
            model.get_input_embeddings().requires_grad_(True)
            model.get_output_embeddings().requires_grad_(True)
    else:
        model.requires_grad_(True)
        if frozen:
            freeze_parts(model, frozen)
    for param in model.parameters():
        if param.requires_grad and param.dtype != _float32():
            param.data = param.data.float()  # optimizer states and updates in fp32 even on a bf16 base
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise SftflowError("no parameter trains: the freeze_* flags freeze every part of the model.")
    logger.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f%s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        " || gradient checkpointing on" if gradient_checkpointing else "",
    )
    return model


def enable_gradient_checkpointing(model: PreTrainedModel, kwargs: dict | None = None) -> None:
    """Turn on activation recomputation, with the input-grad hook that frozen embeddings need.

    With LoRA or freeze the embedding output does not require grad; without the hook, reentrant
    checkpointing would silently give the checkpointed layers no gradient.
    """
    kwargs = dict(kwargs) if kwargs else {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False  # the cache is useless in training and conflicts with recomputation


def _float32() -> Any:
    import torch

    return torch.float32


def _apply_lora(
    model: PreTrainedModel,
    model_args: ModelArguments,
    args: FinetuningArguments,
    new_ids: list[int],
    quantized: bool,
    task_type: str,
    frozen: list[str] | None = None,
) -> Any:
    """The LoRA model; `frozen` (a model that sees): module prefixes that get no LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model

    paths = adapter_paths(model_args.adapter_name_or_path)
    if paths:
        for path in paths:
            check_adapter_dir(path, allow_pickle=not model_args.use_safetensors)
        if quantized and (len(paths) > 1 or args.create_new_adapter):
            raise SftflowError(
                "a quantized base cannot have adapters merged into it: give one adapter_name_or_path to continue "
                "training it, or merge on the unquantized base first (sftflow export)."
            )
        to_merge = paths if args.create_new_adapter else paths[:-1]
        model = merge_adapters(model, to_merge, allow_pickle=not model_args.use_safetensors)
        if not args.create_new_adapter:
            logger.info("continuing to train the adapter %s (its own rank and targets apply)", paths[-1])
            return PeftModel.from_pretrained(model, paths[-1], is_trainable=True)
    extra = args.additional_target or None
    # a module trained in full (modules_to_save, e.g. a reward head) is not also a LoRA target
    available = [name for name in linear_module_names(model) if name not in (extra or [])]
    if args.lora_target == ["all"]:
        targets: list[str] = available
    else:
        unknown = [t for t in args.lora_target if t not in available]
        if unknown:
            raise SftflowError(
                f"lora_target {unknown} not found in the model; its linear layers are {available} (or use all)."
            )
        targets = args.lora_target
    if frozen is not None:  # full names of the chosen layers in the unfrozen parts only
        targets = lora_modules(model, targets, frozen)
    if args.use_llama_pro:  # only the expanded blocks' linear layers (PEFT matches a name's dotted suffix)
        layers = _decoder_layers(model)
        targets = [
            f"layers.{i}.{name}"
            for i in llama_pro_layers(len(layers), args.freeze_trainable_layers)
            for name, module in layers[i].named_modules()
            if name and name.rsplit(".", 1)[-1] in targets and isinstance(module, _linear())
        ]
    if extra:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in extra if t not in names]
        if unknown:
            raise SftflowError(f"additional_target {unknown} names no module of the model.")
    config = LoraConfig(
        task_type=task_type,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        init_lora_weights=pissa_init_name(args.pissa_iter) if args.pissa_init else True,
        modules_to_save=extra,
        # only the rows of the new tokens train and are saved; tied input/output embeddings stay tied
        trainable_token_indices=new_ids or None,
    )
    return get_peft_model(model, config)


def pissa_init_name(iterations: int) -> str:
    """PEFT's init_lora_weights for PiSSA: exact SVD (-1) or fast SVD with `iterations` subspace iterations.

    >>> pissa_init_name(16), pissa_init_name(-1)
    ('pissa_niter_16', 'pissa')
    """
    return "pissa" if iterations == -1 else f"pissa_niter_{iterations}"


def llama_pro_layers(num_layers: int, num_expanded: int) -> list[int]:
    """The expanded blocks of a LLaMA Pro model: the last block of each of `num_expanded` equal groups
    (LLaMA-Factory's scripts/llama_pro.py appends one identity-initialised copy after every group).

    >>> llama_pro_layers(8, 2)
    [3, 7]

    Raises:
        SftflowError: num_expanded does not divide the layers into equal groups.
    """
    if num_expanded < 1 or num_layers % num_expanded:
        raise SftflowError(
            f"use_llama_pro: freeze_trainable_layers (the number of expanded blocks) must be >= 1 and divide the "
            f"model's {num_layers} layers, got {num_expanded}."
        )
    stride = num_layers // num_expanded
    return list(range(stride - 1, num_layers, stride))


def _linear() -> Any:
    import torch

    return torch.nn.Linear


def _apply_oft(model: PreTrainedModel, args: FinetuningArguments, task_type: str) -> Any:
    """PEFT OFT adapters (orthogonal block-diagonal rotations of each target weight's input side)."""
    from peft import OFTConfig, get_peft_model

    available = linear_module_names(model)
    targets = available if args.oft_target == ["all"] else args.oft_target
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise SftflowError(
            f"oft_target {unknown} not found in the model; its linear layers are {available} (or use all)."
        )
    if (args.oft_rank == 0) == (args.oft_block_size == 0):
        raise SftflowError(
            f"OFT needs exactly one of oft_rank and oft_block_size set (the other 0), got oft_rank={args.oft_rank}, "
            f"oft_block_size={args.oft_block_size}."
        )
    config = OFTConfig(
        task_type=task_type,
        r=args.oft_rank,
        oft_block_size=args.oft_block_size,
        module_dropout=args.module_dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # a block size that does not divide a layer's input size
        raise SftflowError(
            f"finetuning_type: oft: {exc} Choose another oft_block_size (or oft_rank)."
        ) from None


def pissa_converted_dir(output_dir: str | Path) -> Path:
    """Where `pissa_convert` writes the trained adapter as a plain LoRA on the original base."""
    return Path(output_dir) / "pissa_converted"


def save_pissa_converted(model: nn.Module, output_dir: str | Path, init_dir: str | Path) -> Path:
    """Save the trained PiSSA adapter of `model` as a plain LoRA (rank 2r) that works on the original,
    unmodified base: PEFT subtracts the initial adapter saved in `init_dir`. Returns the dir written."""
    out = pissa_converted_dir(output_dir)
    model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(init_dir))
    return out


def method_callbacks(finetuning: FinetuningArguments, output_dir: str | Path) -> list[Any]:
    """TrainerCallbacks an adapter method needs: `PissaConvert` with pissa_init + pissa_convert."""
    if not (finetuning.finetuning_type == "lora" and finetuning.pissa_init and finetuning.pissa_convert):
        return []
    from transformers import TrainerCallback

    class PissaConvert(TrainerCallback):
        """Save the initial PiSSA adapter (output_dir/pissa_init, kept on resume) before the first step, and
        the trained adapter converted to a plain LoRA on the original base (pissa_converted/) at the end."""

        def on_train_begin(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            model: nn.Module | None = None,
            **kwargs: Any,
        ) -> None:
            init = Path(output_dir) / "pissa_init"
            if state.is_world_process_zero and not (init / "adapter_config.json").is_file():
                model.save_pretrained(str(init))

        def on_train_end(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            model: nn.Module | None = None,
            **kwargs: Any,
        ) -> None:
            if state.is_world_process_zero:
                path = save_pissa_converted(model, output_dir, Path(output_dir) / "pissa_init")
                logger.info("pissa_convert: the adapter as a plain LoRA on the original base is in %s", path)

    return [PissaConvert()]


def merge_adapters(model: PreTrainedModel, paths: list[str], allow_pickle: bool = False) -> Any:
    """Load each adapter in turn and merge it into the weights (the stacking order of the list).

    Raises:
        SftflowError: an adapter dir is invalid, or the model is quantized (merging would be lossy).
    """
    if not paths:
        return model
    from peft import PeftModel

    if is_quantized(model):
        raise SftflowError(
            "cannot merge adapters into a quantized base (the result would lose the adapter's precision). "
            "Load the base without quantization_bit to merge."
        )
    for path in paths:
        check_adapter_dir(path, allow_pickle)
        model = PeftModel.from_pretrained(model, path)
        model = model.merge_and_unload()
        logger.info("merged the adapter %s into the model", path)
    return model


def freeze_layers(
    model: nn.Module, n: int, modules: list[str], extra: list[str] | None, layer_ids: list[int] | None = None
) -> None:
    """Train only the last n decoder layers (first n if n < 0), or the layers `layer_ids`, optionally only
    some of their modules.

    Raises:
        SftflowError: n selects no layer, or a module name matches nothing.
    """
    layers = _decoder_layers(model)
    if layer_ids is not None:
        chosen = [layers[i] for i in layer_ids]
    else:
        chosen = layers[-n:] if n > 0 else layers[:-n]
        if n == 0 or not chosen:
            raise SftflowError(f"freeze_trainable_layers={n} selects no layer (the model has {len(layers)}).")
    model.requires_grad_(False)
    if modules == ["all"]:
        for layer in chosen:
            layer.requires_grad_(True)
    else:
        available = sorted(
            {part for name, _ in layers[0].named_modules() for part in name.split(".") if part}
        )
        unknown = [m for m in modules if m not in available]
        if unknown:
            raise SftflowError(
                f"freeze_trainable_modules {unknown} not found in a decoder layer; its modules are {available} "
                "(or use all)."
            )
        for layer in chosen:
            for name, param in layer.named_parameters():
                if set(name.split(".")) & set(modules):
                    param.requires_grad_(True)
    for wanted in extra or []:
        matched = [
            module
            for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == wanted and not any(module is layer for layer in layers)
        ]
        if not matched:
            raise SftflowError(f"freeze_extra_modules: {wanted!r} names no module of the model.")
        for module in matched:
            module.requires_grad_(True)


def _decoder_layers(model: nn.Module) -> Any:
    import torch

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise SftflowError("freeze tuning needs a model with a `layers` list of decoder blocks.")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as the number of values it packs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


def _numel(param: nn.Parameter) -> int:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        import math

        return math.prod(quant_state.shape)
    return param.numel()
