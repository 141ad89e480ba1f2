"""Trainer callbacks: the jsonl training log, and a clean stop with a checkpoint on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from types import FrameType

    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments


logger = logging.getLogger(__name__)


class TrainingInterrupted(SftflowError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


class JsonlLogCallback(TrainerCallback):
    """Append every log entry (with elapsed seconds) to output_dir/trainer_log.jsonl, main process only.

    On resume, entries after the checkpoint's step (written by the run that died) are dropped first, so
    the file holds each step once and the losses after the resume are those of the resumed run.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.start = time.time()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= state.global_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "elapsed_s": round(time.time() - self.start, 2),
            **logs,
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current optimizer step, save a checkpoint and stop training.

    A second SIGINT (Ctrl-C twice) stops at once without a checkpoint. Under torchrun every rank learns
    of a signal that reached any rank (one all-reduce per step), so all ranks save and stop at the same
    step. SIGTERM is left to the Trainer when `enable_jit_checkpoint` is set. After `train()` returns,
    `stopped_by` names the signal (None when training ran to the end).
    """

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.step: int | None = None
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self._received = signum
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping (Ctrl-C again to stop at once).",
            signal.Signals(signum).name,
        )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.stopped_by, self.step, self._received = None, None, None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        signals = [signal.SIGINT] + (
            [] if getattr(args, "enable_jit_checkpoint", False) else [signal.SIGTERM]
        )
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        received = self._received
        if args.world_size > 1:
            received = _max_across_ranks(received or 0, args.device) or None
        if received:
            self.stopped_by, self.step = signal.Signals(received).name, state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _max_across_ranks(value: int, device: torch.device) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
