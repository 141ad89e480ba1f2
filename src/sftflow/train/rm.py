"""The reward-model (rm) workflow, top to bottom:
args -> tokenizer/template -> preference pairs (prompt, chosen, rejected) -> sequence-classification model
with one output (+LoRA, the `score` head trained and saved in full) -> TRL RewardTrainer (loss
-log sigmoid(r_chosen - r_rejected)) -> train/eval -> scores for the held-out pairs -> report.

Also home of the pieces both pairwise stages (rm, dpo) share: tokenizing pairs and building a TRL config
from the run's training arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from sftflow.config import RunArgs
from sftflow.data.processor import IGNORE_INDEX, encode_pairwise, stop_token_ids
from sftflow.data.template import render
from sftflow.errors import SftflowError
from sftflow.train.sft import (
    SftResult,
    evaluate_and_report,
    format_summary,
    load_chat_tokenizer,
    load_datasets,
    start_run,
    train_and_save,
)

logger = logging.getLogger(__name__)

# Attribute names of the one-output head of HF sequence-classification models.
HEAD_NAMES = ("score", "classifier")


def run_rm(args: RunArgs, callbacks: list[Any] | None = None) -> SftResult:
    """Run the rm workflow described by `args` and write everything under `output_dir`.

    Metrics: eval_loss and eval_accuracy (TRL: the share of pairs with the chosen answer scored higher,
    averaged over eval batches); with do_predict, predict_accuracy and predict_margin over every held-out
    pair and `generated_predictions.jsonl` with both scores per pair.

    Raises:
        SftflowError: a setting the rm stage does not support (see `check_pairwise_args`), or a data or
            model mistake.
    """
    from trl import RewardConfig, RewardTrainer

    from sftflow.train.callbacks import JsonlLogCallback

    training = args.training
    check_pairwise_args(args)
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template: prompt + answer are rendered exactly as in sft.
    tokenizer = load_chat_tokenizer(args)
    stop_ids = stop_token_ids(tokenizer)

    # 2. Pairs: load (ranking: true datasets), hold out eval pairs, tokenize both answers on one prompt.
    train_set, eval_set, eval_pairs = prepare_pairs(args, tokenizer, stop_ids)

    # 3. Model: AutoModelForSequenceClassification with one label; its head always trains.
    model = reward_model(args, tokenizer)

    # 4. Trainer: TRL's, on our tokenization (the full rendered conversations, scored at their last token).
    columns = ["chosen_ids", "rejected_ids"]
    trainer = RewardTrainer(
        model=model,
        args=trl_args(RewardConfig, training, max_length=None, disable_dropout=False),
        # TRL needs a train_dataset even when only evaluating
        train_dataset=(train_set if train_set is not None else eval_set).select_columns(columns),
        eval_dataset=eval_set.select_columns(columns) if eval_set is not None else None,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(output_dir), *(callbacks or [])],
    )
    result = SftResult(output_dir)

    # 5. Train and save (the adapter holds the score head); 6. eval loss and accuracy.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate_and_report(trainer, args, result, perplexity=False)

    # 7. Predict: score every held-out pair, write the scores, report accuracy over pairs.
    if training.do_predict:
        chosen, rejected = score_pairs(trainer, eval_set)
        metrics = pair_metrics(chosen, rejected, "predict")
        if trainer.is_world_process_zero():
            write_scores(output_dir, eval_pairs, eval_set, tokenizer, chosen, rejected)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        result.metrics.update(metrics)

    if trainer.is_world_process_zero():
        print(format_summary(result), flush=True)
    return result


def check_pairwise_args(args: RunArgs) -> None:
    """Refuse, before anything loads, settings the pairwise stages do not support.

    Raises:
        SftflowError: streaming, packing, or (rm) a LoRA setting
            that needs a causal-LM adapter.
    """
    data, stage = args.data, args.finetuning.stage
    if data.streaming:
        raise SftflowError(f"stage: {stage} reads the pairs into memory; set streaming: false.")
    if data.packing:
        raise SftflowError(f"stage: {stage} scores whole pairs; packing does not apply. Set packing: false.")
    if stage == "rm" and args.finetuning.finetuning_type == "lora":
        unsupported = {
            "adapter_name_or_path": args.model.adapter_name_or_path,
            "quantization_bit": args.model.quantization_bit,
            "new_special_tokens": args.model.new_special_tokens,
        }
        given = [key for key, value in unsupported.items() if value]
        if given:
            raise SftflowError(
                f"stage: rm with LoRA does not support {', '.join(given)} yet (the reward adapter is a PEFT "
                "SEQ_CLS adapter built here, not the causal-LM one). Remove it, or use finetuning_type: full/freeze."
            )


def trl_args(config_class: type, training: Any, **overrides: Any) -> Any:
    """A TRL config (a `TrainingArguments` subclass) holding every training key of this run.

    TRL's configs change some defaults (bf16 on, gradient checkpointing on, learning_rate 1e-6,
    logging_steps 10); copying each key keeps the user's values and sftflow's defaults (fp32 on CPU).
    `overrides` set the stage's own keys (beta, loss_type, ...).
    """
    from transformers import TrainingArguments

    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    values = {name: getattr(training, name) for name in names if hasattr(training, name)}
    return config_class(**{**values, **overrides})


def prepare_pairs(args: RunArgs, tokenizer: Any, stop_ids: set[int]) -> tuple[Any, Any, Any]:
    """The data step of the pairwise stages (rm, dpo): load the ranking datasets, hold out eval pairs,
    tokenize chosen and rejected on their shared prompt (main process first), preview one pair.
    Returns the tokenized train and eval sets and the held-out pairs as loaded."""
    training = args.training
    with training.main_process_first(desc="dataset preprocessing"):
        train_pairs, eval_pairs = load_datasets(args, stage="rm")
        train_set = tokenize_pairs(train_pairs, tokenizer, args, stop_ids, "train") if train_pairs else None
        eval_set = tokenize_pairs(eval_pairs, tokenizer, args, stop_ids, "eval") if eval_pairs else None
    if training.process_index == 0:
        preview_pair(train_set if train_set is not None else eval_set, tokenizer)
    return train_set, eval_set, eval_pairs


def tokenize_pairs(pairs: Any, tokenizer: Any, args: RunArgs, stop_ids: set[int], split: str) -> Any:
    """Tokenize pairs with `encode_pairwise`: `chosen_ids`/`rejected_ids` (the whole rendered
    conversations, what rm scores), `prompt_len` (their shared prompt) and `chosen_end`/`rejected_end`
    (the end of each trained answer, through its end-of-turn token: what dpo scores). `row` is the index
    in `pairs`. Over-long pairs follow cutoff_policy; truncations and drops are logged.

    Raises:
        SftflowError: no pair fits cutoff_len.
    """
    data = args.data

    def encode(row: dict) -> dict:
        enc = encode_pairwise(
            tokenizer,
            row["messages"],
            row["chosen"],
            row["rejected"],
            data.cutoff_len,
            stop_ids,
            cutoff_policy=data.cutoff_policy,
        )
        prompt_len = _first_trained(enc.chosen_labels) if not enc.dropped else 0
        return {
            "chosen_ids": enc.chosen_input_ids,
            "rejected_ids": enc.rejected_input_ids,
            "prompt_len": prompt_len,
            "chosen_end": _last_trained(enc.chosen_labels) + 1 if not enc.dropped else 0,
            "rejected_end": _last_trained(enc.rejected_labels) + 1 if not enc.dropped else 0,
            "truncated": enc.truncated,
            "dropped": enc.dropped,
        }

    workers = data.preprocessing_num_workers
    encoded = pairs.map(
        encode,
        with_indices=False,
        remove_columns=pairs.column_names,
        num_proc=min(workers, len(pairs)) if workers and workers > 1 else None,
        desc=f"Tokenizing {split} pairs",
    )
    encoded = encoded.add_column("row", list(range(len(encoded))))
    truncated = sum(encoded["truncated"])
    dropped = [i for i, reason in enumerate(encoded["dropped"]) if reason]
    if truncated:
        logger.warning(
            "%s: %d of %d pairs exceed cutoff_len=%d and were truncated.",
            split,
            truncated,
            len(encoded),
            data.cutoff_len,
        )
    if dropped:
        logger.warning(
            "%s: dropped %d pairs that cannot fit cutoff_len=%d (e.g. pair %d: %s). Raise cutoff_len to keep them.",
            split,
            len(dropped),
            data.cutoff_len,
            dropped[0],
            encoded[dropped[0]]["dropped"],
        )
        encoded = encoded.filter(lambda reason: not reason, input_columns="dropped")
    if len(encoded) == 0:
        raise SftflowError(f"{split}: no pair fits cutoff_len={data.cutoff_len}; raise cutoff_len.")
    return encoded.remove_columns(["truncated", "dropped"])


def _first_trained(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def _last_trained(labels: list[int]) -> int:
    return max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def preview_pair(dataset: Any, tokenizer: Any) -> None:
    """Log the first pair as the model sees it: the shared prompt, then each answer."""
    if dataset is None or len(dataset) == 0:
        return
    pair = dataset[0]
    cut = pair["prompt_len"]
    logger.info(
        "pair 0 (prompt %d tokens)\n--- prompt ---\n%s\n--- chosen ---\n%s\n--- rejected ---\n%s",
        cut,
        tokenizer.decode(pair["chosen_ids"][:cut]),
        tokenizer.decode(pair["chosen_ids"][cut:]),
        tokenizer.decode(pair["rejected_ids"][cut:]),
    )


def head_name(model: Any) -> str:
    """The attribute name of a sequence-classification model's head (`score` for decoder LMs).

    Raises:
        SftflowError: the model has none of the known head names.
    """
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return name
    raise SftflowError(f"{type(model).__name__} has no reward head named {' or '.join(HEAD_NAMES)}.")


def load_reward_model(args: RunArgs, tokenizer: Any) -> Any:
    """The model of model_name_or_path as `AutoModelForSequenceClassification` with one output (a fresh
    head on the pretrained body), with the same loading rules as `sftflow.model.loader.load_model`."""
    from transformers import AutoModelForSequenceClassification

    from sftflow.model.loader import (
        _from_pretrained,
        check_attn_implementation,
        check_safe_weights,
        model_path,
        resize_embeddings,
        resolve_dtype,
    )

    model_args = args.model
    path = model_path(model_args)
    check_safe_weights(path, "model_name_or_path", allow_pickle=not model_args.use_safetensors)
    check_attn_implementation(model_args.attn_implementation)
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        path,
        num_labels=1,
        dtype=resolve_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        use_safetensors=True if model_args.use_safetensors else None,
        trust_remote_code=model_args.trust_remote_code,
    )
    resize_embeddings(model, len(tokenizer))
    # the score is read at the last non-pad token of each sequence
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_model(args: RunArgs, tokenizer: Any) -> Any:
    """The reward model ready to train: LoRA (PEFT SEQ_CLS, the head trained in full and saved with the
    adapter via modules_to_save), or full / freeze tuning (freeze also trains the head)."""
    from sftflow.model.adapter import apply_finetuning

    model = load_reward_model(args, tokenizer)
    head = head_name(model)
    finetuning = args.finetuning
    if finetuning.finetuning_type == "freeze":
        extra = [*(finetuning.freeze_extra_modules or []), head]
        finetuning = dataclasses.replace(finetuning, freeze_extra_modules=extra)
    elif finetuning.finetuning_type == "lora":
        extra = list(dict.fromkeys([head, *(finetuning.additional_target or [])]))
        finetuning = dataclasses.replace(finetuning, additional_target=extra)
    return apply_finetuning(
        model,
        args.model,
        finetuning,
        tokenizer=tokenizer,
        gradient_checkpointing=bool(args.training.gradient_checkpointing),
        gradient_checkpointing_kwargs=args.training.gradient_checkpointing_kwargs,
        task_type="SEQ_CLS",
    )


def score_pairs(trainer: Any, dataset: Any) -> tuple[list[float], list[float]]:
    """The reward of each chosen and rejected sequence of `dataset`, in dataset order."""
    import torch

    model = trainer.model
    model.eval()
    loader = trainer.get_eval_dataloader(dataset.select_columns(["chosen_ids", "rejected_ids"]))
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for batch in loader:
            rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rewards = rewards.squeeze(-1).float()
            c, r = trainer.accelerator.gather_for_metrics(rewards.chunk(2))
            chosen += c.tolist()
            rejected += r.tolist()
    return chosen, rejected


def pair_metrics(chosen: list[float], rejected: list[float], prefix: str) -> dict[str, float]:
    """Accuracy (chosen scored above rejected) and mean margin over every pair.

    >>> pair_metrics([1.0, 0.0], [0.0, 1.0], "predict")
    {'predict_accuracy': 0.5, 'predict_margin': 0.0}
    """
    n = len(chosen)
    return {
        f"{prefix}_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        f"{prefix}_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
    }


def write_scores(
    output_dir: Path,
    pairs: Any,
    encoded: Any,
    tokenizer: Any,
    chosen: list[float],
    rejected: list[float],
) -> None:
    """generated_predictions.jsonl: per held-out pair, the prompt as the model saw it, both answers and
    their scores."""
    with (output_dir / "generated_predictions.jsonl").open("w", encoding="utf-8") as f:
        for row, c, r in zip(encoded["row"], chosen, rejected, strict=True):
            pair = pairs[row]
            entry = {
                "prompt": render(tokenizer, pair["messages"], add_generation_prompt=True),
                "chosen": pair["chosen"],
                "rejected": pair["rejected"],
                "chosen_score": round(c, 4),
                "rejected_score": round(r, 4),
            }
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
