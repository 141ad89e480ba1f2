"""The reference-free preference trainers of `stage: dpo`: ORPO (`pref_loss: orpo`) and SimPO
(`pref_loss: simpo`), TRL's experimental ORPOTrainer and CPOTrainer on sftflow's tokenized pairs, with
`Resilience`. Both build their rows from sftflow's prompt/chosen/rejected ids (`pair_rows`) instead of
tokenizing text, and neither loads a reference model.

ORPO adds an odds-ratio term, weighted by `pref_beta` (ORPO's lambda), to the NLL of the chosen answers.
SimPO's reward is the length-normalised log-probability of an answer, beta x mean log p(answer | prompt),
and the loss is -log sigmoid(reward(chosen) - reward(rejected) - gamma) with the target margin
gamma = `simpo_gamma`. `cpo_alpha` (the weight of CPO's NLL term on the chosen answers) is `pref_ftx`,
0 by default: plain SimPO.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX
from sftflow.errors import SftflowError
from sftflow.train.optim import build_optimizer
from sftflow.train.steps import trl_args
from sftflow.train.trainer import Resilience

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from sftflow.config.parser import RunArgs


def pair_rows(feature: dict) -> dict:
    """The rows TRL's CPO/ORPO trainers build from text, built from sftflow's prompt/chosen/rejected ids.

    >>> pair_rows({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]})["rejected_labels"]
    [-100, -100, 4, 5]
    """
    prompt = list(feature["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out


def experimental_trainer(name: str, pref_loss: str, others: str) -> tuple[type, type]:
    """TRL's experimental `<NAME>Config` and `<NAME>Trainer` from `trl.experimental.<name>`.

    Raises:
        SftflowError: this TRL does not ship them; the message names the pref_loss values `others` that work.
    """
    try:
        module = importlib.import_module(f"trl.experimental.{name}")
        upper = name.upper()
        return getattr(module, f"{upper}Config"), getattr(module, f"{upper}Trainer")
    except (ImportError, AttributeError) as exc:
        raise SftflowError(
            f"pref_loss: {pref_loss} needs TRL's experimental {name.upper()} trainer (trl.experimental.{name}), "
            f"which this TRL does not have ({exc}). Install a TRL that ships it, or use pref_loss: {others}."
        ) from None


def pretokenized(trainer_class: type) -> type:
    """`trainer_class` (TRL's ORPO or CPO trainer) with `Resilience`, building its rows from sftflow's ids
    (`pair_rows`) instead of tokenizing text."""

    class Pretokenized(Resilience, trainer_class):
        def tokenize_row(self, feature: dict, model: nn.Module | None = None) -> dict:
            return pair_rows(feature)

    Pretokenized.__name__ = Pretokenized.__qualname__ = f"Pretokenized{trainer_class.__name__}"
    return Pretokenized


def _build(
    trainer_class: type,
    config: TrainingArguments,
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> Any:
    return pretokenized(trainer_class)(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, args.finetuning, config), None),  # None: the Trainer's own
        skip_nan=args.finetuning.skip_nan,
    )


def orpo_trainer(
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> Any:
    """TRL's experimental ORPOTrainer with beta = pref_beta (ORPO's lambda, the weight of the odds-ratio
    term), on pairs in `completions` form (prompt_ids, chosen_ids, rejected_ids).

    Raises:
        SftflowError: this TRL has no experimental ORPO trainer.
    """
    config_class, trainer_class = experimental_trainer("orpo", "orpo", "sigmoid, ipo or hinge")
    config = trl_args(
        config_class,
        args.training,
        beta=args.finetuning.pref_beta,
        max_length=args.data.cutoff_len,  # rows are already within cutoff_len
        remove_unused_columns=False,
    )
    return _build(trainer_class, config, args, model, tokenizer, train_set, eval_set, callbacks)


def simpo_trainer(
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> Any:
    """TRL's experimental CPOTrainer with loss_type simpo, beta = pref_beta, gamma = simpo_gamma and
    cpo_alpha = pref_ftx, on pairs in `completions` form (prompt_ids, chosen_ids, rejected_ids).

    Raises:
        SftflowError: this TRL has no experimental CPO trainer.
    """
    config_class, trainer_class = experimental_trainer("cpo", "simpo", "sigmoid, ipo, hinge or orpo")
    finetuning = args.finetuning
    config = trl_args(
        config_class,
        args.training,
        loss_type="simpo",
        beta=finetuning.pref_beta,
        simpo_gamma=finetuning.simpo_gamma,
        cpo_alpha=finetuning.pref_ftx,
        max_length=args.data.cutoff_len,  # rows are already within cutoff_len
        remove_unused_columns=False,
    )
    return _build(trainer_class, config, args, model, tokenizer, train_set, eval_set, callbacks)
