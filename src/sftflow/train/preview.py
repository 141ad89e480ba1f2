"""`sftflow preview` and `sftflow preprocess`: run the data step of a training config and show or write
its result, without loading a model. They read the same config (and key=value overrides) as `train`
and use the same tokenized cache, so what they show is what training gets.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError


def _pop_option(argv: list[str], name: str, default: str | None) -> tuple[str | None, list[str]]:
    """Take `--name VALUE` or `--name=VALUE` out of argv."""
    rest, value, i = [], default, 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                raise SftflowError(f"--{name} needs a value.")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _prepare(argv: list[str]) -> tuple[Any, Any]:
    from sftflow.cli import setup_logging, split_config_and_overrides
    from sftflow.config import load_args
    from sftflow.data.processor import stop_token_ids
    from sftflow.train.sft import load_chat_tokenizer, prepare_datasets

    config, overrides = split_config_and_overrides(argv)
    args = load_args(config, overrides)
    setup_logging()
    tokenizer = load_chat_tokenizer(args)
    return prepare_datasets(args, tokenizer, stop_token_ids(tokenizer)), tokenizer


def _streamed(dataset: Any) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def preview_main(argv: list[str]) -> int:
    """`sftflow preview CONFIG [key=value ...] [--n 3]`: the first examples decoded with trained spans
    marked, then per-dataset counts, length percentiles, the trained-token share, truncated and dropped."""
    from sftflow.data.inspect import format_report, length_stats, render_marked

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: sftflow preview CONFIG.yaml [key=value ...] [--n 3]\n\nPrints the first n training "
            "examples as the model sees them (trained tokens in green, or [[between brackets]] when not a "
            "terminal), then counts and length statistics."
        )
        return 0
    n_text, argv = _pop_option(argv, "n", "3")
    if not (n_text or "").isdigit():
        raise SftflowError(f"--n must be a whole number, got {n_text!r}.")
    prepared, tokenizer = _prepare(argv)
    color = sys.stdout.isatty()
    splits = {"train": prepared.train, "eval": prepared.eval}
    shown = next((d for d in splits.values() if d is not None), None)
    for i, row in enumerate(shown.take(int(n_text)) if shown is not None else []):
        trained = sum(1 for t in row["labels"] if t != -100) if "labels" in row else 0
        print(f"--- example {i}: {len(row['input_ids'])} tokens, {trained} trained ---")
        print(render_marked(tokenizer, row["input_ids"], row.get("labels", row["input_ids"]), color))
    stats = {
        name: length_stats(dataset)
        for name, dataset in splits.items()
        if dataset is not None and not _streamed(dataset)
    }
    print("--- summary ---")
    print(format_report(prepared.meta, stats))
    return 0


def preprocess_main(argv: list[str]) -> int:
    """`sftflow preprocess CONFIG [key=value ...] --output FILE.jsonl [--split train|eval]`: write one
    JSON object per tokenized example (input_ids, labels, and chosen_*/rejected_* for rm)."""
    from sftflow.data.inspect import write_jsonl

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: sftflow preprocess CONFIG.yaml [key=value ...] --output FILE.jsonl [--split train|eval]"
        )
        return 0
    output, argv = _pop_option(argv, "output", None)
    split, argv = _pop_option(argv, "split", "train")
    if not output:
        raise SftflowError("preprocess needs --output FILE.jsonl.")
    if split not in ("train", "eval"):
        raise SftflowError(f"--split must be train or eval, got {split!r}.")
    prepared, _ = _prepare(argv)
    dataset = prepared.train if split == "train" else prepared.eval
    if dataset is None:
        raise SftflowError(
            f"no {split} data in this config (train needs do_train and dataset; eval needs eval_dataset or val_size)."
        )
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        written = write_jsonl(dataset, out)
    print(f"wrote {written} {split} examples to {path}")
    return 0
