"""The GRPO recipe, top to bottom:
args -> reward functions (checked before anything loads) -> tokenizer/template -> prompts (the data's
conversations without their final answer, rendered by the chat template; extra columns such as `answer`
go to the rewards) -> causal LM (+LoRA) -> TRL's GRPOTrainer with sftflow's `Resilience` (atomic
checkpoints, resume, NaN/OOM/SIGTERM handling, tokens/s logs) -> train/eval -> report (with the reward curve).

Each step samples `num_generations` completions of every prompt, scores them with the weighted
`reward_funcs`, and moves the policy towards the completions that beat their group's mean reward (TRL's
GRPO/DAPO/Dr. GRPO losses, `loss_type`). With `beta` 0 (the default) no reference model is used; with
beta > 0 and LoRA the reference is the base with the adapter disabled, otherwise a frozen copy of the
starting model. Completions stop at the template's end-of-turn tokens.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from trl import GRPOConfig, GRPOTrainer

from sftflow.data.encode import stop_token_ids
from sftflow.data.thinking import DEFAULT_CLOSE, DEFAULT_OPEN, resolve_thinking
from sftflow.model.adapter import method_callbacks
from sftflow.model.loader import load_chat_tokenizer
from sftflow.tools.report import write_report
from sftflow.train.callbacks import JsonlLogCallback
from sftflow.train.optim import build_optimizer
from sftflow.train.rewards import CheckedReward, RewardSpreadCallback, load_rewards
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

# sampling keys of `generating` that grpo takes only where the user set them (else TRL's defaults)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


@owns_output_dir
def run_grpo(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the grpo recipe described by `args` and write everything under `output_dir`.

    Metrics (TRL's): loss, reward (the weighted sum) and reward_std, rewards/<function>/mean and /std,
    frac_reward_zero_std (the share of groups whose completions all scored the same: they teach nothing),
    completions/mean_length, /max_length, /clipped_ratio (cut at max_completion_length), kl (beta > 0),
    clip_ratio/* and entropy.
    """
    training, finetuning = args.training, args.finetuning
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template; the reward functions, imported and checked before the model loads.
    tokenizer = load_chat_tokenizer(args.model, args.data)
    thinking = resolve_thinking(tokenizer, args.data.enable_thinking, args.data.preserve_thinking)
    words = (thinking.open, thinking.close) if thinking else (DEFAULT_OPEN, DEFAULT_CLOSE)
    rewards = load_rewards(
        finetuning.reward_funcs or [], finetuning.reward_kwargs, finetuning.max_completion_length, words
    )

    # 2. Prompts: load, hold out eval prompts, render with the template (in the thinking mode).
    prepared = prepare_data(args, tokenizer)
    train_set = prepared.train if prepared.train is not None else prepared.eval  # TRL needs one

    # 3. Policy model with LoRA / freeze / full tuning; completions end at the template's end-of-turn tokens.
    model = build_model(args, tokenizer)
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer))

    # 4. Trainer.
    trainer = grpo_trainer(
        args,
        model,
        tokenizer,
        rewards,
        grpo_rows(train_set),
        grpo_rows(prepared.eval) if prepared.eval is not None else None,
        [
            JsonlLogCallback(output_dir),
            RewardSpreadCallback(),
            *method_callbacks(finetuning, output_dir),
            *(callbacks or []),
        ],
    )
    result = RunResult(output_dir)

    # 5. Train and save; 6. rewards of completions sampled for the held-out prompts.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result)
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=False)

    # 7. report.html (with the reward curve) and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result


def grpo_rows(prompts: Dataset) -> Any:
    """TRL's rows from the grpo form: `prompt` (the rendered text) and each extra column by its own name
    (rows without it get None).

    >>> from datasets import Dataset
    >>> grpo_rows(Dataset.from_list([{"prompt": "Q1", "extra": '{"answer": "4"}'}, {"prompt": "Q2", "extra": "{}"}]))[1]
    {'prompt': 'Q2', 'answer': None}
    """
    from datasets import Dataset

    extras = [json.loads(text) for text in prompts["extra"]]
    names = list(dict.fromkeys(key for extra in extras for key in extra if key != "prompt"))
    rows = [
        {"prompt": prompt, **{name: extra.get(name) for name in names}}
        for prompt, extra in zip(prompts["prompt"], extras, strict=True)
    ]
    return Dataset.from_list(rows)


class SftflowGRPOTrainer(Resilience, GRPOTrainer):
    """GRPOTrainer with `Resilience` that samples from sftflow's rendered prompts: they are tokenized
    without added special tokens (the template wrote them), as sft's predict does."""

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict]:
        ids = [self._tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
        return ids, None, {}


def grpo_config(args: RunArgs) -> GRPOConfig:
    """TRL's GRPOConfig from the run's keys: the training keys, the grpo keys under TRL's names, and the
    sampling keys (temperature, top_p, top_k, repetition_penalty) where the user set them."""
    finetuning, generating = args.finetuning, args.generating
    sampling = {
        key: getattr(generating, key) if key in args.user_keys else default
        for key, default in SAMPLING_DEFAULTS.items()
    }
    return trl_args(
        GRPOConfig,
        args.training,
        num_generations=finetuning.num_generations,
        max_completion_length=finetuning.max_completion_length,
        beta=finetuning.beta,
        epsilon=finetuning.epsilon,
        epsilon_high=finetuning.epsilon_high,
        loss_type=finetuning.loss_type,
        scale_rewards=finetuning.scale_rewards,
        importance_sampling_level=finetuning.importance_sampling_level,
        mask_truncated_completions=finetuning.mask_truncated_completions,
        num_iterations=finetuning.num_iterations,
        reward_weights=finetuning.reward_weights,
        remove_unused_columns=False,  # the extra columns go to the rewards
        include_num_input_tokens_seen="no",  # batches hold prompt/completion ids, counted by Resilience
        **sampling,
    )


def grpo_trainer(
    args: RunArgs,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rewards: list[CheckedReward],
    train_set: Dataset,
    eval_set: Dataset | None,
    callbacks: list[Any],
) -> SftflowGRPOTrainer:
    """TRL's GRPOTrainer on sftflow's prompts and rewards, with the memory-wise reference (beta > 0 under
    LoRA: the base with the adapter disabled, as in dpo)."""
    config = grpo_config(args)
    trainer = SftflowGRPOTrainer(
        model=model,
        reward_funcs=list(rewards),
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_optimizer(model, args.finetuning, config), None),  # None: the Trainer's own
        skip_nan=args.finetuning.skip_nan,
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(peft_model, "peft_config", {}):
        # TRL copies a loaded adapter as the reference; sftflow's reference is the base, adapter disabled
        peft_model.delete_adapter("ref")
    return trainer
