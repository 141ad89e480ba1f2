"""`sftflow plan --measure`: time a few real training steps on the worst batch (sft and pt)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sftflow.data.collator import SftCollator
from sftflow.data.prepare import prepare
from sftflow.errors import SftflowError
from sftflow.model.loader import load_chat_tokenizer
from sftflow.train.perf import ModelShape, TrainSetup, flops_per_token
from sftflow.train.steps import build_model

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.parser import RunArgs


MEASURED_STAGES = ("sft", "pt")


def check_measurable(stage: str) -> None:
    """Raises SftflowError for a stage `measure_steps` cannot time (rm, dpo: pairs through TRL's trainers)."""
    if stage not in MEASURED_STAGES:
        raise SftflowError(
            f"plan --measure times sft and pt steps; for stage {stage} time a short run instead: "
            "sftflow train CONFIG max_steps=4 (trainer_log.jsonl has tokens/s and peak memory)."
        )


def worst_batches(args: RunArgs, tokenizer: PreTrainedTokenizerBase, steps: int) -> tuple[Dataset, int, int]:
    """The training data of `steps` steps in which every batch is the largest one the data can form: the
    longest example, batch (per device x accumulation) times. Returns it, the batch and the sequence length.

    Raises:
        SftflowError: there is no training data.
    """
    dataset = prepare(args.finetuning.stage, args.data, tokenizer, args.training.seed, True).train
    if dataset is None:
        raise SftflowError("--measure needs training data: set dataset and do_train: true.")
    batch = args.training.per_device_train_batch_size * args.training.gradient_accumulation_steps
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    return dataset.select([longest] * batch * steps), batch, lengths[longest]


def measure_steps(args: RunArgs, steps: int, warmup: int = 1) -> dict[str, float]:
    """Train `warmup + steps` real steps on the longest examples (the worst batches) and measure.

    The tokenizer, data and model are built as `sftflow train` builds them (`load_chat_tokenizer`, the
    data step, `build_model`). Memory is sampled only inside the training steps (not while the model
    loads): peak process RSS on CPU, `torch.cuda.max_memory_allocated` on GPU.

    Returns:
        step_seconds (mean wall time of the timed steps), busy_step_seconds (CPU: CPU seconds per torch
        thread, the step time on an idle machine), peak_bytes, baseline_bytes (RSS before the first
        step), tokens_per_step, seq (padded length), flops_per_second (from busy_step_seconds).

    Raises:
        SftflowError: the stage is rm or dpo (their pairs train through TRL's trainers), or there is
            no training data.
    """
    import copy
    import tempfile

    import psutil
    import torch
    from transformers import Trainer, TrainerCallback

    check_measurable(args.finetuning.stage)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    dataset, batch, seq = worst_batches(args, tokenizer, steps + warmup)
    model = build_model(args, tokenizer)
    on_gpu = torch.cuda.is_available()
    process = psutil.Process()
    state: dict[str, Any] = {"sampling": False, "peak": 0, "times": [], "cpu": [], "start": 0.0, "step": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if state["sampling"]:
                state["peak"] = max(state["peak"], process.memory_info().rss)
            time.sleep(0.002)

    class Timer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            state["start"], state["cpu_start"] = time.perf_counter(), time.process_time()
            state["sampling"] = state["step"] >= warmup  # the first steps allocate optimizer states

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if state["step"] >= warmup:
                state["times"].append(time.perf_counter() - state["start"])
                state["cpu"].append((time.process_time() - state["cpu_start"]) / torch.get_num_threads())
            state["step"] += 1

    training = copy.deepcopy(args.training)
    with tempfile.TemporaryDirectory() as tmp:
        for key, value in {
            "output_dir": tmp,
            "max_steps": steps + warmup,
            "logging_strategy": "no",
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": [],
            "do_eval": False,
            "disable_tqdm": True,
        }.items():
            setattr(training, key, value)
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=dataset,
            data_collator=SftCollator(tokenizer.pad_token_id),
            callbacks=[Timer()],
        )
        thread = threading.Thread(target=sample, daemon=True)
        baseline = process.memory_info().rss
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        thread.start()
        try:
            trainer.train()
        finally:
            stop.set()
            thread.join()
    peak = torch.cuda.max_memory_allocated() if on_gpu else state["peak"]
    shape = ModelShape.from_model(model)
    setup = TrainSetup.from_model(shape, model)
    step_seconds = sum(state["times"]) / max(1, len(state["times"]))
    # CPU: seconds of the cores' time per thread, i.e. the step time on an otherwise idle machine
    busy_seconds = sum(state["cpu"]) / max(1, len(state["cpu"])) if not on_gpu else step_seconds
    step_flops = batch * seq * flops_per_token(shape, setup, seq, bool(training.gradient_checkpointing))
    return {
        "step_seconds": step_seconds,
        "busy_step_seconds": busy_seconds,
        "peak_bytes": float(peak),
        "baseline_bytes": float(baseline),
        "tokens_per_step": float(batch * seq),
        "seq": float(seq),
        "flops_per_second": step_flops / busy_seconds if busy_seconds else 1.0,
    }
