"""`sftflow predict RUN_DIR|CONFIG [key=value ...] [--model M] [--adapter A]`."""

from __future__ import annotations

from pathlib import Path

from sftflow.cli import setup_logging
from sftflow.cli.infer_args import infer_parser, load_infer_args, parse_infer
from sftflow.errors import SftflowError
from sftflow.infer.predict import run_predict


def main(argv: list[str]) -> int:
    parser = infer_parser(
        "predict",
        "Generate answers for a dataset (eval_dataset, else the val_size split, else dataset) into "
        "output_dir/generated_predictions.jsonl, with ROUGE/BLEU against the reference answers.",
        "a config file, or a run's output_dir (predictions then go to RUN_DIR/predict)",
    )
    ns = parse_infer(parser, argv)
    run_dir = ns.target is not None and Path(ns.target).is_dir()
    args = load_infer_args(ns, output_dir=str(Path(ns.target) / "predict") if run_dir else None)
    if "predict_with_generate" in args.user_keys and not args.training.predict_with_generate:
        raise SftflowError("sftflow predict always generates; drop predict_with_generate=false.")
    if not args.user_keys.get("output_dir"):
        raise SftflowError(
            "sftflow predict writes to output_dir: set output_dir (e.g. output_dir: saves/predict)."
        )
    setup_logging()
    run_predict(args)
    return 0
