"""The trainers: `Resilience`, the fault handling and throughput logs every stage's trainer gets, and
`SftflowTrainer` (sft/pt) built on it; rm and dpo apply it to TRL's trainers (stages/rm.py, stages/dpo.py).

- checkpoints are written to a staging dir and renamed into `checkpoint-N` once complete (and once the
  adapter on disk matches the one in memory, `save_check.py`), and resuming picks the latest complete one,
  so a run killed mid-save never resumes from a half-written checkpoint;
- a NaN/inf training loss stops the run naming the step (or, with `skip_nan`, skips that batch);
- out-of-memory errors say which knobs help; SIGTERM/SIGINT save a checkpoint and stop (callbacks.py);
- every training log entry carries non-pad tokens/s, MFU and peak memory;
- sft/pt: the training loss computes logits only at trained positions of a padding-free row (loss.py), and
  predict generates from left-padded prompts only and returns only the new tokens.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from sftflow.errors import SftflowError
from sftflow.model.vision import vision_generate_kwargs
from sftflow.train.attention import segment_attention
from sftflow.train.callbacks import GracefulStopCallback, TrainingInterrupted
from sftflow.train.checkpoints import STAGING_PREFIX, remove_staging_dirs, resolve_resume, resume_word
from sftflow.train.distributed import fused_head_reason
from sftflow.train.final_save import as_os_error, save_error, weights_bytes
from sftflow.train.loss import causal_lm_loss, supports_fast_loss
from sftflow.train.perf import ThroughputMeter, sequence_lengths
from sftflow.train.save_check import verify_adapter_save

logger = logging.getLogger(__name__)


def launch_advice(device_count: int, env: dict[str, str] | os._Environ) -> str | None:
    """What to tell a user who sees several GPUs but started one process (the Trainer would fall back to
    the slow torch DataParallel); None when there is nothing to say."""
    if device_count <= 1 or "WORLD_SIZE" in env or "LOCAL_RANK" in env:
        return None
    return (
        f"{device_count} GPUs are visible but sftflow runs as a single process, so the Trainer would use slow "
        f"DataParallel. Launch one process per GPU: torchrun --nproc_per_node {device_count} -m sftflow.cli "
        "train CONFIG.yaml (or accelerate launch / deepspeed, see examples/), or pick one GPU with "
        "CUDA_VISIBLE_DEVICES=0."
    )


def check_launch(env: dict[str, str] | os._Environ, world_size: int) -> None:
    """Refuse a multi-process launch that the Trainer did not turn into one distributed run.

    Raises:
        SftflowError: torchrun/accelerate started several processes but each would train alone.
    """
    launched = int(env.get("WORLD_SIZE") or 1)
    if launched > 1 and world_size == 1:
        raise SftflowError(
            f"started as {launched} processes (WORLD_SIZE={launched}) but the Trainer set up no process "
            "group, so each process would train alone and write the same output_dir. On CPU set "
            "use_cpu: true (gloo backend); on GPUs make sure every process sees CUDA."
        )


def oom_message(stage: str) -> str:
    """The advice for an out-of-memory error in `stage` (training, evaluation, prediction)."""
    if stage == "training":
        knobs = (
            "lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the global batch), "
            "lower cutoff_len, set gradient_checkpointing: true, use quantization_bit: 4 (QLoRA) or "
            "finetuning_type: lora, or shard with DeepSpeed ZeRO / FSDP (examples/)"
        )
    else:
        knobs = "lower per_device_eval_batch_size, cutoff_len or max_new_tokens, or use quantization_bit: 4"
    return f"out of memory during {stage}. To fit: {knobs}."


@contextlib.contextmanager
def oom_advice(stage: str) -> Iterator[None]:
    """Turn an out-of-memory error (GPU, or a failed CPU allocation) into an SftflowError with advice."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise SftflowError(oom_message(stage)) from exc
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):
            raise
        raise SftflowError(oom_message(stage)) from exc


def example_lengths(inputs: dict[str, Any], pad_token_id: int | None = None) -> list[int]:
    """The non-pad length of every sequence a training batch runs through the model.

    sft/pt batches hold examples (padded or packed, `sequence_lengths`); rm and dpo batches stack the
    chosen and the rejected sequence of each pair in `input_ids`/`attention_mask`, so both are counted;
    ORPO's batches keep them apart as `chosen_attention_mask` and `rejected_attention_mask`; grpo's hold
    each completion (`completion_mask`) after its prompt (`prompt_mask`).

    >>> import torch
    >>> example_lengths({"chosen_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...     "rejected_attention_mask": torch.tensor([[1, 0], [1, 1]]), "prompt_input_ids": torch.ones(2, 1)})
    [3, 2, 1, 2]
    """
    if "input_ids" in inputs:
        return sequence_lengths(inputs, pad_token_id)
    if "completion_mask" in inputs:  # grpo: each sampled completion with its prompt
        return [int(n) for n in (inputs["prompt_mask"].sum(1) + inputs["completion_mask"].sum(1)).tolist()]
    return [
        int(n) for side in ("chosen", "rejected") for n in inputs[f"{side}_attention_mask"].sum(1).tolist()
    ]


class Resilience:
    """Fault handling and throughput logs for any `transformers.Trainer` (TRL's included), as a mixin:
    `class X(Resilience, SomeTrainer)`. It overrides, and needs from the Trainer, `train`, `evaluate`,
    `predict`, `log`, `compute_loss`, and the private `_save_checkpoint` / `_get_output_dir`
    (tests/test_faults_pairs.py fails if a transformers release renames them).

    - `train(resume_from_checkpoint=True)` resumes from the latest *complete* checkpoint; a path (what
      `start_run` resolved) is passed on as it is;
    - checkpoints go to a staging dir renamed into `checkpoint-N` once every rank wrote its part;
    - a NaN/inf training loss stops naming the step (`skip_nan`: that batch is skipped);
    - out-of-memory errors say which knobs help; SIGTERM/SIGINT save a checkpoint and stop;
    - every training log entry carries non-pad tokens/s, MFU and peak memory (`example_lengths`).
    """

    reference_forward = False  # True where every step also runs a reference model (dpo): counted in MFU

    def __init__(self, *args: Any, skip_nan: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_nan = skip_nan
        self.throughput = ThroughputMeter(self.model, reference_forward=self.reference_forward)
        self.nan_skipped = 0
        self.stop_callback = GracefulStopCallback()
        self.add_callback(self.stop_callback)
        self._staging_dir: str | None = None

    # ---- train / evaluate / predict: resume, OOM advice, signal stop ----

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`; `true`/"latest" resumes from the latest *complete* checkpoint in output_dir.

        Raises:
            TrainingInterrupted: a SIGTERM/SIGINT stopped training (after saving a checkpoint).
            SftflowError: NaN/inf loss, out of memory, or nothing to resume from.
        """
        resume = resume_word(resume_from_checkpoint)
        if resume == "latest":  # a direct caller's `True`; recipes pass the path start_run resolved
            resume = resolve_resume(self.args.output_dir, resume)
        if self.args.should_save:
            remove_staging_dirs(self.args.output_dir)
        with oom_advice("training"):
            output = super().train(resume_from_checkpoint=resume, **kwargs)
        if self.stop_callback.stopped_by:
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stop_callback.step}"
            raise TrainingInterrupted(
                f"training stopped by {self.stop_callback.stopped_by} at step {self.stop_callback.step} of "
                f"{self.state.max_steps}; checkpoint saved to {checkpoint}. Resume with the same command plus "
                "resume_from_checkpoint=true (e.g. sftflow train CONFIG.yaml resume_from_checkpoint=true)."
            )
        return output

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with oom_advice("evaluation"):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with oom_advice("prediction"):
            return super().predict(*args, **kwargs)

    # ---- throughput logs ----

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add non-pad tokens/s, MFU and peak memory (since the last log) to every training log entry."""
        if "loss" in logs:
            logs = {**logs, **self.throughput.report()}
        super().log(logs, *args, **kwargs)

    # ---- the loss, checked for NaN / inf ----

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """`training_loss` (the parent trainer's loss), counted for the throughput log and checked: a
        NaN/inf training loss stops the run naming the step, or with `skip_nan` becomes a zero-gradient
        loss that skips the batch."""
        if model.training:
            self.throughput.add(example_lengths(inputs, getattr(self.processing_class, "pad_token_id", None)))
        output = self.training_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = output[0] if return_outputs else output
        if not model.training or bool(torch.isfinite(loss.detach()).all()):
            return output
        step = self.state.global_step + 1  # the optimizer step this batch belongs to
        value = loss.detach().float().mean().item()
        trainable = [p for p in model.parameters() if p.requires_grad]
        weights_ok = all(bool(torch.isfinite(p.detach()).all()) for p in trainable)
        if not self.skip_nan or not weights_ok:
            reason = (
                ""
                if weights_ok
                else " The trainable weights themselves hold NaN/inf, so skipping cannot help."
            )
            raise SftflowError(
                f"training loss is {value} at step {step} (epoch {self.state.epoch or 0:.2f}); training stopped."
                f"{reason} Try a lower learning_rate, max_grad_norm: 1.0, bf16 instead of fp16, or check the "
                "data; skip_nan: true skips batches whose loss is NaN/inf instead of stopping."
            )
        self.nan_skipped += 1
        logger.warning(
            "step %d: loss is %s; skipping this batch (skip_nan, %d skipped so far).",
            step,
            value,
            self.nan_skipped,
        )
        # A zero-gradient loss on every trainable weight (so DDP's gradient hooks still fire) that keeps the
        # non-finite value for the log (the Trainer's logging_nan_inf_filter leaves it out of the average).
        skipped = sum((p * 0).sum() for p in trainable) + loss.detach()
        return (skipped, *output[1:]) if return_outputs else skipped

    def training_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> Any:
        """The loss (and outputs) of the parent trainer's `compute_loss`; SftflowTrainer swaps in its own."""
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    # ---- atomic checkpoints, checked against the weights in memory ----

    def verify_save(self, directory: str | Path) -> None:
        """Every rank: stop when the adapter saved in `directory` is not the one in memory (`save_check`)."""
        verify_adapter_save(
            self.model, directory, reads=self.args.should_save, distributed=self.accelerator.num_processes > 1
        )

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write checkpoint-N into a staging dir, then rename it into place once every rank is done."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:  # a full disk: one line, and no half checkpoint left behind
            if (os_error := as_os_error(exc)) is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise save_error(os_error, run_dir, weights_bytes(model) * 3, where=f"saving {name}") from None
        finally:
            self._staging_dir = None
        try:
            self.verify_save(staging / name)
        except SftflowError:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging:
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng state, shards)
        if self.args.should_save:
            final = run_dir / name
            if (staging / name).is_dir():  # another node sharing the filesystem may have renamed it already
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class SftflowTrainer(Resilience, Seq2SeqTrainer):
    """The sft/pt trainer: `Resilience` over Seq2SeqTrainer, with the trained-token training loss and
    generation from left-padded prompts with an explicit GenerationConfig at predict time.

    Eval (loss) runs on prompt+response batches; predict runs on prompt-only batches (no labels), so no
    response token can reach `generate`.
    """

    def __init__(
        self,
        *args: Any,
        generation_config: GenerationConfig | None = None,
        fast_loss: bool = True,
        dft_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sft_generation_config = generation_config
        self.fast_loss = fast_loss  # training loss with logits only at trained positions (loss.py)
        self.dft_loss = dft_loss  # use_dft_loss: the trained-token loss weighted by each token's probability

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        # With the trained-token loss, sdpa models attend per example on its padding-free rows.
        attention = segment_attention(self.model) if self.fast_loss else contextlib.nullcontext()
        with attention:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ---- the training loss (logits only where trained) ----

    def training_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> Any:
        if self.fast_loss and model.training and not return_outputs and supports_fast_loss(model, inputs):
            return self.trained_token_loss(model, inputs, num_items_in_batch)
        if self.dft_loss and model.training:  # the model's own loss would silently be the plain one
            raise SftflowError(
                "use_dft_loss needs sftflow's trained-token loss, which this model or batch does not support "
                "(a forward without logits_to_keep, or inputs besides input_ids/labels). Set use_dft_loss: false."
            )
        return super().training_loss(model, inputs, return_outputs, num_items_in_batch)

    def trained_token_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """`causal_lm_loss` (sum over trained tokens / num_items_in_batch), scaled for DDP as
        `Trainer.compute_loss` scales the model's own loss (DDP averages gradients over ranks while
        num_items_in_batch counts the tokens of all ranks)."""
        loss, _ = causal_lm_loss(
            model, inputs, num_items_in_batch, fused_head=self.fused_head, dft=self.dft_loss
        )
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    @functools.cached_property
    def fused_head(self) -> bool:
        """Whether the trained-token loss multiplies the output head into the loss itself (one process,
        DDP, ZeRO-1/2: the whole head weight is on every rank); under FSDP / ZeRO-3 the model's forward
        computes the kept positions' logits (`logits_to_keep`), as exact. Said once, in the log."""
        reason = fused_head_reason(self)
        if reason is None:
            logger.info("training loss: trained tokens only, padding-free, output head fused into the loss.")
        else:
            logger.info(
                "training loss: trained tokens only, padding-free, their logits from the model's forward "
                "(logits_to_keep) instead of the fused head: %s.",
                reason,
            )
        return reason is None

    # ---- generation at predict time ----

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if prediction_loss_only or not self.args.predict_with_generate or "labels" in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            output = unwrapped.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                generation_config=self.sft_generation_config,
                **vision_generate_kwargs(inputs),  # a model that sees: its pixels
            )
        return None, output[:, inputs["input_ids"].size(1) :], None
