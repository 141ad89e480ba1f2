"""`sftflow eval RUN_DIR|CONFIG --tasks T[,T...] [--include DIR] [--limit N] [--batch-size B] [--no-base]`."""

from __future__ import annotations

from pathlib import Path

from sftflow.cli import setup_logging
from sftflow.cli.infer_args import infer_parser, load_infer_args, parse_infer
from sftflow.errors import SftflowError
from sftflow.tools.evaluate import RESULT_FILE, evaluate, format_table, local_tasks
from sftflow.tools.report import REPORT_NAME, write_report


def main(argv: list[str]) -> int:
    parser = infer_parser(
        "eval",
        "Evaluate the tuned model and its base (adapter left out) with lm-evaluation-harness, in process "
        f"and offline, on local task YAMLs (shipped: {', '.join(local_tasks())}); results go to "
        f"RUN_DIR/{RESULT_FILE} and report.html.",
        "a run's output_dir (e.g. saves/smollm2-135m-instruct/lora/demo) or a config file",
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include", action="append", default=[], help="a folder of extra task YAMLs")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    parser.add_argument("--no-base", action="store_true", help="skip the base model")
    ns = parse_infer(parser, argv)
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    args = load_infer_args(ns)
    out_dir = Path(ns.target) if ns.target and Path(ns.target).is_dir() else Path(args.training.output_dir)
    if ns.limit is not None and ns.limit < 1:
        raise SftflowError(f"--limit must be >= 1, got {ns.limit}.")
    setup_logging()
    result = evaluate(args, tasks, out_dir, ns.include, ns.limit, ns.batch_size, base=not ns.no_base)
    print(format_table(result))
    print(f"sftflow eval: wrote {out_dir / RESULT_FILE}")

    if (out_dir / REPORT_NAME).is_file():  # a trained run's report: show the results there too
        print(f"sftflow eval: updated {write_report(out_dir)}")
    return 0
