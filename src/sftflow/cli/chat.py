"""`sftflow chat RUN_DIR|CONFIG [key=value ...] [--model M] [--adapter A] [--system TEXT]`."""

from __future__ import annotations

from sftflow.cli import setup_logging
from sftflow.cli.infer_args import infer_parser, load_infer_args, parse_infer
from sftflow.infer.chat import HELP, run_chat
from sftflow.infer.engine import load_engine


def main(argv: list[str]) -> int:
    parser = infer_parser(
        "chat",
        "Chat with a tuned model in the terminal. " + HELP,
        "a run's output_dir (e.g. saves/smollm2-135m-instruct/lora/demo) or a config file",
    )
    parser.add_argument("--system", help="system message put before every conversation")
    ns = parse_infer(parser, argv)
    args = load_infer_args(ns)
    setup_logging()
    engine = load_engine(args)
    try:
        run_chat(engine, system=ns.system)
    finally:
        engine.close()
    return 0
