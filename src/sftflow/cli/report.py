"""`sftflow report OUTPUT_DIR`."""

from __future__ import annotations

import argparse

from sftflow.cli import setup_logging
from sftflow.tools.report import write_report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sftflow report",
        description="Write OUTPUT_DIR/report.html (self-contained, offline) from a finished run: the outcome, "
        "curves, sample answers, metrics, data statistics and the config.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir")
    ns = parser.parse_args(argv)

    setup_logging()
    print(f"report: {write_report(ns.output_dir).resolve()}")
    return 0
