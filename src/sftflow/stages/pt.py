"""The continued pre-training (pt) recipe, top to bottom:
args -> tokenizer -> plain texts (+eos, concatenated, cut into cutoff_len rows) -> model (+LoRA) -> trainer
-> train/eval (loss, perplexity) -> report.

Every token is trained (no chat template, no prompt mask). Rows never hold padding except the last row of
each tokenization batch, which may be shorter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sftflow.data.collator import SftCollator
from sftflow.model.adapter import method_callbacks
from sftflow.model.loader import load_chat_tokenizer
from sftflow.tools.report import write_report
from sftflow.train.callbacks import JsonlLogCallback
from sftflow.train.optim import build_optimizer
from sftflow.train.steps import (
    RunResult,
    build_model,
    evaluate,
    format_summary,
    owns_output_dir,
    prepare_data,
    start_run,
    train_and_save,
)
from sftflow.train.trainer import SftflowTrainer

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs


@owns_output_dir
def run_pt(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the pt recipe described by `args` and write everything under `output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.
    """
    training = args.training
    output_dir, resume = start_run(args)

    # 1. Tokenizer (its chat template is saved with it for later stages, but pt text is not templated).
    tokenizer = load_chat_tokenizer(args.model, args.data)

    # 2. Datasets: each text + eos, concatenated and cut into cutoff_len rows, every token trained.
    prepared = prepare_data(args, tokenizer)

    # 3. Model with LoRA / freeze / full tuning.
    model = build_model(args, tokenizer)

    # 4. Trainer: rows are already cutoff_len long; the collator pads only the shorter last rows.
    trainer = SftflowTrainer(
        model=model,
        args=training,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=SftCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[
            JsonlLogCallback(output_dir),
            *method_callbacks(args.finetuning, output_dir),
            *(callbacks or []),
        ],
        skip_nan=args.finetuning.skip_nan,
        fast_loss=args.finetuning.fast_loss,
        optimizers=(build_optimizer(model, args.finetuning, training), None),  # None: the Trainer's own
    )
    result = RunResult(output_dir)

    # 5. Train and save; 6. eval loss and perplexity on the held-out text.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=True)

    # 7. report.html and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result
