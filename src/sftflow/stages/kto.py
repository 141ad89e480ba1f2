"""The KTO recipe, top to bottom:
args -> tokenizer/template -> tagged conversations (LLaMA-Factory's KTO form: a `kto_tag` column) -> causal
LM (+LoRA) -> TRL's KTOTrainer with sftflow's `Resilience` (atomic checkpoints, resume, NaN/OOM/SIGTERM
handling, tokens/s logs) -> train/eval -> report.

Each example is tokenized by sftflow as in sft with only its last answer trained (`prepare`, form kto): the
prompt is everything before that answer, the completion the answer through its end-of-turn token, and
`label` its kto_tag. TRL's KTO estimates its reference KL term from mismatched pairs (each prompt with the
previous row's completion within a batch), so batches are drawn in order from the (seeded, shuffled)
training split. With per_device_train_batch_size 1 (which TRL refuses: its in-batch pairing would give a row
its own answer) each row is paired with the previous row of the split, as LLaMA-Factory pairs rows across its
preprocessing batch; the KL estimate is then one pair per step. With LoRA the reference is the base with the adapter disabled; with
full or freeze tuning a frozen copy of the starting model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import KTOConfig, KTOTrainer

from sftflow.data.encode import IGNORE_INDEX
from sftflow.model.adapter import method_callbacks
from sftflow.model.loader import load_chat_tokenizer, load_model
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
    trl_args,
)
from sftflow.train.trainer import Resilience

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from sftflow.config.parser import RunArgs


@owns_output_dir
def run_kto(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the kto recipe described by `args` and write everything under `output_dir`.

    Metrics (TRL's): train/eval loss, kl (the batch's reference KL estimate), rewards/chosen_sum and
    rewards/rejected_sum, logps/chosen_sum and logps/rejected_sum, count/chosen and count/rejected.
    """
    training = args.training
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template.
    tokenizer = load_chat_tokenizer(args.model, args.data)

    # 2. Tagged examples: load (a kto_tag column), hold out eval rows, tokenize as sft (last answer trained).
    prepared = prepare_data(args, tokenizer)
    train_set = prepared.train if prepared.train is not None else prepared.eval  # TRL needs one

    # 3. Policy model with LoRA / freeze / full tuning.
    model = build_model(args, tokenizer)

    # 4. Trainer.
    trainer = kto_trainer(
        args,
        model,
        tokenizer,
        kto_completions(train_set),
        kto_completions(prepared.eval) if prepared.eval is not None else None,
        [JsonlLogCallback(output_dir), *method_callbacks(args.finetuning, output_dir), *(callbacks or [])],
    )
    result = RunResult(output_dir)

    # 5. Train and save; 6. eval loss and KTO metrics on the held-out examples.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=False)

    # 7. report.html and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result


def kto_completions(examples: Dataset) -> Any:
    """TRL's unpaired-preference columns from the kto form: the prompt ids (before the trained answer), the
    trained answer's ids and the label.

    >>> from datasets import Dataset
    >>> d = Dataset.from_list([{"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, 4, 9], "label": False}])
    >>> kto_completions(d)[0]
    {'label': False, 'prompt_ids': [1, 2], 'completion_ids': [3, 4, 9]}
    """

    def split(row: dict) -> dict:
        trained = [i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]
        return {
            "prompt_ids": row["input_ids"][: trained[0]],
            "completion_ids": row["input_ids"][trained[0] : trained[-1] + 1],
            "label": row["label"],
        }

    return examples.map(split, remove_columns=examples.column_names)


def mismatched_completions(completions: list[list[int]], batch_size: int) -> list[list[int]]:
    """The KL completions: within each block of `batch_size` rows, each row gets the previous row's
    completion (the first row the block's last), so the KL term sees the batch's own answers on other prompts.
    With batch size 1 the block is the whole split (each row gets the previous row's answer, as LLaMA-Factory
    pairs rows across its preprocessing batch, not the training batch); a last block of one row gets the row
    before it. No row is paired with its own answer (that would make the KL term its implied reward).

    >>> mismatched_completions([[1], [2], [3], [4], [5]], 2)
    [[2], [1], [4], [3], [4]]
    >>> mismatched_completions([[1], [2], [3]], 1)
    [[3], [1], [2]]
    """
    block_size = batch_size if batch_size > 1 else len(completions)
    out: list[list[int]] = []
    for start in range(0, len(completions), block_size):
        block = completions[start : start + block_size]
        out += [block[-1], *block[:-1]] if len(block) > 1 or start == 0 else [completions[start - 1]]
    return out


class PretokenizedKTOTrainer(Resilience, KTOTrainer):
    """KTOTrainer with `Resilience` that takes prompt/completion ids as they are (sftflow tokenized them):
    TRL's `_prepare_dataset` is replaced by adding the KL completions only (tests/test_methods_kto.py checks the
    loss against the KTO formula on the same batch)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs["args"]
        self.kl_block_size = config.per_device_train_batch_size  # read by _prepare_dataset in __init__
        one = config.per_device_train_batch_size == 1
        if one:  # TRL refuses 1 because its in-batch pairing would give a row its own answer; ours does not
            config.per_device_train_batch_size = 2
        try:
            super().__init__(*args, **kwargs)
        finally:
            if one:
                config.per_device_train_batch_size = 1
        if one:
            self._train_batch_size = config.train_batch_size

    def _prepare_dataset(
        self,
        dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        args: TrainingArguments,
        dataset_name: str,
    ) -> Any:
        if not self.calculate_KL:
            return dataset
        kl = mismatched_completions(dataset["completion_ids"], self.kl_block_size)
        return dataset.add_column("KL_completion_ids", kl)


def kto_trainer(
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> PretokenizedKTOTrainer:
    """TRL's KTOTrainer on sftflow's tokenization, with pref_beta, kto_chosen_weight / kto_rejected_weight
    and the memory-wise reference (the base with the adapter disabled under LoRA)."""
    finetuning = args.finetuning
    config = trl_args(
        KTOConfig,
        args.training,
        beta=finetuning.pref_beta,
        desirable_weight=finetuning.kto_chosen_weight,
        undesirable_weight=finetuning.kto_rejected_weight,
        max_length=None,  # sftflow's cutoff_len already applies
        train_sampling_strategy="sequential",  # the KL completions pair each row with its batch neighbour
        remove_unused_columns=False,
    )
    lora = finetuning.finetuning_type == "lora"
    ref_model = None
    if not lora:  # a frozen copy of the starting model, loaded like the policy
        ref_model = load_model(args.model, tokenizer).requires_grad_(False).eval()
    trainer = PretokenizedKTOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, finetuning, config), None),
        skip_nan=finetuning.skip_nan,
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if lora and "ref" in getattr(peft_model, "peft_config", {}):
        # as in dpo: the reference is the base with the adapter disabled, not a saved frozen adapter copy
        peft_model.delete_adapter("ref")
    return trainer
