"""`sftflow expand MODEL OUTPUT_DIR --num-expand N`: LLaMA Pro block expansion (LLaMA-Factory's
scripts/llama_pro.py)."""

from __future__ import annotations

import argparse

from sftflow.cli import setup_logging
from sftflow.model.expand import expand_blocks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sftflow expand",
        description="LLaMA Pro: insert N copies of decoder blocks, one after each of N equal groups, with zeroed "
        "o_proj/down_proj so the expanded model computes what the original does; then train only the copies.",
        epilog="then train with: finetuning_type: freeze, use_llama_pro: true, freeze_trainable_layers: N",
    )
    parser.add_argument("model", help="the model to expand (HF dir, hub id or bundled name)")
    parser.add_argument("output_dir", help="where to write the expanded model")
    parser.add_argument(
        "--num-expand", type=int, default=8, help="blocks to add; must divide the block count (default 8)"
    )
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty output_dir")
    ns = parser.parse_args(argv)
    setup_logging()
    out = expand_blocks(ns.model, ns.output_dir, ns.num_expand, overwrite=ns.overwrite)
    print(f"sftflow: wrote the expanded model to {out.resolve()}", flush=True)
    print(
        f"  train it with model_name_or_path: {out}, finetuning_type: freeze, use_llama_pro: true, "
        f"freeze_trainable_layers: {ns.num_expand}",
        flush=True,
    )
    return 0
