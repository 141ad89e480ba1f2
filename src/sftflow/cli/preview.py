"""`sftflow preview CONFIG [key=value ...] [--n 3]`: the data step of a config, shown without a model.

It runs the same data step (and tokenized cache) as `train` for the config's stage, so what it shows is
what training gets: the first examples decoded with trained tokens marked (pairs: the prompt and both
answers), then per-dataset counts, length percentiles, the trained-token share, truncated and dropped.
"""

from __future__ import annotations

import sys

from sftflow.cli import command_parser, parse, setup_logging
from sftflow.config.parser import load_args
from sftflow.data.inspect import format_report, render_example
from sftflow.data.prepare import prepare
from sftflow.model.loader import load_chat_tokenizer
from sftflow.model.vision import load_run_vision


def main(argv: list[str]) -> int:
    parser = command_parser(
        "preview",
        "Print the first n examples as the model sees them (trained tokens in green, or [[between brackets]] "
        "when not a terminal), then counts and length statistics.",
        "CONFIG",
        "a training config (any stage)",
    )
    parser.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    ns = parse(parser, argv)
    if ns.n < 0:
        parser.error("--n must be >= 0")

    args = load_args(ns.target, ns.overrides, require_output_dir=False)
    setup_logging()
    tokenizer = load_chat_tokenizer(args.model, args.data)
    prepared = prepare(
        args.finetuning.stage,
        args.data,
        tokenizer,
        args.training.seed,
        args.training.do_train,
        vision=load_run_vision(args, tokenizer),  # a model that sees: images become its image runs
    )
    shown = prepared.train if prepared.train is not None else prepared.eval
    color = sys.stdout.isatty()
    for i, row in enumerate(shown.take(ns.n) if shown is not None else []):
        print(render_example(tokenizer, row, i, color))
    print("--- summary ---")
    print(format_report(prepared.meta))
    return 0
