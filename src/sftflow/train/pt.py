"""The continued pre-training (pt) workflow, top to bottom:
args -> tokenizer -> plain texts (+eos, concatenated, cut into cutoff_len rows) -> model (+LoRA) -> trainer
-> train/eval (loss, perplexity) -> report.

Every token is trained (no chat template, no prompt mask). Rows never hold padding except the last row of
each tokenization batch, which may be shorter.
"""

from __future__ import annotations

import logging
from typing import Any

from sftflow.config import RunArgs
from sftflow.data.processor import encode_pretrain
from sftflow.errors import SftflowError
from sftflow.train.sft import (
    SftResult,
    build_model,
    evaluate_and_report,
    format_summary,
    load_chat_tokenizer,
    load_datasets,
    preview,
    start_run,
    train_and_save,
)

logger = logging.getLogger(__name__)


def run_pt(args: RunArgs, callbacks: list[Any] | None = None) -> SftResult:
    """Run the pt workflow described by `args` and write everything under `output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.

    Raises:
        SftflowError: do_predict is set (plain text has no prompts to answer), or a data/model mistake.
    """
    from sftflow.data.collator import SftCollator
    from sftflow.train.callbacks import JsonlLogCallback
    from sftflow.train.trainer import SftTrainer

    training = args.training
    if training.do_predict:
        raise SftflowError(
            "stage: pt has nothing to predict (plain text has no prompts and answers). Set do_predict: false; "
            "do_eval reports the held-out loss and perplexity."
        )
    output_dir, resume = start_run(args)

    # 1. Tokenizer (its chat template is saved with it for later stages, but pt text is not templated).
    tokenizer = load_chat_tokenizer(args)

    # 2. Datasets: each text + eos, concatenated and cut into cutoff_len rows, every token trained.
    with training.main_process_first(desc="dataset preprocessing"):
        train_texts, eval_texts = load_datasets(args)
        train_set = tokenize_texts(train_texts, tokenizer, args, "train") if train_texts is not None else None
        eval_set = tokenize_texts(eval_texts, tokenizer, args, "eval") if eval_texts is not None else None
    if training.process_index == 0:
        preview(train_set if train_set is not None else eval_set, tokenizer, args.data.preview_rows)

    # 3. Model with LoRA / freeze / full tuning.
    model = build_model(args, tokenizer)

    # 4. Trainer: rows are already cutoff_len long; the collator pads only the shorter last rows.
    trainer = SftTrainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=SftCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(output_dir), *(callbacks or [])],
        skip_nan=args.finetuning.skip_nan,
    )
    result = SftResult(output_dir)

    # 5. Train and save; 6. eval loss and perplexity on the held-out text.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate_and_report(trainer, args, result, perplexity=True)

    if trainer.is_world_process_zero():
        print(format_summary(result), flush=True)
    return result


def tokenize_texts(texts: Any, tokenizer: Any, args: RunArgs, split: str) -> Any:
    """Turn a `text` dataset into cutoff_len rows of `input_ids`/`labels` (`encode_pretrain`, batched:
    rows do not cross batches of 1000 texts). A stream is tokenized lazily.

    Raises:
        SftflowError: the texts hold no token.
    """
    from datasets import IterableDataset

    cutoff_len = args.data.cutoff_len

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return encode_pretrain(tokenizer, batch["text"], cutoff_len)

    if isinstance(texts, IterableDataset):
        return texts.map(encode, batched=True, remove_columns=["text"])
    workers = args.data.preprocessing_num_workers
    rows = texts.map(
        encode,
        batched=True,
        remove_columns=texts.column_names,
        num_proc=min(workers, len(texts)) if workers and workers > 1 else None,
        desc=f"Tokenizing {split}",
    )
    if len(rows) == 0:
        raise SftflowError(f"{split}: the texts hold no token.")
    tokens = sum(len(ids) for ids in rows["input_ids"])
    logger.info(
        "%s: %d texts -> %d tokens in %d rows of <= %d", split, len(texts), tokens, len(rows), cutoff_len
    )
    return rows
