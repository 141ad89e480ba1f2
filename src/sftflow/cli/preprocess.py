"""`sftflow preprocess CONFIG [key=value ...] --output FILE.jsonl [--split train|eval]`: the tokenized
examples of a config's data step as JSON lines, in dataset order (input_ids and labels; for pairs
chosen_ids, rejected_ids, prompt_len, chosen_end, rejected_end)."""

from __future__ import annotations

from pathlib import Path

from sftflow.cli import command_parser, parse, setup_logging
from sftflow.config.parser import load_args
from sftflow.data.inspect import write_jsonl
from sftflow.data.prepare import prepare
from sftflow.errors import SftflowError
from sftflow.model.loader import load_chat_tokenizer
from sftflow.model.vision import load_run_vision


def main(argv: list[str]) -> int:
    parser = command_parser(
        "preprocess",
        "Write the tokenized examples of a config's data step as JSON lines, in dataset order.",
        "CONFIG",
        "a training config (any stage)",
    )
    parser.add_argument("--output", required=True, metavar="FILE.jsonl", help="where to write")
    parser.add_argument("--split", choices=["train", "eval"], default="train", help="default train")
    ns = parse(parser, argv)

    args = load_args(ns.target, ns.overrides, require_output_dir=False)
    setup_logging()
    tokenizer = load_chat_tokenizer(args.model, args.data)
    # the training split is built whether or not the config trains: preprocess is for reading it
    vision = load_run_vision(args, tokenizer)  # a model that sees: images become its image runs
    prepared = prepare(
        args.finetuning.stage, args.data, tokenizer, args.training.seed, do_train=True, vision=vision
    )
    dataset = prepared.train if ns.split == "train" else prepared.eval
    if dataset is None:
        raise SftflowError(
            f"no {ns.split} data in this config (train needs dataset; eval needs eval_dataset or val_size)."
        )
    path = Path(ns.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        written = write_jsonl(dataset, out)
    print(f"wrote {written} {ns.split} examples to {path}")
    return 0
