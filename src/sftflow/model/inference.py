"""The model and tokenizer for generation (chat, api, predict): adapters merged, the run's chat template."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.data.vision import vision_config
from sftflow.errors import SftflowError
from sftflow.model.adapter import adapter_paths, check_adapter_dir, merge_adapters
from sftflow.model.loader import is_quantized, load_chat_tokenizer, load_model, model_path

if TYPE_CHECKING:
    from torch import nn

    from sftflow.config.parser import RunArgs

logger = logging.getLogger(__name__)


def load_for_inference(args: RunArgs, images: bool = False) -> tuple[Any, Any]:
    """The model with its adapter(s) merged in (kept as a PEFT wrapper on a quantized base) on the best
    device, and the tokenizer with the run's chat template: the last adapter's tokenizer when it has
    one (training saves it there), else the base model's; `template` from the config replaces it.
    `images`: the caller feeds images, so a model that sees loads as one (else it is refused).

    Raises:
        SftflowError: an adapter dir is invalid, or several adapters are given for a quantized base.
    """
    import torch

    allow_pickle = not args.model.use_safetensors
    paths = adapter_paths(args.model.adapter_name_or_path)
    for path in paths:
        check_adapter_dir(path, allow_pickle)
    last = Path(paths[-1]).expanduser() if paths else None
    source = str(last) if last is not None and (last / "tokenizer_config.json").is_file() else None
    tokenizer = load_chat_tokenizer(args.model, args.data, source=source)

    sees = images and vision_config(model_path(args.model)) is not None
    model = load_model(args.model, tokenizer, head="image" if sees else "lm")
    if not is_quantized(model):
        model = merge_adapters(model, paths, allow_pickle)  # plain weights: faster, same outputs
    elif paths:
        if len(paths) > 1:
            raise SftflowError(
                "a quantized base takes one adapter_name_or_path (adapters cannot be merged into 4/8-bit "
                "weights); merge the others first with sftflow export."
            )
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, paths[0])
    if torch.cuda.is_available() and not is_quantized(model):
        model = model.to("cuda")
    return model.eval(), tokenizer


def onednn_linear(model: nn.Module) -> int:
    """Run a CPU model's float32 `nn.Linear` layers through oneDNN (torch.utils.mkldnn.MkldnnLinear, weights
    converted once) for generation; returns how many were swapped. All or nothing: 0 for a model that is
    not float32 on a CPU, a quantized one, no oneDNN, or a model whose logits on a probe input change by
    more than rounding (1e-3 + 1e-3 x |logit|) after the swap (code that reads a layer's `.weight`
    itself, as Mamba's does, fails on a oneDNN weight): its layers are put back. The math is nn.Linear's
    up to float rounding (greedy tokens equal, logprobs within 1e-4: tests/test_infer_onednn.py); on this
    project's 2-core CPU a 16-row decode step ran ~1.6x faster (benchmarks/NOTES.md). A tied output layer
    gets a weight of its own (vocab x hidden x 4 bytes more). The model cannot be trained or saved after
    the swap. MkldnnLinear is a TorchScript module (deprecated by torch, still shipped): without it,
    nothing changes.
    """
    import warnings

    import torch

    if model.device.type != "cpu" or is_quantized(model) or not torch.backends.mkldnn.is_available():
        return 0
    try:
        from torch.utils.mkldnn import MkldnnLinear
    except ImportError:
        return 0
    # exactly nn.Linear: subclasses (quantized, LoRA) compute something else
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
    ]
    if not targets:
        return 0
    probe = torch.tensor([[1, 2, 3]], device=model.device)  # ids every vocabulary has
    try:
        # no_grad: else a converted weight's autograd node keeps its original alive
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's notice
            before = model(input_ids=probe).logits
            for parent, name, child in targets:
                setattr(parent, name, MkldnnLinear(child, torch.float32))
            after = model(input_ids=probe).logits
        # float rounding through ~30 layers moves logits of ~20 by ~1e-3 (SmolLM2 + merged LoRA: 1.2e-3);
        # a wrong computation moves them by whole units
        if not torch.allclose(before, after, atol=1e-3, rtol=1e-3):
            raise ValueError(f"logits moved by {float((before - after).abs().max()):.3g}")
    except Exception as exc:  # out of memory, meta weights, a model that reads .weight: plain layers
        for parent, name, child in targets:
            setattr(parent, name, child)
        logger.warning("oneDNN Linear layers not used for this model (%s: %s)", type(exc).__name__, exc)
        return 0
    # the weights may be views of the memory-mapped checkpoint, which stays mapped (and its pages
    # resident, ~500 MB for SmolLM2) while any tensor uses it: copy the rest out so that it goes
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return len(targets)
