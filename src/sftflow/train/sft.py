"""The supervised fine-tuning workflow, top to bottom:
args -> tokenizer/template -> datasets -> model (+LoRA) -> collator -> trainer -> train/eval/predict -> report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftflow.config import RunArgs
from sftflow.data.collator import SftCollator
from sftflow.data.loader import load_conversations, split_train_eval
from sftflow.data.processor import IGNORE_INDEX, encode_prompt, encode_sft, stop_token_ids
from sftflow.data.template import apply_template, render
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import load_model, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class SftResult:
    """What a run produced, for the summary and for callers (tests, later stages)."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    sample: dict[str, str] | None = None  # one held-out question with tuned and base answers


def run_sft(args: RunArgs) -> SftResult:
    """Run the sft workflow described by `args` and write everything under `output_dir`."""
    from transformers import GenerationConfig, set_seed

    from sftflow.train.plotting import plot_losses
    from sftflow.train.trainer import JsonlLogCallback, SftTrainer

    training = args.training
    output_dir = Path(training.output_dir)
    prepare_output_dir(output_dir, args)
    set_seed(training.seed)  # before the model is built: the LoRA init draws from this seed

    # 1. Tokenizer and chat template (the tokenizer's own unless `template` names a built-in).
    tokenizer = load_tokenizer(args.model)
    apply_template(tokenizer, args.data.template)
    stop_ids = stop_token_ids(tokenizer)

    # 2. Datasets: load, convert to messages, hold out eval data, tokenize (main process first).
    with training.main_process_first(desc="dataset preprocessing"):
        train_convs, eval_convs = load_datasets(args)
        train_set = tokenize_sft(train_convs, tokenizer, args, stop_ids, "train") if train_convs else None
        eval_set = tokenize_sft(eval_convs, tokenizer, args, stop_ids, "eval") if eval_convs else None
        predict_set, predict_rows = (
            tokenize_prompts(eval_convs, tokenizer, args) if training.do_predict else (None, [])
        )
    if training.process_index == 0:
        preview(train_set if train_set is not None else eval_set, tokenizer, args.data.preview_rows)

    # 3. Model, with LoRA / freeze / full tuning applied.
    model = apply_finetuning(load_model(args.model), args.model, args.finetuning)

    # 4. Trainer: right-padded batches for training and eval loss.
    generation_config = GenerationConfig(
        **args.generating.to_generation_kwargs(),
        eos_token_id=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    trainer = SftTrainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=SftCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(output_dir)],
        generation_config=generation_config,
    )
    result = SftResult(output_dir)

    # 5. Train, then save the adapter/model, the tokenizer (with the template used) and the arguments.
    if training.do_train:
        train_output = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_state()
        metrics = dict(train_output.metrics)
        if trainer.state.num_input_tokens_seen and metrics.get("train_runtime"):
            # non-pad tokens per second of the whole train() call (what a user waits for)
            metrics["train_tokens_per_second"] = round(
                trainer.state.num_input_tokens_seen / metrics["train_runtime"], 2
            )
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        result.metrics.update(metrics)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(output_dir)
            (output_dir / "sftflow_args.yaml").write_text(
                yaml.safe_dump(args.to_yaml_dict(), sort_keys=False)
            )
            if args.finetuning.plot_loss:
                result.plots = plot_losses(trainer.state.log_history, output_dir)

    # 6. Eval: loss and perplexity on the held-out set.
    if training.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result.metrics.update(metrics)
        if trainer.is_world_process_zero() and args.finetuning.plot_loss:
            result.plots = plot_losses(trainer.state.log_history, output_dir)

    # 7. Predict: generate answers from prompts only (left-padded), tuned and, with LoRA, base model.
    if training.do_predict:
        trainer.data_collator = SftCollator(tokenizer.pad_token_id, padding_side="left")
        metrics = predict(trainer, predict_set, predict_rows, tokenizer, output_dir, "predict")
        if args.finetuning.compare_base and args.finetuning.finetuning_type == "lora":
            with trainer.accelerator.unwrap_model(model).disable_adapter():
                base = predict(trainer, predict_set, predict_rows, tokenizer, output_dir, "predict_base")
            metrics.update(base)
            result.sample = sample_answers(output_dir)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        result.metrics.update(metrics)

    if trainer.is_world_process_zero():
        print(format_summary(result), flush=True)
    return result


def prepare_output_dir(output_dir: Path, args: RunArgs) -> None:
    """Refuse to write over an earlier run unless asked; start a fresh trainer_log.jsonl."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        resuming = args.training.resume_from_checkpoint
        if not (args.finetuning.overwrite_output_dir or resuming):
            raise SftflowError(
                f"output_dir {output_dir} already holds files. Set overwrite_output_dir: true to write over "
                "them, resume_from_checkpoint to continue a run, or choose another output_dir."
            )
        if not resuming:
            (output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def load_datasets(args: RunArgs) -> tuple[Any, Any]:
    """Training conversations and held-out conversations (eval_dataset, or a val_size split)."""
    data, seed = args.data, args.training.seed
    train = load_conversations(data.dataset, data, seed) if data.dataset else None
    held_out = None
    if data.eval_dataset:
        held_out = load_conversations(data.eval_dataset, data, seed)
    elif data.val_size and train is not None:
        train, held_out = split_train_eval(train, data.val_size, seed)
    if train is not None:
        train = train.shuffle(seed=seed) if args.training.do_train else train
    return (train if args.training.do_train else None), held_out


def tokenize_sft(conversations: Any, tokenizer: Any, args: RunArgs, stop_ids: set[int], split: str) -> Any:
    """Tokenize conversations into input_ids/labels; report truncated and dropped examples."""
    data = args.data

    def encode(row: dict) -> dict:
        encoded = encode_sft(tokenizer, row["messages"], data.cutoff_len, data.train_on_prompt, stop_ids)
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "truncated": encoded.truncated,
            "dropped": encoded.dropped,
        }

    encoded = conversations.map(
        encode,
        remove_columns=conversations.column_names,
        num_proc=data.preprocessing_num_workers,
        desc=f"Tokenizing {split}",
    )
    dropped = [i for i, reason in enumerate(encoded["dropped"]) if reason]
    truncated = sum(encoded["truncated"])
    if truncated:
        logger.warning(
            "%s: %d of %d examples exceed cutoff_len=%d and were truncated.",
            split,
            truncated,
            len(encoded),
            data.cutoff_len,
        )
    if dropped:
        logger.warning(
            "%s: dropped %d examples whose prompt alone exceeds cutoff_len=%d (e.g. example %d: %s). Raise cutoff_len to keep them.",
            split,
            len(dropped),
            data.cutoff_len,
            dropped[0],
            encoded[dropped[0]]["dropped"],
        )
        encoded = encoded.select([i for i in range(len(encoded)) if i not in set(dropped)])
    if len(encoded) == 0:
        raise SftflowError(f"{split}: no example fits cutoff_len={data.cutoff_len}; raise cutoff_len.")
    no_labels = sum(1 for labels in encoded["labels"] if all(t == IGNORE_INDEX for t in labels))
    if no_labels:
        raise SftflowError(
            f"{split}: {no_labels} examples have no trained token after truncation; raise cutoff_len."
        )
    return encoded.remove_columns(["truncated", "dropped"])


def tokenize_prompts(conversations: Any, tokenizer: Any, args: RunArgs) -> tuple[Any, list[dict[str, str]]]:
    """Prompt-only inputs for generation, sorted longest first (less padding, early OOM), and the
    matching rows (prompt text and reference answer) in the same order."""
    from datasets import Dataset

    rows, ids = [], []
    for messages in conversations["messages"]:
        prompt_ids = encode_prompt(tokenizer, messages, args.data.cutoff_len)
        if prompt_ids is None:
            continue
        ids.append(prompt_ids)
        rows.append(
            {
                "prompt": render(tokenizer, messages[:-1], add_generation_prompt=True),
                "label": messages[-1]["content"],
                "index": len(rows),
            }
        )
    if not ids:
        raise SftflowError(
            f"predict: every prompt exceeds cutoff_len={args.data.cutoff_len}; raise cutoff_len."
        )
    if len(ids) < len(conversations):
        logger.warning("predict: skipped %d prompts longer than cutoff_len.", len(conversations) - len(ids))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return Dataset.from_dict({"input_ids": [ids[i] for i in order]}), [rows[i] for i in order]


def predict(
    trainer: Any, dataset: Any, rows: list[dict[str, str]], tokenizer: Any, output_dir: Path, prefix: str
) -> dict[str, float]:
    """Generate for every prompt, write generated_predictions[_base].jsonl (in dataset order), return text metrics."""
    from sftflow.train.metrics import text_metrics

    output = trainer.predict(dataset, metric_key_prefix=prefix)
    tokens = output.predictions
    tokens[tokens == IGNORE_INDEX] = tokenizer.pad_token_id
    answers = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    metrics = {f"{prefix}_{k}": v for k, v in text_metrics(answers, [r["label"] for r in rows]).items()}
    metrics.update({k: v for k, v in output.metrics.items() if k.endswith(("runtime", "samples_per_second"))})
    rows, answers = zip(
        *sorted(zip(rows, answers, strict=True), key=lambda pair: pair[0]["index"]), strict=True
    )
    if trainer.is_world_process_zero():
        name = "generated_predictions.jsonl" if prefix == "predict" else "generated_predictions_base.jsonl"
        with (output_dir / name).open("w", encoding="utf-8") as f:
            for row, answer in zip(rows, answers, strict=True):
                f.write(
                    json.dumps(
                        {"prompt": row["prompt"], "predict": answer, "label": row["label"]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    return metrics


def sample_answers(output_dir: Path) -> dict[str, str] | None:
    """The first held-out question with its reference, tuned and base answers."""

    def read(name: str) -> list[dict]:
        path = output_dir / name
        return (
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if path.is_file()
            else []
        )

    tuned, base = read("generated_predictions.jsonl"), read("generated_predictions_base.jsonl")
    if not tuned or len(base) != len(tuned):
        return None
    return {
        "prompt": tuned[0]["prompt"],
        "label": tuned[0]["label"],
        "tuned": tuned[0]["predict"],
        "base": base[0]["predict"],
    }


def preview(dataset: Any, tokenizer: Any, rows: int) -> None:
    """Log the first examples as the model will see them, with the trained part shown separately."""
    if dataset is None:
        return
    for i in range(min(rows, len(dataset))):
        example = dataset[i]
        trained = [t for t in example["labels"] if t != IGNORE_INDEX]
        logger.info(
            "example %d (%d tokens, %d trained)\n--- input ---\n%s\n--- trained on ---\n%s",
            i,
            len(example["input_ids"]),
            len(trained),
            tokenizer.decode(example["input_ids"]),
            tokenizer.decode(trained),
        )


def format_summary(result: SftResult) -> str:
    """The closing report: where things are, the metrics, the plots, one question answered base vs tuned."""
    lines = ["", "=" * 72, f"sftflow: run finished. Outputs in {result.output_dir.resolve()}"]
    groups = {"train": {}, "eval": {}, "predict": {}}
    for key, value in result.metrics.items():
        group = next((g for g in groups if key.startswith(g)), None)
        if group:
            groups[group][key] = value
    for group, metrics in groups.items():
        if metrics:
            lines.append(f"  {group}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    for plot in result.plots:
        lines.append(f"  loss plot: {plot.resolve()}")
    if result.sample:
        prompt = result.sample["prompt"]
        lines += [
            "  held-out question (as the model saw it):",
            *("    | " + line for line in prompt.strip().splitlines()[-6:]),
            f"  reference : {result.sample['label']}",
            f"  base model: {result.sample['base']}",
            f"  tuned     : {result.sample['tuned']}",
        ]
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
