"""Preprocessing throughput: examples/s for load + convert + tokenize (sft) of the 999-row alpaca demo.

Run by hand (needs ../shared/reference-data and the bundled SmolLM2 tokenizer):

    .venv/bin/python benchmarks/preprocess_throughput.py [--workers 2] [--repeat 3]

The tokenized cache is bypassed, so every repeat does the full work.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1, help="preprocessing_num_workers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    cli = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from datasets import disable_caching

    from sftflow.config import load_args
    from sftflow.data.prepare import prepare
    from sftflow.data.template import apply_template
    from sftflow.model.loader import load_tokenizer

    disable_caching()  # no reuse of datasets' own map cache between repeats
    with tempfile.TemporaryDirectory() as out:
        args = load_args(
            None,
            [
                "model_name_or_path=smollm2-135m-instruct",
                f"dataset_dir={REFERENCE}",
                "dataset=alpaca_en_demo",
                f"cutoff_len={cli.cutoff_len}",
                f"preprocessing_num_workers={cli.workers}",
                f"output_dir={out}",
                "do_train=true",
            ],
        )
        tokenizer = load_tokenizer(args.model)
        apply_template(tokenizer, args.data.template)
        times, n = [], 0
        for _ in range(cli.repeat):
            start = time.perf_counter()
            prepared = prepare("sft", args.data, tokenizer, args.training.seed, use_cache=False)
            times.append(time.perf_counter() - start)
            n = len(prepared.train)
    best, median = min(times), statistics.median(times)
    print(
        f"sftflow preprocess (alpaca_en_demo, SmolLM2 tokenizer, cutoff_len={cli.cutoff_len}, workers={cli.workers})"
    )
    print(
        f"  examples: {n}; best {best:.2f} s = {n / best:.0f} examples/s; median {median:.2f} s = {n / median:.0f} examples/s"
    )


if __name__ == "__main__":
    main()
