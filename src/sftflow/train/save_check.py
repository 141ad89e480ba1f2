"""A check after every save: the adapter on disk is the one in memory.

Under FSDP2 + PEFT a save could keep only rank 0's shard of the LoRA weights and a resume then reset most
of lora_B to zero, silently (accelerate PR #4206, peft PR #3251). After each checkpoint and the final save,
every rank computes the L2 norm of each tensor of the adapter's state dict in memory (sharded weights
gathered: FSDP2's DTensors, DeepSpeed ZeRO-3's partitions), the saving process reads the saved adapter's
tensors and compares shapes and norms, and on a mismatch every rank stops with the same error, before the
checkpoint is renamed into place or the final files are published.

Cost: one norm per adapter tensor and one read of the adapter file (a few MB for LoRA) per save.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Relative tolerance of a norm: the same dtype on disk as in memory holds the same values (norms differ
# only by summation order); a cast on save (fp32 -> bf16) moves a norm by well under 1%.
SAME_DTYPE_RTOL = 1e-4
CAST_RTOL = 1e-2


def peft_model(model: Any) -> Any:
    """The PeftModel inside `model` (DDP/FSDP1 wrappers unwrapped), or None when it holds no adapter."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    inner = model
    for _ in range(4):
        if isinstance(inner, PeftModel):
            return inner
        inner = getattr(inner, "module", None) or getattr(inner, "_fsdp_wrapped_module", None)
        if inner is None:
            return None
    return None


def _gathered(tensors: list[Any]) -> Any:
    """A context in which DeepSpeed ZeRO-3's partitioned parameters hold their whole values."""
    if not any(hasattr(t, "ds_id") for t in tensors):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([t for t in tensors if hasattr(t, "ds_id")], modifier_rank=None)


def memory_norms(model: Any) -> dict[str, tuple[tuple[int, ...], str, float]] | None:
    """{name as saved: (shape, dtype, L2 norm)} of the active adapter's state dict in memory, or None when
    `model` holds no PeftModel. Under FSDP2 / ZeRO-3 every rank must call it (the norms are gathered)."""
    from peft.utils import get_peft_model_state_dict

    peft = peft_model(model)
    if peft is None:
        return None
    state = get_peft_model_state_dict(peft, adapter_name=peft.active_adapter)
    norms = {}
    with _gathered(list(state.values())):
        for name, tensor in state.items():
            value = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # an FSDP2 DTensor
            shape = tuple(value.shape)
            norms[name] = (
                shape,
                str(value.dtype).removeprefix("torch."),
                float(value.detach().double().norm()),
            )
    return norms


def disk_norms(directory: str | Path) -> dict[str, tuple[tuple[int, ...], str, float]] | None:
    """{name: (shape, dtype, L2 norm)} of the adapter saved in `directory`, or None when none is there."""
    import torch

    directory = Path(directory)
    path = next((directory / name for name in ADAPTER_FILES if (directory / name).is_file()), None)
    if path is None:
        return None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."), float(t.double().norm()))
        for name, t in state.items()
    }


def compare(memory: dict[str, Any], disk: dict[str, Any] | None, directory: str | Path) -> str | None:
    """What differs between the adapter in memory and the one saved in `directory` (None: nothing).

    >>> compare({"a": ((2,), "float32", 1.0)}, {"a": ((2,), "float32", 1.0)}, "d") is None
    True
    >>> print(compare({"a": ((2,), "float32", 1.0)}, {"a": ((2,), "float32", 0.5)}, "d"))
    the adapter saved in d is not the one in memory: a: L2 norm 0.5 on disk, 1 in memory (1 of 1 tensors differ)
    """
    if disk is None:
        return f"no adapter file ({' or '.join(ADAPTER_FILES)}) was written to {directory}"
    problems = []
    for name, (shape, dtype, norm) in memory.items():
        if name not in disk:
            problems.append(f"{name}: missing on disk")
            continue
        saved_shape, saved_dtype, saved_norm = disk[name]
        rtol = SAME_DTYPE_RTOL if saved_dtype == dtype else CAST_RTOL
        if saved_shape != shape:
            problems.append(f"{name}: shape {list(saved_shape)} on disk, {list(shape)} in memory")
        elif not math.isclose(saved_norm, norm, rel_tol=rtol, abs_tol=1e-6):
            problems.append(f"{name}: L2 norm {saved_norm:.6g} on disk, {norm:.6g} in memory")
    if not problems:
        return None
    shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    return (
        f"the adapter saved in {directory} is not the one in memory: {shown} "
        f"({len(problems)} of {len(memory)} tensors differ)"
    )


def verify_adapter_save(model: Any, directory: str | Path, reads: bool, distributed: bool) -> None:
    """Compare the adapter saved in `directory` with the one in memory; every rank calls it (`reads`: this
    process wrote `directory` and reads it back; `distributed`: a process group is up, so the ranks agree
    on the outcome). Nothing happens for a model without an adapter.

    Raises:
        SftflowError: on every rank, when the saved adapter differs (a shard lost, a tensor missing).
    """
    memory = memory_norms(model)
    if memory is None:
        return
    problem = compare(memory, disk_norms(directory), directory) if reads else None
    if distributed:
        import torch.distributed as dist

        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise SftflowError(
            f"{problem}. Training stopped: resuming from or serving this save would silently lose trained "
            "weights (under FSDP2 + PEFT a save that kept only rank 0's shard: accelerate PR #4206, peft PR "
            "#3251; update accelerate and peft, or save with fsdp_state_dict_type FULL_STATE_DICT). The "
            "save was not put in place; earlier checkpoints are untouched."
        )
