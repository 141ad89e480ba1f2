"""`sftflow predict`: batch generation over a dataset into generated_predictions.jsonl, with metrics.

It reuses the training workflow's predict path: prompts sorted longest first (`tokenize_prompts`),
left-padded batches of `per_device_eval_batch_size`, generation through the Trainer (progress bar,
devices) and the same ROUGE/BLEU metrics against each row's reference answer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import RunArgs

logger = logging.getLogger(__name__)


def predict_conversations(args: RunArgs) -> Any:
    """The conversations to answer: eval_dataset, else the held-out val_size split, else dataset.

    Raises:
        SftflowError: no dataset is named.
    """
    from sftflow.data.loader import load_conversations, split_train_eval

    data, seed = args.data, args.training.seed
    if data.eval_dataset:
        return load_conversations(data.eval_dataset, data, seed)
    if data.dataset and data.val_size:
        return split_train_eval(load_conversations(data.dataset, data, seed), data.val_size, seed)[1]
    if data.dataset:
        return load_conversations(data.dataset, data, seed)
    raise SftflowError(
        "sftflow predict needs data: set eval_dataset (or dataset) to a name in dataset_info.json."
    )


def run_predict(args: RunArgs) -> dict[str, float]:
    """Answer every prompt of the dataset with the model (+adapter) and write, under output_dir,
    generated_predictions.jsonl (prompt, predict, label per line, dataset order) and predict_results.json."""
    from transformers import GenerationConfig

    from sftflow.data.collator import SftCollator
    from sftflow.data.processor import stop_token_ids
    from sftflow.infer.engine import load_for_inference
    from sftflow.train.sft import predict, tokenize_prompts
    from sftflow.train.trainer import SftTrainer

    output_dir = Path(args.training.output_dir)
    args.training.predict_with_generate = True  # SftTrainer generates only with it (else: logits)
    model, tokenizer = load_for_inference(args)
    dataset, rows = tokenize_prompts(predict_conversations(args), tokenizer, args)
    output_dir.mkdir(parents=True, exist_ok=True)
    generation_config = GenerationConfig(
        **args.generating.to_generation_kwargs(),
        eos_token_id=sorted(stop_token_ids(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
    )
    trainer = SftTrainer(
        model=model,
        args=args.training,
        data_collator=SftCollator(tokenizer.pad_token_id, padding_side="left"),
        processing_class=tokenizer,
        generation_config=generation_config,
    )
    metrics = predict(trainer, dataset, rows, tokenizer, output_dir, "predict")
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    if trainer.is_world_process_zero():
        print(
            f"sftflow: {len(rows)} predictions written to {(output_dir / 'generated_predictions.jsonl').resolve()}",
            flush=True,
        )
    return metrics


def main(argv: list[str]) -> int:
    """`sftflow predict RUN_DIR|CONFIG [key=value ...] [--model M] [--adapter A]`."""
    from sftflow.cli import setup_logging, split_config_and_overrides
    from sftflow.infer.engine import argument_parser, load_infer_args

    parser = argument_parser(
        "sftflow predict",
        "Generate answers for a dataset (eval_dataset, else dataset) into output_dir/generated_predictions.jsonl, "
        "with ROUGE/BLEU against the reference answers.",
        "a config file, or a run's output_dir (predictions then go to RUN_DIR/predict)",
    )
    ns = parser.parse_args(argv)
    config, overrides = split_config_and_overrides(ns.target)
    if config is None and ns.model is None:
        raise SftflowError(
            "sftflow predict needs a config file, a run dir or --model (see sftflow predict --help)."
        )
    run_dir = config is not None and Path(config).is_dir()
    args = load_infer_args(
        config,
        ["predict_with_generate=true", *overrides],
        ns.model,
        ns.adapter,
        default_output_dir=str(Path(config) / "predict") if run_dir else None,
    )
    if not args.training.predict_with_generate:
        raise SftflowError("sftflow predict always generates; drop predict_with_generate=false.")
    setup_logging()
    run_predict(args)
    return 0
