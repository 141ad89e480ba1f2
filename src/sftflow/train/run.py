"""`sftflow train`: run the workflow of the configured `stage` (pt, sft, rm or dpo).

Each stage is one workflow function in its own module; they share the config, data, model and reporting
steps of `sftflow.train.sft` (start_run, load_chat_tokenizer, load_datasets, build_model, train_and_save,
evaluate_and_report, format_summary).
"""

from __future__ import annotations

import importlib
from typing import Any

from sftflow.config import RunArgs

# stage -> (module, workflow function)
STAGES: dict[str, tuple[str, str]] = {
    "pt": ("sftflow.train.pt", "run_pt"),
    "sft": ("sftflow.train.sft", "run_sft"),
    "rm": ("sftflow.train.rm", "run_rm"),
    "dpo": ("sftflow.train.dpo", "run_dpo"),
}


def run_stage(args: RunArgs, callbacks: list[Any] | None = None) -> Any:
    """Run the workflow of `args.finetuning.stage` and return its result (an `SftResult`).

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.
    """
    module, function = STAGES[args.finetuning.stage]
    return getattr(importlib.import_module(module), function)(args, callbacks=callbacks)
