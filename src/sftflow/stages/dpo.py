"""The preference-tuning (dpo) recipe, top to bottom:
args -> tokenizer/template -> preference pairs -> causal LM (+LoRA) -> TRL DPOTrainer (sigmoid / ipo /
hinge, optional NLL term), TRL's experimental ORPOTrainer or CPOTrainer (SimPO), each with sftflow's `Resilience` (atomic
checkpoints, resume, NaN/OOM/SIGTERM handling, tokens/s logs) -> train/eval -> report.

Pairs are tokenized by sftflow (`encode_pairwise`, the same rendering and cutoff policy as sft) and handed
to TRL already split into prompt and completion ids. With LoRA no reference model is loaded: the
reference is the base model with the adapter disabled. With full or freeze tuning a frozen copy of the
starting model is the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import DPOConfig, DPOTrainer

from sftflow.model.adapter import method_callbacks
from sftflow.model.loader import load_chat_tokenizer, load_model
from sftflow.tools.report import write_report
from sftflow.train.callbacks import JsonlLogCallback
from sftflow.train.optim import build_optimizer
from sftflow.train.preference import orpo_trainer, simpo_trainer
from sftflow.train.steps import (
    RunResult,
    build_model,
    evaluate,
    format_summary,
    owns_output_dir,
    prepare_data,
    start_run,
    train_and_save,
    trl_args,
)
from sftflow.train.trainer import Resilience

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.parser import RunArgs

# pref_loss -> DPOConfig.loss_type
DPO_LOSSES = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge"}


@owns_output_dir
def run_dpo(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the dpo recipe described by `args` and write everything under `output_dir`.

    Metrics (TRL's): train/eval loss, rewards/chosen, rewards/rejected, rewards/accuracies (the share of
    pairs whose chosen answer gains more log-probability over the reference than the rejected one) and
    rewards/margins.

    Raises:
        SftflowError: orpo / simpo without TRL's experimental ORPO / CPO trainer.
    """
    training, finetuning = args.training, args.finetuning
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template.
    tokenizer = load_chat_tokenizer(args.model, args.data)

    # 2. Pairs: load (ranking: true datasets), hold out eval pairs, tokenize; completions are the trained
    #    answers through their end-of-turn token, as in sft.
    prepared = prepare_data(args, tokenizer)
    train_set, eval_set = prepared.train, prepared.eval

    # 3. Policy model with LoRA / freeze / full tuning.
    model = build_model(args, tokenizer)

    # 4. Trainer (TRL needs a train_dataset even when only evaluating).
    train_set = train_set if train_set is not None else eval_set
    trainer_callbacks = [
        JsonlLogCallback(output_dir),
        *method_callbacks(finetuning, output_dir),
        *(callbacks or []),
    ]
    if finetuning.pref_loss in ("orpo", "simpo"):  # reference-free: TRL's experimental ORPO / CPO trainer
        build = orpo_trainer if finetuning.pref_loss == "orpo" else simpo_trainer
        eval_pairs = completions(eval_set) if eval_set is not None else None
        trainer = build(args, model, tokenizer, completions(train_set), eval_pairs, trainer_callbacks)
    else:
        trainer = dpo_trainer(args, model, tokenizer, train_set, eval_set, trainer_callbacks)
    result = RunResult(output_dir)

    # 5. Train and save; 6. eval loss and preference metrics on the held-out pairs.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=False)

    # 7. report.html and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result


def completions(pairs: Dataset) -> Any:
    """TRL's preference columns from `tokenize_pairs`: the shared prompt ids and each trained answer.

    >>> from datasets import Dataset
    >>> d = Dataset.from_list([{"chosen_ids": [1, 2, 3, 4, 9], "rejected_ids": [1, 2, 5, 9],
    ...     "prompt_len": 2, "chosen_end": 4, "rejected_end": 3, "row": 0}])
    >>> completions(d)[0] == {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    True
    """

    def split(row: dict) -> dict:
        cut = row["prompt_len"]
        return {
            "prompt_ids": row["chosen_ids"][:cut],
            "chosen_ids": row["chosen_ids"][cut : row["chosen_end"]],
            "rejected_ids": row["rejected_ids"][cut : row["rejected_end"]],
        }

    return pairs.map(split, remove_columns=pairs.column_names)


class PretokenizedDPOTrainer(Resilience, DPOTrainer):
    """DPOTrainer with `Resilience` that takes prompt/chosen/rejected ids as they are (sftflow tokenized
    them): TRL's private `_prepare_dataset` is replaced (tests/test_faults_pairs.py checks it still exists)."""

    reference_forward = True  # each step runs the reference (adapter disabled, or the frozen copy)

    def _prepare_dataset(self, dataset: Dataset, *unused: Any) -> Any:
        return dataset


def dpo_trainer(
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> Any:
    """TRL's DPOTrainer on sftflow's tokenization, with pref_beta, pref_loss (+ pref_ftx) and the
    memory-wise reference (the base with the adapter disabled under LoRA)."""

    finetuning = args.finetuning
    loss_type, loss_weights = [DPO_LOSSES[finetuning.pref_loss]], None
    if finetuning.pref_ftx:
        loss_type, loss_weights = [*loss_type, "sft"], [1.0, finetuning.pref_ftx]
    config = trl_args(
        DPOConfig,
        args.training,
        beta=finetuning.pref_beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        max_length=None,  # sftflow's cutoff_len already applies
    )
    lora = finetuning.finetuning_type == "lora"
    ref_model = None
    if not lora:  # a frozen copy of the starting model, loaded like the policy
        ref_model = load_model(args.model, tokenizer).requires_grad_(False).eval()
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=completions(train_set),
        eval_dataset=completions(eval_set) if eval_set is not None else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, args.finetuning, config), None),  # None: the Trainer's own
        skip_nan=args.finetuning.skip_nan,
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if lora and "ref" in getattr(peft_model, "peft_config", {}):
        # TRL keeps a frozen copy of the adapter as reference; without it the reference is the base with
        # the adapter disabled (identical for a fresh adapter, and never saved beside it)
        peft_model.delete_adapter("ref")
    return trainer
