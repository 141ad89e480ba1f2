"""`sftflow plan CONFIG [--measure [STEPS]] [key=value ...]`."""

from __future__ import annotations

from sftflow.cli import command_parser, parse, setup_logging
from sftflow.config.parser import load_args


def main(argv: list[str]) -> int:
    parser = command_parser(
        "plan",
        "Predict peak memory and run time, audit the data, and suggest config changes, without training. "
        "Formulas: docs/plan.md.",
        "CONFIG",
        "a training config (any stage)",
    )
    parser.add_argument(
        "--measure",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="STEPS",
        help="also time a few real steps (default 3) on the longest examples (sft and pt)",
    )
    ns = parse(parser, argv)
    if ns.measure < 0:
        parser.error("--measure takes a number of steps >= 0")
    from sftflow.tools.plan import build_plan
    from sftflow.tools.plan.format import format_plan

    args = load_args(ns.target, ns.overrides, require_output_dir=False)
    setup_logging()
    print(format_plan(build_plan(args, ns.measure)), flush=True)
    return 0
