"""The arguments chat, api and predict share: TARGET (a run dir or a config) [key=value ...] plus
--model / --adapter, turned into typed RunArgs by `sftflow.config.run_dir.infer_args`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sftflow.cli import command_parser, parse
from sftflow.config.run_dir import infer_args

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs


def infer_parser(name: str, description: str, target_help: str) -> argparse.ArgumentParser:
    parser = command_parser(name, description, "RUN_DIR|CONFIG", target_help, required=False)
    parser.add_argument("--model", help="base model (sets model_name_or_path)")
    parser.add_argument("--adapter", help="PEFT adapter dir (sets adapter_name_or_path)")
    return parser


def parse_infer(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; a TARGET or --model is required (exit 2 with the usage otherwise)."""
    ns = parse(parser, argv)
    if ns.target is None and ns.model is None:
        parser.error("give a run dir, a config file or --model")
    return ns


def load_infer_args(ns: argparse.Namespace, output_dir: str | None = None) -> RunArgs:
    """The typed arguments of a parsed chat/api/predict command line."""

    return infer_args(ns.target, ns.overrides, ns.model, ns.adapter, output_dir)
