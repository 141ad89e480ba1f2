"""The Seq2SeqTrainer subclass: generation at predict time sees only the prompt, and returns only new tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Seq2SeqTrainer, TrainerCallback


class SftTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that generates from left-padded prompts with an explicit GenerationConfig.

    Eval (loss) runs on prompt+response batches; predict runs on prompt-only batches (no labels), so no
    response token can reach `generate`.
    """

    def __init__(self, *args: Any, generation_config: GenerationConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sft_generation_config = generation_config

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
            )
        return None, output[:, inputs["input_ids"].size(1) :], None


class JsonlLogCallback(TrainerCallback):
    """Append every log entry (with elapsed seconds) to output_dir/trainer_log.jsonl, main process only."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.start = time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "elapsed_s": round(time.time() - self.start, 2),
            **logs,
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
