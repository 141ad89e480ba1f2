"""`sftflow train CONFIG [key=value ...]`."""

from __future__ import annotations

from sftflow.cli import command_parser, parse, setup_logging
from sftflow.config.parser import help_text, load_args
from sftflow.stages import registry


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: sftflow train CONFIG.yaml [key=value ...]\n")
        print(help_text())
        return 0
    parser = command_parser(
        "train",
        "Train the configured stage and write the run to output_dir.",
        "CONFIG",
        "a YAML or JSON config (or give every key as key=value)",
    )
    ns = parse(parser, argv)
    args = load_args(ns.target, ns.overrides)  # refuses bad keys before anything heavy loads
    setup_logging()

    registry.run_stage(args)
    return 0
