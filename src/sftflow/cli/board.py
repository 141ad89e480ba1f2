"""`sftflow board [--host 127.0.0.1] [--port 7860] [--saves DIR] [--config FILE]`."""

from __future__ import annotations

import argparse

from sftflow.board.app import serve
from sftflow.errors import SftflowError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sftflow board",
        description="A web workbench: plan, start, watch, compare, chat with and export runs. Runs are "
        "`sftflow train` processes of their own: closing the page or the board never stops them.",
        epilog="A host other than 127.0.0.1/localhost needs SFTFLOW_BOARD_TOKEN set (the page asks for the token before it shows anything).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--saves", default="saves", help="the dir holding the runs (default: saves)")
    parser.add_argument(
        "--config", help="a YAML/JSON config to fill the form with (default: examples/demo_sft.yaml)"
    )
    ns = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SftflowError("sftflow board needs gradio: pip install 'sftflow[board]'.") from None

    serve(ns.host, ns.port, ns.saves, ns.config)
    return 0
