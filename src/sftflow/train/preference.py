"""SimPO (`stage: dpo` with `pref_loss: simpo`): TRL's experimental CPOTrainer with `loss_type="simpo"` on
sftflow's tokenized pairs, with `Resilience`.

SimPO needs no reference model: its reward is the length-normalised log-probability of an answer,
beta x mean log p(answer | prompt), and the loss is -log sigmoid(reward(chosen) - reward(rejected) - gamma)
with the target margin gamma = `simpo_gamma`. `cpo_alpha` (the weight of CPO's NLL term on the chosen
answers) is `pref_ftx`, 0 by default: plain SimPO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX
from sftflow.errors import SftflowError
from sftflow.train.optim import build_optimizer
from sftflow.train.steps import trl_args
from sftflow.train.trainer import Resilience

if TYPE_CHECKING:
    from datasets import Dataset
    from torch import nn
    from transformers import PreTrainedTokenizerBase

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
    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError as exc:
        raise SftflowError(
            f"pref_loss: simpo needs TRL's experimental CPO trainer (trl.experimental.cpo), which this TRL does "
            f"not have ({exc}). Install a TRL that ships it, or use pref_loss: sigmoid, ipo, hinge or orpo."
        ) from None

    class PretokenizedCPOTrainer(Resilience, CPOTrainer):
        """CPOTrainer with `Resilience` that builds its rows from sftflow's ids instead of tokenizing text."""

        def tokenize_row(self, feature: dict, model: nn.Module | None = None) -> dict:
            return pair_rows(feature)

    finetuning = args.finetuning
    config = trl_args(
        CPOConfig,
        args.training,
        loss_type="simpo",
        beta=finetuning.pref_beta,
        simpo_gamma=finetuning.simpo_gamma,
        cpo_alpha=finetuning.pref_ftx,
        max_length=args.data.cutoff_len,  # rows are already within cutoff_len
        remove_unused_columns=False,
    )
    return PretokenizedCPOTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, finetuning, config), None),
        skip_nan=finetuning.skip_nan,
    )
