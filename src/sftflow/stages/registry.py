"""`sftflow train`: run the recipe of the configured `stage` (pt, sft, rm, dpo, kto or grpo).

Each stage is one recipe function in its own module; they share the steps of `sftflow.train.steps`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs
    from sftflow.train.steps import RunResult

# stage -> (module, recipe function)
STAGES: dict[str, tuple[str, str]] = {
    "pt": ("sftflow.stages.pt", "run_pt"),
    "sft": ("sftflow.stages.sft", "run_sft"),
    "rm": ("sftflow.stages.rm", "run_rm"),
    "dpo": ("sftflow.stages.dpo", "run_dpo"),
    "kto": ("sftflow.stages.kto", "run_kto"),
    "grpo": ("sftflow.stages.grpo", "run_grpo"),
}


def run_stage(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the recipe of `args.finetuning.stage` and return its result.

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.
    """
    module, function = STAGES[args.finetuning.stage]
    return getattr(importlib.import_module(module), function)(args, callbacks=callbacks)
