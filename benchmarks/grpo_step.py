"""One GRPO step's time, split into generation, rewards and training: sftflow's stage: grpo trainer against
TRL's GRPOTrainer at its defaults, same model, prompts, G and lengths, in one invocation.

Both trainers are GRPOTrainer subclasses, so both are timed the same way: `_generate_single_turn`
(sampling the completions) and `_calculate_rewards` are wrapped with timers, and the whole optimizer step is
timed by a callback (on_step_begin -> on_step_end); training = step - generation - rewards (the loss's
forward and backward and the optimizer update; with beta > 0 also the reference forward).

sftflow: the run's config (`--config`, default examples/grpo_demo.yaml) through `run_grpo`'s pieces (data,
template, LoRA, Resilience). TRL: `GRPOTrainer(model=<the same model dir>, reward_funcs=<the same reward>,
args=GRPOConfig(<only output_dir, num_generations, max_completion_length, per_device_train_batch_size,
max_steps, learning_rate, lr schedule, seed>), peft_config=<the same LoRA>)` on the same conversational
prompts: everything else is TRL's default (bf16, gradient checkpointing on, ...; on a machine without CUDA
`use_cpu: true`, which TRL's bf16 default needs there; `--trl-fp32` sets bf16: false). sftflow's steps run first,
then TRL's (`--rounds` timed steps each, after one warm-up step); the median of each part is reported.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/grpo_step.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.steps.append(time.perf_counter() - self.start)


def timed(trainer: Any, name: str, store: list[float]) -> None:
    """Wrap `trainer.<name>` so each call's seconds are appended to `store`."""
    original = getattr(trainer, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            store.append(time.perf_counter() - start)

    setattr(trainer, name, wrapper)


def instrument(trainer: Any) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"generation": [], "rewards": []}
    timed(trainer, "_generate_single_turn", times["generation"])
    timed(trainer, "_calculate_rewards", times["rewards"])
    timer = StepTimer()
    trainer.add_callback(timer)
    times["step"] = timer.steps
    return times


def sftflow_trainer(config: str, out: Path, steps: int) -> tuple[Any, Any]:
    from sftflow.config import load_args
    from sftflow.data.encode import stop_token_ids
    from sftflow.data.thinking import DEFAULT_CLOSE, DEFAULT_OPEN
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.grpo import grpo_rows, grpo_trainer
    from sftflow.train.rewards import load_rewards
    from sftflow.train.steps import build_model, prepare_data

    args = load_args(
        config,
        [
            f"output_dir={out}",
            f"max_steps={steps}",
            "save_steps=1000000",
            "save_strategy=no",
            "logging_steps=1",
        ],
    )
    out.mkdir(parents=True)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    finetuning = args.finetuning
    rewards = load_rewards(
        finetuning.reward_funcs,
        finetuning.reward_kwargs,
        finetuning.max_completion_length,
        (DEFAULT_OPEN, DEFAULT_CLOSE),
    )
    prepared = prepare_data(args, tokenizer)
    model = build_model(args, tokenizer)
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer))
    trainer = grpo_trainer(args, model, tokenizer, rewards, grpo_rows(prepared.train), None, [])
    return trainer, args


def trl_trainer(args: Any, rewards: list[Any], out: Path, steps: int, fp32: bool) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from sftflow.data.loader import load_conversations
    from sftflow.model.loader import model_path

    finetuning, training = args.finetuning, args.training
    rows = load_conversations(args.data.dataset, args.data, training.seed, "grpo")
    prompts = [
        {"prompt": messages, **json.loads(extra)}
        for messages, extra in zip(rows["messages"], rows["extra"], strict=True)
    ]
    config = GRPOConfig(
        output_dir=str(out),
        num_generations=finetuning.num_generations,
        max_completion_length=finetuning.max_completion_length,
        per_device_train_batch_size=training.per_device_train_batch_size,
        max_steps=steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        seed=training.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),  # TRL's bf16 default refuses a GPU-less machine without it
        **({"bf16": False} if fp32 else {}),
    )
    lora = LoraConfig(
        r=finetuning.lora_rank,
        lora_alpha=finetuning.lora_alpha,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return GRPOTrainer(
        model=model_path(args.model),
        reward_funcs=rewards,
        args=config,
        train_dataset=Dataset.from_list(prompts),
        peft_config=lora,
    )


def summary(times: dict[str, list[float]], skip: int) -> dict[str, float]:
    step = times["step"][skip:]
    gen = times["generation"][skip:]
    rew = times["rewards"][skip:]
    train = [s - g - r for s, g, r in zip(step, gen, rew, strict=False)]
    return {
        "step_s": round(statistics.median(step), 2),
        "generation_s": round(statistics.median(gen), 2),
        "rewards_s": round(statistics.median(rew), 3),
        "training_s": round(statistics.median(train), 2),
        "steps_timed": len(step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "grpo_demo.yaml"))
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed steps per trainer (after 1 warm-up step)"
    )
    parser.add_argument("--trl-fp32", action="store_true", help="TRL with bf16: false (sftflow's CPU dtype)")
    options = parser.parse_args()
    steps = options.rounds + 1
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(ROOT):
        ours, args = sftflow_trainer(options.config, Path(tmp) / "sftflow", steps)
        theirs = trl_trainer(args, list(ours.reward_funcs), Path(tmp) / "trl", steps, options.trl_fp32)
        results = {}
        for name, trainer in (("sftflow", ours), ("trl_defaults", theirs)):
            times = instrument(trainer)
            trainer.train()
            results[name] = summary(times, skip=1)
        results["setting"] = {
            "model": args.model.model_name_or_path,
            "num_generations": args.finetuning.num_generations,
            "max_completion_length": args.finetuning.max_completion_length,
            "per_device_train_batch_size": args.training.per_device_train_batch_size,
            "trl_bf16": bool(theirs.args.bf16),
            "trl_gradient_checkpointing": bool(theirs.args.gradient_checkpointing),
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
