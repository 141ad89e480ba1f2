"""`sftflow <command>`: argv only. Each command module turns its arguments into typed values and makes one
library call; user errors are printed without a traceback.

Commands are listed in COMMANDS and imported only when run, so `sftflow --help` stays instant (no
torch/transformers import). Nothing in sftflow imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sftflow.errors import SftflowError

# name -> (module, one-line help); each module has `main(argv) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "sftflow.cli.train",
        "CONFIG [key=value ...]  train (stage: pt|sft|rm|dpo|kto|grpo): "
        "data -> model -> train/eval/predict -> report",
    ),
    "chat": ("sftflow.cli.chat", "RUN_DIR|CONFIG  chat with the tuned model in the terminal"),
    "api": ("sftflow.cli.api", "RUN_DIR|CONFIG  serve it over an OpenAI-compatible HTTP API"),
    "predict": ("sftflow.cli.predict", "CONFIG|RUN_DIR  answer a dataset into generated_predictions.jsonl"),
    "eval": ("sftflow.cli.eval", "RUN_DIR|CONFIG --tasks T[,T]  lm-evaluation-harness, tuned vs base"),
    "export": (
        "sftflow.cli.export",
        "CONFIG [key=value ...]  merge LoRA adapter(s) into the base, write a standard HF model dir",
    ),
    "expand": (
        "sftflow.cli.expand",
        "MODEL OUTPUT_DIR --num-expand N  LLaMA Pro: add identity decoder blocks to train with use_llama_pro",
    ),
    "plan": (
        "sftflow.cli.plan",
        "CONFIG [--measure] [key=value ...]  predict memory and time, audit the data, advise",
    ),
    "report": ("sftflow.cli.report", "OUTPUT_DIR  write report.html for a finished run"),
    "preview": (
        "sftflow.cli.preview",
        "CONFIG [--n 3]  show the first examples with trained spans marked, counts and lengths",
    ),
    "preprocess": (
        "sftflow.cli.preprocess",
        "CONFIG --output FILE.jsonl  write the tokenized examples (input_ids, labels) as JSON lines",
    ),
    "board": ("sftflow.cli.board", "[--host H] [--port P] [--saves DIR]  the web workbench"),
    "version": ("sftflow.cli.version", "print the version"),
}


def usage() -> str:
    lines = ["usage: sftflow <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_line}" for name, (_, help_line) in COMMANDS.items()]
    lines += ["", "`sftflow <command> --help` for a command's options (train --help lists every config key)."]
    return "\n".join(lines)


def setup_logging() -> None:
    """INFO logs from sftflow, warnings only from transformers; quiet tokenizers fork warnings and the
    import-time noise of libraries a command may not use (bitsandbytes' CPU backend)."""
    from sftflow.config.parser import quiet_import_noise

    quiet_import_noise()
    logging.basicConfig(format="[%(levelname)s|%(name)s] %(message)s", level=logging.INFO, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def command_parser(
    name: str, description: str, target: str, target_help: str, required: bool = True
) -> argparse.ArgumentParser:
    """The one argv shape of every command: TARGET [key=value ...] [--options]. `required=False` makes
    TARGET optional (chat/api/predict also take --model)."""
    parser = argparse.ArgumentParser(
        prog=f"sftflow {name}",
        description=description,
        epilog="key=value overrides win over the config file; `sftflow train --help` lists every key.",
    )
    parser.add_argument("target", metavar=target, nargs="?", help=target_help)
    parser.add_argument("overrides", metavar="key=value", nargs="*", help="config keys (e.g. cutoff_len=512)")
    parser.set_defaults(target_required=required, target_name=target)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse options and positionals in any order. A first positional holding `=` is an override, not a
    target (`sftflow chat max_new_tokens=64 --model M`). With `required`, a command given neither TARGET
    nor any key=value exits 2 with its usage."""
    ns = parser.parse_intermixed_args(argv)
    if ns.target is not None and "=" in ns.target and not os.path.exists(ns.target):
        ns.overrides, ns.target = [ns.target, *ns.overrides], None
    if ns.target_required and ns.target is None and not ns.overrides:
        parser.error(f"the following arguments are required: {ns.target_name} (or its keys as key=value)")
    return ns


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sftflow: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(COMMANDS[command][0]).main(rest)
    except SftflowError as exc:
        print(f"sftflow error: {exc}", file=sys.stderr)
        return 2
