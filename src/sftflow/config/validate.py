"""Per-stage rules: settings a stage cannot honour are refused before anything loads, with the reason."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sftflow.config.methods import check_methods
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from sftflow.config.args import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments


def check_stage(
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    training: Seq2SeqTrainingArguments,
) -> None:
    """Refuse what the configured stage does not support.

    Raises:
        SftflowError: pt or dpo with do_predict; rm or dpo with streaming or packing; rm with LoRA and a
            setting that needs a causal-LM adapter.
    """
    stage = finetuning.stage
    if stage == "pt" and training.do_predict:
        raise SftflowError(
            "stage: pt has nothing to predict (plain text has no prompts and answers). Set do_predict: false; "
            "do_eval reports the held-out loss and perplexity."
        )
    if stage == "dpo" and training.do_predict:
        raise SftflowError(
            "stage: dpo does not predict; set do_predict: false (do_eval reports the preference metrics on the "
            "held-out pairs; `sftflow predict` answers prompts with the tuned adapter)."
        )
    if stage == "grpo" and training.do_predict:
        raise SftflowError(
            "stage: grpo does not predict; set do_predict: false (`sftflow predict` answers prompts with the tuned "
            "adapter; do_eval samples completions of the held-out prompts and reports their rewards)."
        )
    if stage in ("rm", "dpo"):
        check_pairwise(model, data, finetuning)
    check_methods(model, data, finetuning, training)  # per-method rules (config/methods.py)


def check_pairwise(model: ModelArguments, data: DataArguments, finetuning: FinetuningArguments) -> None:
    """The pairwise stages (rm, dpo) read whole pairs into memory; rm's LoRA is a SEQ_CLS adapter.

    Raises:
        SftflowError: streaming, packing, or (rm) a LoRA setting that needs a causal-LM adapter.
    """
    stage = finetuning.stage
    if data.streaming:
        raise SftflowError(f"stage: {stage} reads the pairs into memory; set streaming: false.")
    if data.packing:
        raise SftflowError(f"stage: {stage} scores whole pairs; packing does not apply. Set packing: false.")
    if stage == "rm" and finetuning.finetuning_type == "lora":
        unsupported = {
            "adapter_name_or_path": model.adapter_name_or_path,
            "quantization_bit": model.quantization_bit,
            "new_special_tokens": model.new_special_tokens,
        }
        given = [key for key, value in unsupported.items() if value]
        if given:
            raise SftflowError(
                f"stage: rm with LoRA does not support {', '.join(given)} yet (the reward adapter is a PEFT "
                "SEQ_CLS adapter built here, not the causal-LM one). Remove it, or use finetuning_type: full/freeze."
            )


def check_training(training: Seq2SeqTrainingArguments) -> None:
    """Range checks on HF training keys that transformers only trips over later (deep inside torch, or
    when the Trainer is built after the model loaded), so they fail here, before anything loads.

    Raises:
        SftflowError: naming the key and the fix.
    """
    at_least_one = (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    )
    for key in at_least_one:
        if getattr(training, key) < 1:
            raise SftflowError(f"{key} must be >= 1, got {getattr(training, key)}.")
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
        if getattr(training, key) < 0:
            raise SftflowError(f"{key} must be >= 0, got {getattr(training, key)}.")
    if training.max_steps < -1 or training.max_steps == 0:
        raise SftflowError(
            f"max_steps must be a positive number of steps or -1 (use num_train_epochs), got {training.max_steps}."
        )
    if training.max_steps == -1 and training.num_train_epochs <= 0:
        raise SftflowError(
            f"num_train_epochs must be > 0 (or set max_steps), got {training.num_train_epochs}."
        )
    check_report_to(training.report_to)
    check_optimizer(training)
    check_scheduler(training)
    check_fsdp(training)


def check_fsdp(training: Seq2SeqTrainingArguments) -> None:
    """FSDP through the HF Trainer needs CUDA GPUs and a distributed launch; on CPU it cannot shard (with
    use_cpu it would silently run plain DDP), so it is refused rather than run as something else.

    Raises:
        SftflowError: fsdp is set on CPU, or in a single process.
    """
    if not training.fsdp:
        return
    import torch

    if training.use_cpu or not torch.cuda.is_available():
        raise SftflowError(
            "fsdp needs CUDA GPUs: on CPU the HF Trainer cannot shard the model (with use_cpu it would run plain "
            "DDP instead). Drop fsdp and fsdp_config for a CPU run (torchrun with use_cpu: true is data parallel, "
            "see examples/torchrun_cpu_sft.yaml), or run examples/fsdp_sft.yaml on GPUs."
        )
    if int(os.environ.get("WORLD_SIZE") or 1) < 2:
        raise SftflowError(
            "fsdp shards over several processes: launch with torchrun --nproc_per_node N -m sftflow.cli train "
            "CONFIG (or accelerate launch), see examples/fsdp_sft.yaml."
        )


def check_optimizer(training: Seq2SeqTrainingArguments) -> None:
    """An optim other than torch's AdamW must be usable here (its package installed, its settings given):
    the Trainer would find out only after the model has loaded.

    Raises:
        SftflowError: naming optim and what is missing.
    """
    name = getattr(training.optim, "value", training.optim)
    if name in ("adamw_torch_fused", "adamw_torch"):
        return
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(training)
    except (ImportError, ValueError) as exc:
        raise SftflowError(f"optim: {name} cannot be used here: {exc}") from None
    except Exception:  # noqa: BLE001 - needs the model (GaLore/APOLLO layer lists): checked when it is built
        return


def check_scheduler(training: Seq2SeqTrainingArguments) -> None:
    """lr_scheduler_kwargs must be arguments of the chosen schedule (transformers passes them on only when
    the scheduler is built, after the model has loaded).

    Raises:
        SftflowError: naming the unknown kwargs and the ones the schedule takes.
    """
    kwargs = training.lr_scheduler_kwargs
    if not kwargs or not isinstance(kwargs, dict):
        return
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(training.lr_scheduler_type)]
    taken = [
        p
        for p in inspect.signature(function).parameters
        if p not in ("optimizer", "num_warmup_steps", "num_training_steps")
    ]
    unknown = sorted(set(kwargs) - set(taken))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values()):
        name = getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)
        raise SftflowError(
            f"lr_scheduler_kwargs: {', '.join(unknown)} not taken by lr_scheduler_type: {name} "
            f"(it takes {', '.join(taken) or 'none'})."
        )


def check_report_to(report_to: list[str] | None) -> None:
    """Each tracker of report_to must be one transformers knows and installed (the Trainer would fail on it
    only after the model has loaded).

    Raises:
        SftflowError: an unknown or missing tracker.
    """
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    for name in report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise SftflowError(
                f"report_to: {name!r} is not a tracker transformers knows; use none, all or one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}."
            )
        if name not in installed:
            raise SftflowError(
                f"report_to: {name} is not installed (pip install {name}), or set report_to: none."
            )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: low/high bounds (None = unbounded), open = bound excluded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nonzero: bool = False
    hint: str = ""  # what the values mean, added to the message

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return not (self.nonzero and value == 0)

    def describe(self) -> str:
        """`in [0, 1)`, `>= 1`, `> 0`, `a non-zero number`."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}" + (
                " and not 0" if self.nonzero else ""
            )
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "a non-zero number" if self.nonzero else "a number"


POSITIVE, AT_LEAST_ONE, NON_NEGATIVE = Range(0, low_open=True), Range(1), Range(0)
FRACTION, PROBABILITY = Range(0, 1, high_open=True), Range(0, 1, low_open=True)
SEED = Range(0, 2**32 - 1)  # numpy's seed range (set_seed)

# Every numeric key of `sftflow train --help`, with the values it accepts (tests/test_config_sweep.py checks
# that none is missing). Checked before anything loads: torch, PEFT and the Trainer would refuse most of
# these only after the model has loaded, or not at all.
# Keys of models that see (docs/images.md): sft only; on a text model they are refused when it loads.
IMAGE_KEYS = (
    "image_max_pixels",
    "image_min_pixels",
    "freeze_vision_tower",
    "freeze_multi_modal_projector",
    "freeze_language_model",
)

RANGES: dict[str, Range] = {
    # model
    "quantization_bit": Range(4, 8),
    "export_size": POSITIVE,
    "image_max_pixels": AT_LEAST_ONE,
    "image_min_pixels": AT_LEAST_ONE,
    # data
    "cutoff_len": Range(8),
    "max_samples": AT_LEAST_ONE,
    "val_size": NON_NEGATIVE,
    "preview_rows": NON_NEGATIVE,
    "preprocessing_num_workers": AT_LEAST_ONE,
    "buffer_size": AT_LEAST_ONE,
    # finetuning
    "lora_rank": AT_LEAST_ONE,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "freeze_trainable_layers": Range(nonzero=True, hint="the last n layers, or the first n with -n"),
    "pref_beta": POSITIVE,
    "pref_ftx": NON_NEGATIVE,
    "simpo_gamma": NON_NEGATIVE,
    "kto_chosen_weight": NON_NEGATIVE,
    "kto_rejected_weight": NON_NEGATIVE,
    "num_generations": Range(2, hint="completions per prompt; a group needs 2+ to compare"),
    "max_completion_length": AT_LEAST_ONE,
    "beta": NON_NEGATIVE,
    "epsilon": POSITIVE,
    "epsilon_high": POSITIVE,
    "num_iterations": AT_LEAST_ONE,
    "loraplus_lr_ratio": POSITIVE,
    "loraplus_lr_embedding": NON_NEGATIVE,
    "pissa_iter": Range(-1, hint="-1 = exact SVD"),
    "oft_rank": NON_NEGATIVE,
    "oft_block_size": NON_NEGATIVE,
    "module_dropout": FRACTION,
    "galore_rank": AT_LEAST_ONE,
    "galore_update_interval": AT_LEAST_ONE,
    "galore_scale": POSITIVE,
    "apollo_rank": AT_LEAST_ONE,
    "apollo_update_interval": AT_LEAST_ONE,
    "apollo_scale": POSITIVE,
    "badam_start_block": NON_NEGATIVE,
    "badam_switch_interval": AT_LEAST_ONE,
    "badam_update_ratio": PROBABILITY,
    "badam_verbose": NON_NEGATIVE,
    # generating
    "temperature": POSITIVE,
    "top_p": PROBABILITY,
    "top_k": NON_NEGATIVE,
    "num_beams": AT_LEAST_ONE,
    "max_new_tokens": AT_LEAST_ONE,
    "repetition_penalty": POSITIVE,
    "serve_max_queue": AT_LEAST_ONE,
    "serve_max_batch_tokens": AT_LEAST_ONE,
    "serve_max_body_bytes": AT_LEAST_ONE,
    "serve_memory_fraction": Range(0, 1, low_open=True, high_open=True),
    # training (HF)
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "num_train_epochs": NON_NEGATIVE,
    "max_steps": Range(-1, nonzero=True, hint="a positive number of steps, or -1 to use num_train_epochs"),
    "learning_rate": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": POSITIVE,
    "torch_empty_cache_steps": AT_LEAST_ONE,
    "logging_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "eval_delay": NON_NEGATIVE,
    "eval_accumulation_steps": AT_LEAST_ONE,
    "save_steps": POSITIVE,
    "save_total_limit": AT_LEAST_ONE,
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_ONE,
    "ddp_bucket_cap_mb": AT_LEAST_ONE,
    "ddp_timeout": AT_LEAST_ONE,
    "local_rank": Range(-1),
    "generation_max_length": AT_LEAST_ONE,
    "generation_num_beams": AT_LEAST_ONE,
}


def check_ranges(*groups: Any) -> None:
    """Each RANGES key that one of `groups` holds (and is set) must lie in its range.

    Raises:
        SftflowError: `KEY must be <range>, got <value>.`
    """
    for key, allowed in RANGES.items():
        for group in groups:
            value = getattr(group, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value not in allowed:
                    hint = f" ({allowed.hint})" if allowed.hint else ""
                    raise SftflowError(f"{key} must be {allowed.describe()}{hint}, got {_num(value)}.")
                break


LORA_KEYS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_dora",
    "use_rslora",
    "additional_target",
    "create_new_adapter",
    "compare_base",
)
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
DPO_KEYS = ("pref_beta", "pref_loss", "pref_ftx")
GRPO_KEYS = (
    "reward_funcs",
    "reward_weights",
    "reward_kwargs",
    "num_generations",
    "max_completion_length",
    "beta",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "scale_rewards",
    "importance_sampling_level",
    "mask_truncated_completions",
    "num_iterations",
)
HUB_KEYS = ("hub_model_id", "hub_strategy", "hub_private_repo", "hub_revision", "hub_always_push")


def no_effect(
    key: str,
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    generating: GeneratingArguments,
    training: Seq2SeqTrainingArguments,
) -> str | None:
    """Why `key`, set by the user, would change nothing in this run (None when it takes effect).

    Generation keys are kept in a training config: they are saved with the run and used by chat, api and
    predict (temperature/top_p/top_k are also the server's defaults for requests that ask to sample, so
    they count without do_sample). `export_*` keys are read by `sftflow export`.
    """
    stage, tuning = finetuning.stage, finetuning.finetuning_type
    if key in LORA_KEYS and tuning != "lora":
        return f"{key} applies to finetuning_type: lora only (this run uses {tuning})"
    if key in FREEZE_KEYS and tuning != "freeze" and not getattr(finetuning, "use_llama_pro", False):
        return f"{key} applies to finetuning_type: freeze only (this run uses {tuning})"
    if key in DPO_KEYS and stage not in ("dpo", "kto"):
        return f"{key} applies to stage: dpo only (this run is stage: {stage})"
    if key in GRPO_KEYS and stage != "grpo":
        return f"{key} applies to stage: grpo only (this run is stage: {stage})"
    if key in ("quantization_type", "double_quantization") and model.quantization_bit != 4:
        return f"{key} applies to quantization_bit: 4 only"
    if key == "buffer_size" and not data.streaming:
        return "buffer_size applies to streaming: true only (in-memory data is shuffled whole)"
    if key in ("tokenized_cache_dir", "overwrite_cache") and data.streaming:
        return f"{key} does not apply with streaming: true (a stream is tokenized on the fly, not cached)"
    if key == "template_file" and not data.template:
        return "template_file needs template: the name of one of its templates"
    if key in IMAGE_KEYS and stage != "sft":
        return f"{key} applies to stage: sft only (models that see train in sft; this run is stage: {stage})"
    if key in ("mask_history", "train_on_prompt") and stage != "sft":
        return f"{key} applies to stage: sft only (this run is stage: {stage})"
    if key == "preserve_thinking" and stage == "sft" and not data.mask_history:
        return "preserve_thinking applies with mask_history: true (without it every answer keeps its thought)"
    if key in ("enable_thinking", "preserve_thinking") and stage == "pt":
        return f"{key} applies to conversations (stage: pt trains plain text)"
    if key in ("save_total_limit", "save_only_model", "save_on_each_node") and training.save_strategy == "no":
        return f"{key} applies only when checkpoints are saved; set save_steps or save_strategy"
    if key == "eval_steps" and training.eval_strategy != "steps":
        return "eval_steps applies to eval_strategy: steps only"
    if key == "label_smoothing_factor" and finetuning.fast_loss and stage in ("sft", "pt"):
        return "label_smoothing_factor needs fast_loss: false (sftflow's fast loss has no label smoothing)"
    if key in ("eval_delay", "eval_on_start") and training.eval_strategy == "no":
        return f"{key} applies only when evaluating during training; set eval_strategy (or eval_steps)"
    if key in HUB_KEYS and not training.push_to_hub:
        return f"{key} applies with push_to_hub: true only (sftflow export uploads with export_hub_model_id)"
    if key == "dataloader_persistent_workers" and training.dataloader_num_workers == 0:
        return "dataloader_persistent_workers needs dataloader_num_workers > 0"
    if key == "predict_with_generate" and stage != "sft":
        return f"predict_with_generate applies to stage: sft only (stage {stage} does not generate)"
    if key == "max_grad_norm" and any(
        getattr(finetuning, f"use_{m}") and getattr(finetuning, f"{m}_layerwise")
        for m in ("galore", "apollo")
    ):
        return "galore_layerwise/apollo_layerwise step each weight in its backward hook, so no whole-model gradient is left to clip"
    if key == "generation_max_length":
        return "sftflow's predict generates max_new_tokens per answer; set max_new_tokens"
    return None


def _is_default(key: str, *groups: Any) -> bool:
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name == key:
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    return False
                value = getattr(group, key)
                return value == default or getattr(value, "value", value) == getattr(
                    default, "value", default
                )
    return False


def check_effect(
    user_keys: dict[str, Any],
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    generating: GeneratingArguments,
    training: Seq2SeqTrainingArguments,
) -> None:
    """Refuse the keys the user set, to another value than the default, that would change nothing in this
    run (no key is silently ignored).

    Raises:
        SftflowError: one line per such key, with the reason.
    """
    problems = []
    for key in user_keys:
        if _is_default(key, model, data, finetuning, generating, training):
            continue  # spelling out the default changes nothing either way
        reason = no_effect(key, model, data, finetuning, generating, training)
        if reason:
            problems.append(f"{key} has no effect here: {reason}.")
    if problems:
        raise SftflowError("\n".join(problems))
