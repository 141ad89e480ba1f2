"""The steps every stage recipe shares (`sftflow.stages`): start a run, prepare its data, build the model,
train and save, evaluate, record metrics, print the summary, and build TRL configs from the run's keys."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sftflow.config.run_lock import check_job_owner, check_writable_dir, claim, holds, is_lock_file, release
from sftflow.data.audit import write_stats
from sftflow.data.inspect import log_examples
from sftflow.data.prepare import Prepared, prepare, shuffled
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import head_name, load_model
from sftflow.train.checkpoints import resolve_resume, resume_word
from sftflow.train.distributed import data_step_first
from sftflow.train.final_save import (
    COMPLETION_MARKER,
    publish,
    remove_final_staging,
    save_metrics_atomically,
    staged,
    staging_dir,
    weights_bytes,
    write_metrics,
)
from sftflow.train.plotting import plot_losses

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Seq2SeqTrainingArguments, Trainer

    from sftflow.config.parser import RunArgs
    from sftflow.data.vision import Vision

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced, for the summary and for callers (tests, later stages)."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    sample: dict[str, str] | None = None  # one held-out question with tuned and base answers
    report: Path | None = None  # report.html


def owns_output_dir(recipe: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """A stage recipe that gives its claim on output_dir back when it returns or raises (`start_run` takes
    it; a process that dies loses it anyway), unless the caller held the dir before."""

    @functools.wraps(recipe)
    def run(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
        held_before = holds(args.training.output_dir)
        try:
            return recipe(args, callbacks=callbacks)
        finally:
            if not held_before:
                release(args.training.output_dir)

    return run


def start_run(args: RunArgs) -> tuple[Path, str | None]:
    """The first step of every stage: prepare output_dir, settle (or refuse) the checkpoint to resume from
    before anything heavy loads, warn about a single-process multi-GPU launch, and set the seed (before the
    model is built: LoRA and reward-head inits draw from it). Returns output_dir and the checkpoint."""
    import torch
    from transformers import set_seed

    from sftflow.train.trainer import check_launch, launch_advice

    training = args.training
    output_dir = check_writable_dir(training.output_dir, "output_dir")
    check_launch(os.environ, training.world_size)  # before any rank touches output_dir
    with training.main_process_first(desc="claiming output_dir"):
        claim_output_dir(output_dir, training.process_index)
        prepare_output_dir(output_dir, args)
    resume = resolve_resume(output_dir, training.resume_from_checkpoint) if training.do_train else None
    if advice := launch_advice(torch.cuda.device_count(), os.environ):
        logger.warning(advice)
    set_seed(training.seed)
    return output_dir, resume


def claim_output_dir(output_dir: Path, process_index: int) -> None:
    """Own output_dir before anything in it is deleted or written (`sftflow.config.run_lock`): rank 0
    claims it; under torchrun the other ranks (after rank 0, see `start_run`) accept their own job's claim
    and stop when another writer owns the dir.

    Raises:
        SftflowError: another live process owns output_dir, or it cannot be created.
    """
    if process_index == 0:
        claim(output_dir, "sftflow train")
    else:
        check_job_owner(output_dir)


def prepare_output_dir(output_dir: Path, args: RunArgs) -> None:
    """Refuse to write over an earlier run unless asked; start a fresh trainer_log.jsonl and drop the
    earlier run's checkpoints (so a later resume cannot pick one of them up) and its completion marker
    (so the dir does not look finished while the new run trains). Its lock file is not a run's output."""
    if output_dir.is_dir() and any(not is_lock_file(p) for p in output_dir.iterdir()):
        resuming = resume_word(args.training.resume_from_checkpoint) is not None
        if not (args.finetuning.overwrite_output_dir or resuming):
            raise SftflowError(
                f"output_dir {output_dir} already holds files. Set overwrite_output_dir: true to write over "
                "them, resume_from_checkpoint to continue a run, or choose another output_dir."
            )
        if not resuming and args.training.process_index == 0:
            (output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
            (output_dir / COMPLETION_MARKER).unlink(missing_ok=True)
            remove_final_staging(output_dir)
            for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".tmp-checkpoint-*")]:
                shutil.rmtree(old, ignore_errors=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftflowError(
            f"output_dir {output_dir} cannot be created: {exc.strerror or exc}. Choose a writable directory."
        ) from None


def prepare_data(args: RunArgs, tokenizer: PreTrainedTokenizerBase, vision: Vision | None = None) -> Prepared:
    """The data step of the run's stage, the first examples logged, data_stats.json written, and the
    training split shuffled (seeded). Under torchrun the main process of each node tokenizes into the cache
    while the others wait outside the process group's collectives (`data_step_first`), then read it.
    `vision`: the image handling of a model that sees (`sftflow.model.vision.load_run_vision`)."""
    training, data = args.training, args.data
    if training.local_process_index != 0 and data.overwrite_cache:  # read what the main process rebuilt
        data = dataclasses.replace(data, overwrite_cache=False)
    with data_step_first(training, desc="dataset preprocessing"):
        prepared = prepare(
            args.finetuning.stage, data, tokenizer, training.seed, training.do_train, vision=vision
        )
    if training.process_index == 0:
        log_examples(prepared, tokenizer, data.preview_rows)
        if prepared.meta:
            write_stats(prepared.meta, training.output_dir)
    prepared.train = shuffled(prepared.train, training.seed, data.buffer_size)
    return prepared


def build_model(args: RunArgs, tokenizer: PreTrainedTokenizerBase, head: str = "lm") -> Any:
    """The model of model_name_or_path (embeddings resized for new_special_tokens; `head="score"`: the
    one-output reward model) with LoRA / freeze / full tuning applied and, when asked, gradient
    checkpointing with the input-grad hook that frozen embeddings need. A reward head always trains."""

    model = load_model(args.model, tokenizer, head=head)
    finetuning, task_type = args.finetuning, "CAUSAL_LM"
    if head == "score":
        task_type, name = "SEQ_CLS", head_name(model)
        if finetuning.finetuning_type == "freeze":
            extra = [*(finetuning.freeze_extra_modules or []), name]
            finetuning = dataclasses.replace(finetuning, freeze_extra_modules=extra)
        elif finetuning.finetuning_type == "lora":  # trained in full and saved with the adapter
            extra = list(dict.fromkeys([name, *(finetuning.additional_target or [])]))
            finetuning = dataclasses.replace(finetuning, additional_target=extra)
    return apply_finetuning(
        model,
        args.model,
        finetuning,
        tokenizer=tokenizer,
        gradient_checkpointing=bool(args.training.gradient_checkpointing),
        gradient_checkpointing_kwargs=args.training.gradient_checkpointing_kwargs,
        task_type=task_type,
    )


def record(trainer: Trainer, split: str, metrics: dict[str, float], result: RunResult) -> None:
    """Log `metrics`, save them to `{split}_results.json` (and all_results.json), and keep them in `result`."""
    trainer.log_metrics(split, metrics)
    if trainer.is_world_process_zero():  # as Trainer.save_metrics, but each file whole or not at all
        save_metrics_atomically(trainer.args.output_dir, split, metrics)
    result.metrics.update(metrics)


def train_and_save(
    trainer: Trainer,
    args: RunArgs,
    tokenizer: PreTrainedTokenizerBase,
    resume: str | None,
    result: RunResult,
    image_processor: Any = None,
) -> None:
    """Train, then save the adapter/model, the trainer state, the train metrics (with non-pad tokens/s), the
    tokenizer (with the template used), sftflow_args.yaml and the loss plot. Any stage's Trainer works.

    The final files are written into a staging dir and renamed into place once all are written, the
    completion marker all_results.json last (`sftflow.train.final_save`).

    Raises:
        SftflowError: a write failed (a full disk: with about how many bytes the save needs).
    """

    output_dir = Path(args.training.output_dir)
    train_output = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_output.metrics)
    if trainer.state.num_input_tokens_seen and metrics.get("train_runtime"):
        # non-pad tokens per second of the whole train() call (what a user waits for)
        metrics["train_tokens_per_second"] = round(
            trainer.state.num_input_tokens_seen / metrics["train_runtime"], 2
        )
    trainer.log_metrics("train", metrics)
    result.metrics.update(metrics)
    needed = weights_bytes(trainer.model)
    saving, zero = trainer.args.should_save, trainer.is_world_process_zero()
    with staged(output_dir, needed) if saving else contextlib.nullcontext(staging_dir(output_dir)) as stage:
        trainer.accelerator.wait_for_everyone()  # the staging dir exists before any rank saves into it
        trainer.save_model(str(stage))  # every rank: DeepSpeed / FSDP gather the weights together
        trainer.accelerator.wait_for_everyone()
        if hasattr(
            trainer, "verify_save"
        ):  # the adapter on disk is the one in memory, or nothing is published
            trainer.verify_save(stage)
        if zero:
            trainer.state.save_to_json(str(stage / "trainer_state.json"))
            tokenizer.save_pretrained(stage)
            if image_processor is not None:  # a model that sees: its preprocessor_config.json beside it
                image_processor.save_pretrained(stage)
            (stage / "sftflow_args.yaml").write_text(yaml.safe_dump(args.to_yaml_dict(), sort_keys=False))
            write_metrics(output_dir, stage, "train", metrics)
            if args.finetuning.plot_loss:
                plots = plot_losses(trainer.state.log_history, stage, Path(output_dir).name)
    if saving:
        publish(stage, output_dir, needed, last=("sftflow_args.yaml", COMPLETION_MARKER))
        if zero and args.finetuning.plot_loss:
            result.plots = [output_dir / Path(p).relative_to(stage) for p in plots]
    trainer.accelerator.wait_for_everyone()


def evaluate(trainer: Trainer, args: RunArgs, result: RunResult, perplexity: bool) -> dict[str, float]:
    """Evaluate on the held-out set (with `perplexity`, exp(eval_loss) too), save eval_results.json and
    redraw the loss plots with the eval loss. Returns the eval metrics."""

    metrics = trainer.evaluate(metric_key_prefix="eval")
    if perplexity and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    record(trainer, "eval", metrics, result)
    if trainer.is_world_process_zero() and args.finetuning.plot_loss:
        result.plots = plot_losses(trainer.state.log_history, args.training.output_dir)
    return metrics


def trl_args(config_class: type, training: Seq2SeqTrainingArguments, **overrides: Any) -> Any:
    """A TRL config (a `TrainingArguments` subclass) holding every training key of this run.

    TRL's configs change some defaults (bf16 on, gradient checkpointing on, learning_rate 1e-6,
    logging_steps 10); copying each key keeps the user's values and sftflow's defaults (fp32 on CPU).
    `overrides` set the stage's own keys (beta, loss_type, ...).
    """
    from transformers import TrainingArguments

    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    values = {name: getattr(training, name) for name in names if hasattr(training, name)}
    return config_class(**{**values, **overrides})


def format_summary(result: RunResult) -> str:
    """The closing report: where things are, the metrics, the plots, one question answered base vs tuned."""
    lines = ["", "=" * 72, f"sftflow: run finished. Outputs in {result.output_dir.resolve()}"]
    groups: dict[str, dict[str, Any]] = {"train": {}, "eval": {}, "predict": {}}
    for key, value in result.metrics.items():
        group = next((g for g in groups if key.startswith(g)), None)
        if group:
            groups[group][key] = value
    for group, metrics in groups.items():
        if metrics:
            lines.append(f"  {group}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    for plot in result.plots:
        lines.append(f"  loss plot: {plot.resolve()}")
    if result.report:
        lines.append(f"  report: {result.report.resolve()}")
    if result.sample:
        prompt = result.sample["prompt"]
        lines += [
            "  held-out question (as the model saw it):",
            *("    | " + line for line in prompt.strip().splitlines()[-6:]),
            f"  reference : {result.sample['label']}",
            f"  base model: {result.sample['base']}",
            f"  tuned     : {result.sample['tuned']}",
        ]
    lines.append("=" * 72)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
