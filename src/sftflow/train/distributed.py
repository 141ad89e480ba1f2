"""What a run of several processes (torchrun / accelerate launch / DeepSpeed / FSDP) needs beyond the
Trainer's own handling:

- `data_step_first`: the main process of each node tokenizes into the cache while the others wait on a
  gloo barrier of their own with `DATA_STEP_TIMEOUT`, not inside the process group's collectives (whose
  timeout, `ddp_timeout`, would fire while a large dataset is tokenized: LLaMA-Factory #2424); then they
  read the cache it wrote;
- `fused_head_reason`: where the fused trained-token head (loss.py) is exact, and why not elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

# How long the other ranks wait for the data step (tokenizing a large dataset can take hours).
DATA_STEP_TIMEOUT = datetime.timedelta(hours=24)


@contextlib.contextmanager
def data_step_first(
    training: TrainingArguments,
    desc: str = "dataset preprocessing",
    timeout: datetime.timedelta | None = None,
) -> Iterator[None]:
    """`TrainingArguments.main_process_first` for long work: the main process of each node runs the body
    first; the others wait for it on a gloo group made for this wait, whose timeout is `timeout`
    (`DATA_STEP_TIMEOUT`), so no collective of the run's process group (NCCL's watchdog, `ddp_timeout`)
    waits on it. As with the Trainer's version, a main process that raises still releases the others (they
    then run the body themselves and meet the same error). One process: the body runs as it is."""
    if training.world_size <= 1:
        yield
        return
    import torch.distributed as dist

    timeout = timeout or DATA_STEP_TIMEOUT
    main = training.local_process_index == 0
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        if not main:
            logger.info(
                "rank %d waits for the main process to finish %s (up to %s on a gloo barrier of its own: the "
                "process group's ddp_timeout does not apply to this wait).",
                training.process_index,
                desc,
                timeout,
            )
            dist.barrier(group=group)
        yield
    finally:
        if main:
            dist.barrier(group=group)
        dist.destroy_process_group(group)


def fused_head_reason(trainer: Any) -> str | None:
    """Why the fused trained-token head (`loss.linear_cross_entropy`, reading the head's weight outside
    the model's forward) cannot run under this trainer's launcher; None where it is exact.

    One process and DDP hold the whole head weight on every rank, and so do DeepSpeed ZeRO-1/2 (they shard
    the optimizer state and gradients, not the weights). FSDP and ZeRO-3 shard the weight and gather it
    only inside the wrapped module's forward: there the loss runs through the model's forward with
    `logits_to_keep` (the trained positions only), which is exact too, just without the fused chunks.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP shards the output head's weight and gathers it only inside the model's forward"
    if getattr(trainer, "is_deepspeed_enabled", False) and zero_stage(trainer) == 3:
        return (
            "DeepSpeed ZeRO-3 shards the output head's weight and gathers it only inside the model's forward"
        )
    return None


def zero_stage(trainer: Any) -> int | None:
    """The DeepSpeed ZeRO stage of `trainer`'s accelerator (None without DeepSpeed), read where the HF
    Trainer reads it."""
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return int(stage) if stage is not None else None
