"""`sftflow <command>`: parse the command line, dispatch, print user errors without a traceback.

Heavy libraries (torch, transformers) are imported inside commands, so `sftflow --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sftflow.errors import SftflowError

USAGE = """sftflow: supervised fine-tuning of LLMs in one command.

commands:
  sftflow train CONFIG.yaml [key=value ...]   fine-tune (sft): data -> model -> train/eval/predict -> report
  sftflow train --help                        every config key, with its default and doc
  sftflow version                             print the version
"""


def _setup_logging() -> None:
    logging.basicConfig(format="[%(levelname)s|%(name)s] %(message)s", level=logging.INFO, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from sftflow.config import help_text

        print("usage: sftflow train CONFIG.yaml [key=value ...]\n")
        print(help_text())
        return 0
    config, overrides = (argv[0], argv[1:]) if "=" not in argv[0] else (None, argv)
    _setup_logging()
    from sftflow.config import load_args

    args = load_args(config, overrides)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    from sftflow.train.sft import run_sft

    run_sft(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sftflow", usage=USAGE, add_help=False)
    parser.add_argument("command", nargs="?")
    known, rest = parser.parse_known_args(argv[:1])
    command, rest = known.command, argv[1:]
    try:
        if command == "train":
            return cmd_train(rest)
        if command == "version":
            from sftflow import __version__

            print(__version__)
            return 0
        if command in (None, "-h", "--help", "help"):
            print(USAGE)
            return 0
        print(f"sftflow: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    except SftflowError as exc:
        print(f"sftflow error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
