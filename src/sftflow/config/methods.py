"""Per-method rules: a tuning method (LLaMA-Factory's key names) that cannot run with the rest of the
config is refused before anything loads, naming the key, the reason and what to set instead.

The methods themselves live where they act: optimizers in train/optim.py, adapters in model/adapter.py,
the DFT loss in train/loss.py, KTO in stages/kto.py, SimPO in train/preference.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from sftflow.config.args import DataArguments, FinetuningArguments, ModelArguments

# the optimizer-side methods: key -> (import name, pip package, tuning types it works with)
OPTIMIZER_METHODS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "loraplus_lr_ratio": (None, None, ("lora",)),
    "use_muon": (None, None, ("lora", "oft", "full", "freeze")),
    "use_galore": ("galore_torch", "galore-torch", ("full", "freeze")),
    "use_apollo": ("apollo_torch", "apollo-torch", ("full", "freeze")),
    "use_badam": ("badam", "badam", ("full",)),
    "use_adam_mini": ("adam_mini", "adam-mini", ("full", "freeze", "lora")),
}

HQQ = (
    "quantization_method: hqq is refused: transformers 5.24's HqqConfig raises NotImplementedError, and "
    "sftflow does not patch hqq into the model itself. Use quantization_method: bnb with quantization_bit: 4 "
    "(QLoRA) or 8."
)


NEFTUNE_FAST_LOSS = (
    "neftune_noise_alpha with fast_loss: true is refused: NEFTune's noise is alpha / sqrt(L * d) with L the "
    "row length, and the fast loss runs the whole batch as one padding-free row, so every example would get "
    "noise sqrt(batch) times weaker than NEFTune defines. Set fast_loss: false (the padded batch, as in "
    "LLaMA-Factory and the HF Trainer)."
)


def _chosen_optimizer_methods(finetuning: FinetuningArguments) -> list[str]:
    return [
        key
        for key in OPTIMIZER_METHODS
        if (
            finetuning.loraplus_lr_ratio is not None
            if key == "loraplus_lr_ratio"
            else getattr(finetuning, key)
        )
    ]


def check_methods(
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    training: Seq2SeqTrainingArguments,
) -> None:
    """Refuse a method that does not fit the stage, the tuning type or the other keys, or whose package is
    not installed.

    Raises:
        SftflowError: naming the key, the reason and the fix.
    """
    stage, kind = finetuning.stage, finetuning.finetuning_type
    if model.quantization_method == "hqq":
        raise SftflowError(HQQ)
    chosen = _chosen_optimizer_methods(finetuning)
    if len(chosen) > 1:
        raise SftflowError(f"{' and '.join(chosen)} each build the optimizer; set only one of them.")
    for key in chosen:
        module, package, kinds = OPTIMIZER_METHODS[key]
        if kind not in kinds:
            raise SftflowError(f"{key} works with finetuning_type: {' or '.join(kinds)}, not {kind}.")
        if module and importlib.util.find_spec(module) is None:
            raise SftflowError(
                f"{key} needs the {package} package: pip install {package} (or 'sftflow[methods]')."
            )
    if finetuning.loraplus_lr_ratio is not None and finetuning.loraplus_lr_ratio <= 0:
        raise SftflowError(
            f"loraplus_lr_ratio must be > 0 (16 in the LoRA+ paper), got {finetuning.loraplus_lr_ratio}."
        )
    for name in ("galore", "apollo"):
        if (
            getattr(finetuning, f"use_{name}")
            and getattr(finetuning, f"{name}_layerwise")
            and training.gradient_accumulation_steps != 1
        ):
            raise SftflowError(
                f"{name}_layerwise updates each weight in backward, once per micro-batch, so it cannot accumulate "
                f"gradients (LLaMA-Factory refuses it too): set gradient_accumulation_steps: 1 (got "
                f"{training.gradient_accumulation_steps}) and raise per_device_train_batch_size instead."
            )
    if (chosen or training.neftune_noise_alpha is not None) and (training.deepspeed or training.fsdp):
        raise SftflowError(
            f"{(chosen or ['neftune_noise_alpha'])[0]} is not supported with DeepSpeed/FSDP in sftflow (they build or "
            "shard the optimizer themselves); remove deepspeed/fsdp or the method."
        )
    if finetuning.pissa_init:
        if kind != "lora":
            raise SftflowError(
                f"pissa_init initialises a LoRA adapter: needs finetuning_type: lora, not {kind}."
            )
        if model.quantization_bit is not None or model.adapter_name_or_path:
            raise SftflowError(
                "pissa_init rewrites the base weights into their residual: it needs an unquantized base and a new "
                "adapter (remove quantization_bit / adapter_name_or_path)."
            )
        if finetuning.pissa_iter != -1 and not finetuning.pissa_convert:
            raise SftflowError(
                f"pissa_init with pissa_iter: {finetuning.pissa_iter} (randomised SVD) needs pissa_convert: true: "
                "the adapter in output_dir is relative to a residual base that PEFT recomputes when it loads it, "
                "which only reproduces with an exact SVD. Set pissa_convert: true (pissa_converted/ is a plain LoRA "
                "for the original base) or pissa_iter: -1."
            )
    if kind == "oft" and stage not in ("sft", "pt"):
        raise SftflowError(
            f"finetuning_type: oft runs with stage: sft or pt, not {stage}; use lora for {stage}."
        )
    if kind == "oft" and (
        model.quantization_bit is not None or model.adapter_name_or_path or model.new_special_tokens
    ):
        raise SftflowError(
            "finetuning_type: oft builds a new adapter on an unquantized base and trains no embedding rows; remove "
            "quantization_bit / adapter_name_or_path / new_special_tokens (or use finetuning_type: lora)."
        )
    if finetuning.use_llama_pro and kind not in ("freeze", "lora"):
        raise SftflowError(
            f"use_llama_pro trains the expanded blocks with finetuning_type: freeze or lora, not {kind}."
        )
    if training.neftune_noise_alpha is not None:
        if stage not in ("sft", "pt"):
            raise SftflowError(f"neftune_noise_alpha applies to stage: sft or pt, not {stage}.")
        if finetuning.fast_loss:
            raise SftflowError(NEFTUNE_FAST_LOSS)
    if finetuning.use_dft_loss:
        if stage != "sft":
            raise SftflowError(f"use_dft_loss is an sft loss; stage {stage} has its own loss.")
        if not finetuning.fast_loss:
            raise SftflowError("use_dft_loss is computed by sftflow's fused loss: set fast_loss: true.")
    if finetuning.pref_loss == "simpo" and stage != "dpo":
        raise SftflowError(f"pref_loss: simpo runs in stage: dpo, not {stage}.")
    if finetuning.simpo_gamma < 0:
        raise SftflowError(f"simpo_gamma must be >= 0, got {finetuning.simpo_gamma}.")
    if stage == "kto":
        check_kto(data, finetuning, training)
    if stage == "grpo":
        check_grpo(data, finetuning, training)


def check_kto(
    data: DataArguments, finetuning: FinetuningArguments, training: Seq2SeqTrainingArguments
) -> None:
    """KTO's reference KL term comes from mismatched answers (stages/kto.py pairs them, also at batch size 1).

    Raises:
        SftflowError: streaming, packing, predict, train_on_prompt or a negative weight.
    """
    if data.train_on_prompt:
        raise SftflowError("stage: kto scores the last answer only; set train_on_prompt: false.")
    if data.streaming or data.packing:
        raise SftflowError(
            "stage: kto reads whole tagged examples into memory; set streaming: false and packing: false."
        )
    if training.do_predict:
        raise SftflowError(
            "stage: kto does not predict; set do_predict: false (`sftflow predict` answers prompts)."
        )
    if min(finetuning.kto_chosen_weight, finetuning.kto_rejected_weight) <= 0:
        raise SftflowError("kto_chosen_weight and kto_rejected_weight must be > 0.")


# grpo's built-in rewards (train/rewards.py) -> the reward_kwargs each reads
REWARD_BUILTINS: dict[str, tuple[str, ...]] = {
    "answer_match": ("answer_column",),
    "normalized_match": ("answer_column",),
    "regex_match": ("regex",),
    "think_format": ("think_open", "think_close"),
    "overlong_penalty": ("overlong_buffer",),
    "length_target": ("target_words", "max_words", "min_words"),
}


def reward_kwarg_problems(reward_funcs: list[str], reward_kwargs: dict[str, Any]) -> list[str]:
    """What is wrong with `reward_kwargs` for these reward functions: unknown keys, keys no listed
    built-in reads, a regex_match without a valid regex.

    >>> reward_kwarg_problems(["length_target"], {"regex": "a"})
    ['reward_kwargs.regex is read by regex_match, which reward_funcs does not list']
    """
    import re

    readers: dict[str, list[str]] = {}
    for name, keys in REWARD_BUILTINS.items():
        for key in keys:
            readers.setdefault(key, []).append(name)
    problems = []
    for key in reward_kwargs:
        if key not in readers:
            problems.append(
                f"reward_kwargs.{key} is not a setting of a built-in reward (known: {', '.join(readers)})"
            )
        elif not set(readers[key]) & set(reward_funcs):
            problems.append(
                f"reward_kwargs.{key} is read by {' or '.join(readers[key])}, which reward_funcs does not list"
            )
    if "regex_match" in reward_funcs:
        pattern = reward_kwargs.get("regex")
        if not isinstance(pattern, str) or not pattern:
            problems.append(
                'regex_match needs reward_kwargs.regex, the pattern a completion must contain (e.g. "^[0-9]+$")'
            )
        else:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"reward_kwargs.regex {pattern!r} is not a valid regular expression: {exc}")
    return problems


def reward_name_problem(name: str) -> str | None:
    """Why a reward_funcs entry cannot name a function (None when it can): a built-in, `module:function`
    or `path/to/file.py:function` (the file must exist).

    >>> reward_name_problem("answer_match") is None, reward_name_problem("exact")
    (True, "reward_funcs: 'exact' is not a built-in reward (answer_match, normalized_match, regex_match, think_format, overlong_penalty, length_target); name your own as module:function or path/to/file.py:function")
    """
    if name in REWARD_BUILTINS:
        return None
    module, sep, function = name.rpartition(":")
    if not sep:
        return (
            f"reward_funcs: {name!r} is not a built-in reward ({', '.join(REWARD_BUILTINS)}); name your own as "
            "module:function or path/to/file.py:function"
        )
    if not module or not function.isidentifier():
        return f"reward_funcs: {name!r} must be module:function or path/to/file.py:function"
    if module.endswith(".py") and not Path(module).is_file():
        return f"reward_funcs: {name!r}: file {module} not found (relative to the working dir {Path.cwd()})"
    return None


def check_grpo(
    data: DataArguments, finetuning: FinetuningArguments, training: Seq2SeqTrainingArguments
) -> None:
    """GRPO compares num_generations completions of each prompt, so a batch holds whole groups; rewards
    must be nameable and weighted one to one.

    Raises:
        SftflowError: naming the key and the fix.
    """
    funcs = finetuning.reward_funcs or []
    if training.do_train and not funcs:
        raise SftflowError(
            "stage: grpo needs reward_funcs, the functions that score each completion (e.g. reward_funcs: "
            "answer_match, or my_rewards.py:score); see docs/stages.md."
        )
    problems = [problem for name in funcs if (problem := reward_name_problem(name))]
    if len(set(funcs)) != len(funcs):
        problems.append(
            f"reward_funcs lists a function twice: {funcs}; weight it with reward_weights instead"
        )
    weights = finetuning.reward_weights
    if weights is not None and len(weights) != len(funcs):
        problems.append(
            f"reward_weights has {len(weights)} values for {len(funcs)} reward_funcs; give one weight per function"
        )
    problems += reward_kwarg_problems(funcs, finetuning.reward_kwargs or {})
    if problems:
        raise SftflowError("\n".join(problems))
    g = finetuning.num_generations
    processes = max(1, training.world_size)
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * processes
    if training.do_train and batch % g:
        raise SftflowError(
            f"stage: grpo needs the global batch (per_device_train_batch_size {training.per_device_train_batch_size} "
            f"x gradient_accumulation_steps {training.gradient_accumulation_steps} x {processes} processes = {batch}) "
            f"to be a multiple of num_generations ({g}): each prompt's completions are compared within one batch. "
            f"Set per_device_train_batch_size: {g} (or a multiple), or num_generations to a divisor of {batch}."
        )
    eval_batch = training.per_device_eval_batch_size * processes
    if training.do_eval and eval_batch % g:
        raise SftflowError(
            f"stage: grpo evaluates whole groups: per_device_eval_batch_size x processes ({eval_batch}) must be a "
            f"multiple of num_generations ({g}); set per_device_eval_batch_size: {g}."
        )
    if finetuning.epsilon_high is not None and finetuning.epsilon_high < finetuning.epsilon:
        raise SftflowError(
            f"epsilon_high ({finetuning.epsilon_high}) must be >= epsilon ({finetuning.epsilon}): it is the upper "
            "clipping range (DAPO's clip-higher)."
        )
    if data.streaming or data.packing:
        raise SftflowError(
            "stage: grpo reads its prompts into memory and generates from each one; set streaming: false and "
            "packing: false."
        )


# stages LLaMA-Factory has and sftflow does not: the reason, for `check_stage_name`
OUT_OF_SCOPE_STAGES = {
    "ppo": (
        "stage: ppo is out of scope: PPO generates answers in the training loop and scores them with a separate "
        "reward model and value head (TRL's experimental PPOTrainer). Train a reward model with stage: rm, or "
        "tune on preference data with stage: dpo (pref_loss: sigmoid/ipo/hinge/orpo/simpo) or stage: kto."
    ),
}


def check_stage_name(stage: Any) -> None:
    """Refuse a LLaMA-Factory stage that sftflow leaves out, with the reason (before the value is coerced).

    Raises:
        SftflowError: stage is ppo.
    """
    if isinstance(stage, str) and stage.strip().lower() in OUT_OF_SCOPE_STAGES:
        raise SftflowError(OUT_OF_SCOPE_STAGES[stage.strip().lower()])
