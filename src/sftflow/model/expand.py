"""`sftflow expand`: LLaMA Pro's block expansion (LLaMA-Factory's scripts/llama_pro.py), so that
`finetuning_type: freeze` with `use_llama_pro: true` has a model to train.

The decoder blocks are split into `num_expand` equal groups and a copy of each group's last block is inserted
after it, with its attention output projection (`o_proj`) and MLP down projection (`down_proj`) set to zero.
A block adds its attention and MLP outputs to the residual stream, and both now end in a zero matrix, so each
copy is the identity and the expanded model computes exactly what the original did. Training then moves only
the copies (`model.adapter.llama_pro_layers` finds them at the same positions).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.config.run_lock import is_lock_file, owned
from sftflow.errors import SftflowError
from sftflow.model.loader import resolve_model_path

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ZEROED = ("o_proj", "down_proj")  # the two projections that write a block's outputs into the residual stream


def identity_copy(block: nn.Module) -> nn.Module:
    """A copy of a decoder block whose output projections are zero: it passes the residual stream unchanged.

    Raises:
        SftflowError: the block has no `o_proj` or no `down_proj` (not a Llama-style block).
    """
    import torch

    clone = copy.deepcopy(block)
    found = {name.rsplit(".", 1)[-1]: module for name, module in clone.named_modules()}
    missing = [name for name in ZEROED if not isinstance(found.get(name), torch.nn.Linear)]
    if missing:
        raise SftflowError(
            f"LLaMA Pro expansion zeroes {' and '.join(ZEROED)} in each copied block; this model's blocks have no "
            f"{' or '.join(missing)} (Llama-style decoders do: Llama, Qwen2/3, Mistral, SmolLM)."
        )
    with torch.no_grad():
        for name in ZEROED:
            found[name].weight.zero_()
            if found[name].bias is not None:
                found[name].bias.zero_()
    return clone


def expand_model(model: Any, num_expand: int) -> list[int]:
    """Insert `num_expand` identity copies into `model`'s decoder blocks in place (config and the blocks'
    layer indices follow). Returns the indices of the new blocks.

    Raises:
        SftflowError: num_expand < 1 or not a divisor of the number of blocks, or blocks that cannot be copied.
    """
    import torch

    layers = model.get_decoder().layers
    count = len(layers)
    if num_expand < 1 or count % num_expand:
        raise SftflowError(
            f"num_expand must be >= 1 and divide the model's {count} decoder blocks into equal groups, got {num_expand}."
        )
    split = count // num_expand
    blocks, added = [], []
    for i, block in enumerate(layers):
        blocks.append(block)
        if (i + 1) % split == 0:
            added.append(len(blocks))
            blocks.append(identity_copy(block))
    for index, block in enumerate(blocks):  # the KV cache is addressed by these
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    model.get_decoder().layers = torch.nn.ModuleList(blocks)
    config = model.config
    config.num_hidden_layers = len(blocks)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == count:  # per-block attention kinds follow
        config.layer_types = [
            t for i, t in enumerate(layer_types) for _ in range(2 if (i + 1) % split == 0 else 1)
        ]
    return added


def expand_blocks(
    model_name_or_path: str, output_dir: str | Path, num_expand: int, overwrite: bool = False
) -> Path:
    """Write `model_name_or_path` expanded by `num_expand` identity blocks (and its tokenizer) to `output_dir`,
    in the checkpoint's own dtype.

    Raises:
        SftflowError: a non-empty output_dir without `overwrite`, output_dir = the source, a bad num_expand,
            or a model whose blocks cannot be expanded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(model_name_or_path)
    out = Path(output_dir).expanduser()
    if Path(source).exists() and Path(source).resolve() == out.resolve():
        raise SftflowError(f"output_dir {out} is the model being expanded; choose another dir.")
    if out.is_dir() and any(not is_lock_file(p) for p in out.iterdir()) and not overwrite:
        raise SftflowError(f"output_dir {out} already holds files; choose another dir or pass --overwrite.")
    with owned(out, "sftflow expand"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
        before = model.config.num_hidden_layers
        added = expand_model(model, num_expand)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    logger.info(
        "expanded %s from %d to %d blocks (new, identity: %s) into %s",
        source,
        before,
        before + num_expand,
        added,
        out,
    )
    return out
