"""The reward-model (rm) recipe, top to bottom:
args -> tokenizer/template -> preference pairs (prompt, chosen, rejected) -> sequence-classification model
with one output (+LoRA, the `score` head trained and saved in full) -> TRL RewardTrainer (loss
-log sigmoid(r_chosen - r_rejected)) with sftflow's `Resilience` -> train/eval -> scores for the held-out
pairs -> report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import RewardConfig, RewardTrainer

from sftflow.infer.predict import write_pair_scores
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
    record,
    start_run,
    train_and_save,
    trl_args,
)
from sftflow.train.trainer import Resilience

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from sftflow.config.parser import RunArgs


@owns_output_dir
def run_rm(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the rm recipe described by `args` and write everything under `output_dir`.

    Metrics: eval_loss and eval_accuracy (TRL: the share of pairs with the chosen answer scored higher,
    averaged over eval batches); with do_predict, predict_accuracy and predict_margin over every held-out
    pair and `generated_predictions.jsonl` with both scores per pair.
    """
    training = args.training
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template: prompt + answer are rendered exactly as in sft.
    tokenizer = load_chat_tokenizer(args.model, args.data)

    # 2. Pairs: load (ranking: true datasets), hold out eval pairs, tokenize both answers on one prompt.
    prepared = prepare_data(args, tokenizer)
    train_set, eval_set = prepared.train, prepared.eval

    # 3. Model: AutoModelForSequenceClassification with one label; its head always trains.
    model = build_model(args, tokenizer, head="score")

    # 4. Trainer: TRL's, on our tokenization (the full rendered conversations, scored at their last token).
    #    With sftflow's checkpoints, resume, NaN/OOM/SIGTERM handling and tokens/s logs.
    columns = ["chosen_ids", "rejected_ids"]
    config = trl_args(RewardConfig, training, max_length=None, disable_dropout=False)
    trainer = ResilientRewardTrainer(
        model=model,
        args=config,
        # TRL needs a train_dataset even when only evaluating
        train_dataset=(train_set if train_set is not None else eval_set).select_columns(columns),
        eval_dataset=eval_set.select_columns(columns) if eval_set is not None else None,
        processing_class=tokenizer,
        callbacks=[
            JsonlLogCallback(output_dir),
            *method_callbacks(args.finetuning, output_dir),
            *(callbacks or []),
        ],
        optimizers=(build_optimizer(model, args.finetuning, config), None),  # None: the Trainer's own
        skip_nan=args.finetuning.skip_nan,
    )
    result = RunResult(output_dir)

    # 5. Train and save (the adapter holds the score head); 6. eval loss and accuracy.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=False)

    # 7. Predict: score every held-out pair, write the scores, report accuracy over pairs.
    if training.do_predict:
        chosen, rejected = score_pairs(trainer, eval_set)
        if trainer.is_world_process_zero():
            write_pair_scores(output_dir, prepared.held_out, eval_set, tokenizer, chosen, rejected)
        record(trainer, "predict", pair_metrics(chosen, rejected, "predict"), result)

    # 8. report.html and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result


class ResilientRewardTrainer(Resilience, RewardTrainer):
    """TRL's RewardTrainer with sftflow's atomic checkpoints, resume, NaN/OOM/SIGTERM handling and
    throughput logs (`Resilience`); its tokens/s counts the chosen and the rejected sequence of each pair."""


def score_pairs(trainer: Trainer, dataset: Dataset) -> tuple[list[float], list[float]]:
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
