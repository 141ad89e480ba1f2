"""The supervised fine-tuning workflow, top to bottom:
args -> tokenizer/template -> datasets -> model (+LoRA) -> collator -> trainer -> train/eval/predict -> report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftflow.config import RunArgs
from sftflow.data.collator import PackedCollator, SftCollator
from sftflow.data.loader import load_conversations, split_train_eval
from sftflow.data.packing import pack_dataset
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
    report: Path | None = None  # report.html


def run_sft(args: RunArgs, callbacks: list[Any] | None = None) -> SftResult:
    """Run the sft workflow described by `args` and write everything under `output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.
    """
    from transformers import GenerationConfig

    from sftflow.train.callbacks import JsonlLogCallback
    from sftflow.train.trainer import SftTrainer

    training = args.training
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template (the tokenizer's own unless `template` names a built-in).
    tokenizer = load_chat_tokenizer(args)
    stop_ids = stop_token_ids(tokenizer)

    # 2. Datasets: load, convert to messages, hold out eval data, tokenize (main process first).
    with training.main_process_first(desc="dataset preprocessing"):
        prepared = prepare_datasets(args, tokenizer, stop_ids)
        train_set, eval_set, eval_convs = prepared.train, prepared.eval, prepared.eval_conversations
        predict_set, predict_rows = (
            tokenize_prompts(eval_convs, tokenizer, args) if training.do_predict else (None, [])
        )
    if training.process_index == 0:
        preview(train_set if train_set is not None else eval_set, tokenizer, args.data.preview_rows)
    if args.data.packing:  # after the preview, which shows the examples one by one
        train_set, eval_set = (
            pack_dataset(d, args.data.cutoff_len) if d is not None else None for d in (train_set, eval_set)
        )

    # 3. Model (embeddings resized for new_special_tokens), with LoRA / freeze / full tuning applied
    #    and, when asked, gradient checkpointing with the input-grad hook frozen embeddings need.
    model = build_model(args, tokenizer)
    if args.data.packing:  # with a KV cache transformers ignores position_ids when building the mask
        model.config.use_cache = False

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
        data_collator=(PackedCollator if args.data.packing else SftCollator)(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(output_dir), *(callbacks or [])],
        generation_config=generation_config,
        skip_nan=args.finetuning.skip_nan,
        fast_loss=args.finetuning.fast_loss,
    )
    result = SftResult(output_dir)

    # 5. Train, then save the adapter/model, the tokenizer (with the template used) and the arguments.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)

    # 6. Eval: loss and perplexity on the held-out set.
    if training.do_eval:
        evaluate_and_report(trainer, args, result, perplexity=True)

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
        from sftflow.train.report import write_report

        result.report = write_report(output_dir)  # 8. report.html: config, data, curves, metrics, answers
        print(format_summary(result), flush=True)
    return result


def start_run(args: RunArgs) -> tuple[Path, str | None]:
    """The first step of every stage: prepare output_dir, settle (or refuse) the checkpoint to resume from
    before anything heavy loads, warn about a single-process multi-GPU launch, and set the seed (before the
    model is built: LoRA and reward-head inits draw from it). Returns output_dir and the checkpoint."""
    import torch
    from transformers import set_seed

    from sftflow.train.trainer import check_launch, launch_advice, resolve_resume

    training = args.training
    output_dir = Path(training.output_dir)
    check_launch(os.environ, training.world_size)  # before any rank touches output_dir
    prepare_output_dir(output_dir, args)
    resume = resolve_resume(output_dir, training.resume_from_checkpoint) if training.do_train else None
    if advice := launch_advice(torch.cuda.device_count(), os.environ):
        logger.warning(advice)
    set_seed(training.seed)
    return output_dir, resume


def load_chat_tokenizer(args: RunArgs) -> Any:
    """The tokenizer with the chat template installed (its own unless `template` names another)."""
    tokenizer = load_tokenizer(args.model)
    apply_template(tokenizer, args.data.template, args.data.template_file)
    return tokenizer


def build_model(args: RunArgs, tokenizer: Any, base: Any = None) -> Any:
    """`base` (default: the causal LM of model_name_or_path, embeddings resized for new_special_tokens) with
    LoRA / freeze / full tuning applied and, when asked, gradient checkpointing with the input-grad hook
    that frozen embeddings need."""
    return apply_finetuning(
        base if base is not None else load_model(args.model, tokenizer),
        args.model,
        args.finetuning,
        tokenizer=tokenizer,
        gradient_checkpointing=bool(args.training.gradient_checkpointing),
        gradient_checkpointing_kwargs=args.training.gradient_checkpointing_kwargs,
    )


def train_and_save(
    trainer: Any, args: RunArgs, tokenizer: Any, resume: str | None, result: SftResult
) -> None:
    """Train, then save the adapter/model, the trainer state, the train metrics (with non-pad tokens/s), the
    tokenizer (with the template used), sftflow_args.yaml and the loss plot. Any stage's Trainer works."""
    from sftflow.train.plotting import plot_losses

    output_dir = Path(args.training.output_dir)
    train_output = trainer.train(resume_from_checkpoint=resume)
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
        (output_dir / "sftflow_args.yaml").write_text(yaml.safe_dump(args.to_yaml_dict(), sort_keys=False))
        if args.finetuning.plot_loss:
            result.plots = plot_losses(trainer.state.log_history, output_dir)


def evaluate_and_report(trainer: Any, args: RunArgs, result: SftResult, perplexity: bool) -> dict[str, float]:
    """Evaluate on the held-out set (with `perplexity`, exp(eval_loss) too), save eval_results.json and
    redraw the loss plots with the eval loss. Returns the eval metrics."""
    from sftflow.train.plotting import plot_losses

    metrics = trainer.evaluate(metric_key_prefix="eval")
    if perplexity and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    result.metrics.update(metrics)
    if trainer.is_world_process_zero() and args.finetuning.plot_loss:
        result.plots = plot_losses(trainer.state.log_history, args.training.output_dir)
    return metrics


def prepare_output_dir(output_dir: Path, args: RunArgs) -> None:
    """Refuse to write over an earlier run unless asked; start a fresh trainer_log.jsonl and drop the
    earlier run's checkpoints (so a later resume cannot pick one of them up)."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        resume = args.training.resume_from_checkpoint
        resuming = bool(resume) and str(resume).strip().lower() not in ("false", "none", "null")
        if not (args.finetuning.overwrite_output_dir or resuming):
            raise SftflowError(
                f"output_dir {output_dir} already holds files. Set overwrite_output_dir: true to write over "
                "them, resume_from_checkpoint to continue a run, or choose another output_dir."
            )
        if not resuming and args.training.process_index == 0:
            (output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
            for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".tmp-checkpoint-*")]:
                shutil.rmtree(old, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class PreparedData:
    """The data step's output: tokenized train/eval sets, the held-out conversations (for predict) and
    counts for the preview (per dataset: read/skipped/kept rows; per split: examples/truncated/dropped)."""

    train: Any = None
    eval: Any = None
    eval_conversations: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def prepare_datasets(
    args: RunArgs, tokenizer: Any, stop_ids: set[int], use_cache: bool = True
) -> PreparedData:
    """Load, convert, split and tokenize the data, or reuse the tokenized cache when the data files,
    tokenizer, template and every preprocessing flag are unchanged (see `sftflow.data.cache`)."""
    from sftflow.data.cache import TokenizedCache, cache_key
    from sftflow.data.loader import LoadReport

    data, training = args.data, args.training
    stage = getattr(args.finetuning, "stage", "sft")
    cache = None
    if use_cache and not data.streaming:
        splits = ["train", "eval"] if training.do_train else ["eval"]
        key = cache_key(data, stage, training.seed, splits, tokenizer)
        cache = TokenizedCache.for_key(key, data.tokenized_cache_dir)
        hit = None if data.overwrite_cache else cache.load()
        if hit is not None:
            parts, meta = hit
            return PreparedData(parts.get("train"), parts.get("eval"), parts.get("eval_conversations"), meta)
    report = LoadReport()
    train_convs, eval_convs = load_datasets(args, report)
    stats: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    train_set = (
        tokenize_sft(train_convs, tokenizer, args, stop_ids, "train", stats["train"]) if train_convs else None
    )
    eval_set = (
        tokenize_sft(eval_convs, tokenizer, args, stop_ids, "eval", stats["eval"]) if eval_convs else None
    )
    meta = {
        "datasets": {name: dataclasses.asdict(count) for name, count in report.datasets.items()},
        "splits": stats,
    }
    if cache is not None:
        cache.save({"train": train_set, "eval": eval_set, "eval_conversations": eval_convs}, meta)
    return PreparedData(train_set, eval_set, eval_convs, meta)


def load_datasets(args: RunArgs, report: Any = None, stage: str | None = None) -> tuple[Any, Any]:
    """Training conversations and held-out conversations (eval_dataset, or a val_size split).

    `report` (a `sftflow.data.loader.LoadReport`) collects per-dataset row counts. `stage` is the data
    form to load (pt, sft or rm; default: the run's stage). A streamed held-out
    set is small (val_size is a count) and is read into memory, so eval and predict can index it.
    """
    from datasets import Dataset, IterableDataset

    data, seed = args.data, args.training.seed
    stage = stage or getattr(args.finetuning, "stage", "sft")
    train = load_conversations(data.dataset, data, seed, stage, report) if data.dataset else None
    held_out = None
    if data.eval_dataset:
        held_out = load_conversations(data.eval_dataset, data, seed, stage, report)
    elif data.val_size and train is not None:
        train, held_out = split_train_eval(train, data.val_size, seed)
    if isinstance(held_out, IterableDataset):
        held_out = Dataset.from_list(list(held_out), features=held_out.features)
    if train is not None and args.training.do_train:
        if isinstance(train, IterableDataset):
            train = train.shuffle(seed=seed, buffer_size=data.buffer_size)
        else:
            train = train.shuffle(seed=seed)
    return (train if args.training.do_train else None), held_out


def tokenize_sft(
    conversations: Any,
    tokenizer: Any,
    args: RunArgs,
    stop_ids: set[int],
    split: str,
    stats: dict[str, int] | None = None,
) -> Any:
    """Tokenize conversations into input_ids/labels; report truncated and dropped examples (and count
    them in `stats`: examples, truncated, dropped). A stream is tokenized lazily, uncounted."""
    from datasets import IterableDataset

    data = args.data

    def encode(row: dict) -> dict:
        encoded = encode_sft(
            tokenizer,
            row["messages"],
            data.cutoff_len,
            data.train_on_prompt,
            stop_ids,
            mask_history=data.mask_history,
            cutoff_policy=data.cutoff_policy,
        )
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "truncated": encoded.truncated,
            "dropped": encoded.dropped,
        }

    if isinstance(conversations, IterableDataset):
        encoded = conversations.map(encode, remove_columns=conversations.column_names)
        encoded = encoded.filter(lambda reason: not reason, input_columns="dropped")
        return encoded.remove_columns(["truncated", "dropped"])
    workers = data.preprocessing_num_workers
    encoded = conversations.map(
        encode,
        remove_columns=conversations.column_names,
        num_proc=min(workers, len(conversations)) if workers and workers > 1 else None,
        desc=f"Tokenizing {split}",
    )
    dropped = [i for i, reason in enumerate(encoded["dropped"]) if reason]
    truncated = sum(encoded["truncated"])
    if stats is not None:
        stats.update(examples=len(encoded) - len(dropped), truncated=truncated, dropped=len(dropped))
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
            "%s: dropped %d examples that do not fit cutoff_len=%d (e.g. example %d: %s). Raise cutoff_len to keep them.",
            split,
            len(dropped),
            data.cutoff_len,
            dropped[0],
            encoded[dropped[0]]["dropped"],
        )
        dropped_set = set(dropped)
        encoded = encoded.select([i for i in range(len(encoded)) if i not in dropped_set])
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
    if result.report:
        lines.append(f"  report: {result.report.resolve()}")
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
