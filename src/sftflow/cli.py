"""`sftflow <command>`: parse the command line, dispatch, print user errors without a traceback.

Each command is a function `main(argv) -> int` in the module that owns it, listed in COMMANDS and
imported only when run, so `sftflow --help` stays instant (no torch/transformers import).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from sftflow.errors import SftflowError

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "sftflow.cli",
        "cmd_train",
        "CONFIG [key=value ...]  train (stage: pt|sft|rm|dpo): data -> model -> train/eval/predict -> report",
    ),
    "chat": ("sftflow.infer.chat", "main", "RUN_DIR|CONFIG  chat with the tuned model in the terminal"),
    "api": ("sftflow.infer.api", "main", "RUN_DIR|CONFIG  serve it over an OpenAI-compatible HTTP API"),
    "predict": (
        "sftflow.infer.predict",
        "main",
        "CONFIG|RUN_DIR  answer a dataset into generated_predictions.jsonl",
    ),
    "export": (
        "sftflow.model.export",
        "main",
        "CONFIG [key=value ...]  merge LoRA adapter(s) into the base, write a standard HF model dir",
    ),
    "plan": (
        "sftflow.train.plan",
        "main",
        "CONFIG [--measure] [key=value ...]  predict memory and time, audit the data, advise",
    ),
    "report": ("sftflow.train.report", "main", "OUTPUT_DIR  write report.html for a finished run"),
    "preview": (
        "sftflow.train.preview",
        "preview_main",
        "CONFIG [--n 3]  show the first examples with trained spans marked, counts and lengths",
    ),
    "preprocess": (
        "sftflow.train.preview",
        "preprocess_main",
        "CONFIG --output FILE.jsonl  write the tokenized examples (input_ids, labels) as JSON lines",
    ),
    "version": ("sftflow.cli", "cmd_version", "print the version"),
}


def usage() -> str:
    lines = ["usage: sftflow <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_line}" for name, (_, _, help_line) in COMMANDS.items()]
    lines += ["", "`sftflow <command> --help` for a command's options (train --help lists every config key)."]
    return "\n".join(lines)


def setup_logging() -> None:
    """INFO logs from sftflow, warnings only from transformers; quiet tokenizers fork warnings."""
    logging.basicConfig(format="[%(levelname)s|%(name)s] %(message)s", level=logging.INFO, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def split_config_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """`CONFIG.yaml k=v ...` or just `k=v ...`."""
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def cmd_train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from sftflow.config import help_text

        print("usage: sftflow train CONFIG.yaml [key=value ...]\n")
        print(help_text())
        return 0
    config, overrides = split_config_and_overrides(argv)
    from sftflow.config import load_args

    args = load_args(config, overrides)  # refuses bad keys before anything heavy loads
    setup_logging()
    from sftflow.train.run import run_stage

    run_stage(args)
    return 0


def cmd_version(argv: list[str]) -> int:
    from sftflow import __version__

    print(__version__)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sftflow: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    try:
        return getattr(importlib.import_module(module), function)(rest)
    except SftflowError as exc:
        print(f"sftflow error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
