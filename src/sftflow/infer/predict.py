"""Predictions: batch generation into generated_predictions.jsonl with text metrics, and its readers.

One path for training's predict step and `sftflow predict`: prompts sorted longest first
(`tokenize_prompts`), left-padded batches of `per_device_eval_batch_size`, generation through the Trainer
(progress bar, devices) and ROUGE/BLEU against each row's reference answer. The file has two schemas,
each with one writer and one reader here: generated answers (`prompt`, `predict`, `label`) and, for
rm, pair scores (`prompt`, `chosen`, `rejected`, `chosen_score`, `rejected_score`).

With a reasoning template (`sftflow.data.thinking`) the prompts follow the run's `enable_thinking` and
each generated text is split as the server splits it (infer/reasoning.py): `predict` holds the answer and
`predict_reasoning` the thought (null when none), `label` / `label_reasoning` the reference's; ROUGE/BLEU
score the answers only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.data.collator import SftCollator
from sftflow.data.encode import IGNORE_INDEX, stop_token_ids
from sftflow.data.loader import load_conversations, split_train_eval
from sftflow.data.prepare import tokenize_prompts
from sftflow.data.template import render
from sftflow.data.thinking import Thinking, resolve_thinking
from sftflow.data.vision import VisionCollator, load_vision
from sftflow.errors import SftflowError
from sftflow.infer.reasoning import split_answer
from sftflow.model.inference import load_for_inference
from sftflow.model.loader import model_path
from sftflow.train.metrics import text_metrics

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.parser import RunArgs
    from sftflow.train.trainer import SftflowTrainer

logger = logging.getLogger(__name__)


def predict_conversations(args: RunArgs) -> Dataset | IterableDataset:
    """The conversations to answer: eval_dataset, else the held-out val_size split, else dataset.

    Raises:
        SftflowError: no dataset is named.
    """
    data, seed = args.data, args.training.seed
    if data.eval_dataset:
        return load_conversations(data.eval_dataset, data, seed)
    if data.dataset and data.val_size:
        return split_train_eval(load_conversations(data.dataset, data, seed), data.val_size, seed)[1]
    if data.dataset:
        return load_conversations(data.dataset, data, seed)
    raise SftflowError(
        "sftflow predict needs data: set eval_dataset (or dataset) to a name in dataset_info.json."
    )


def run_predict(args: RunArgs) -> dict[str, float]:
    """Answer every prompt of the dataset with the model (+adapter) and write, under output_dir,
    generated_predictions.jsonl (prompt, predict, label per line, dataset order) and predict_results.json."""
    from transformers import GenerationConfig

    # (the trainer imports torch and transformers; this module is imported by `sftflow report`)
    from sftflow.train.trainer import SftflowTrainer

    output_dir = Path(args.training.output_dir)
    args.training.predict_with_generate = True  # SftflowTrainer generates only with it (else: logits)
    model, tokenizer = load_for_inference(args, images=True)
    thinking = resolve_thinking(tokenizer, args.data.enable_thinking, args.data.preserve_thinking)
    # a model that sees: prompts with images get its image runs, batches their pixels (data/vision.py)
    vision = load_vision(
        model_path(args.model), tokenizer, args.model.image_max_pixels, args.model.image_min_pixels
    )
    dataset, rows = tokenize_prompts(
        predict_conversations(args), tokenizer, args.data.cutoff_len, thinking, vision=vision
    )
    if vision is not None:
        args.training.remove_unused_columns = False  # the rows' images feed the collator
    output_dir.mkdir(parents=True, exist_ok=True)
    generation_config = GenerationConfig(
        **args.generating.to_generation_kwargs(),
        eos_token_id=sorted(stop_token_ids(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
    )
    trainer = SftflowTrainer(
        model=model,
        args=args.training,
        data_collator=SftCollator(tokenizer.pad_token_id, padding_side="left")
        if vision is None
        else VisionCollator(tokenizer.pad_token_id, vision, padding_side="left"),
        processing_class=tokenizer,
        generation_config=generation_config,
    )
    metrics = generate_predictions(trainer, dataset, rows, tokenizer, output_dir, "predict", thinking)
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    if trainer.is_world_process_zero():
        print(
            f"sftflow: {len(rows)} predictions written to {(output_dir / 'generated_predictions.jsonl').resolve()}",
            flush=True,
        )
    return metrics


PREDICTIONS = "generated_predictions.jsonl"
BASE_PREDICTIONS = "generated_predictions_base.jsonl"


def generate_predictions(
    trainer: SftflowTrainer,
    dataset: Dataset,
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    prefix: str,
    thinking: Thinking | None = None,
) -> dict[str, float]:
    """Generate for every prompt, write generated_predictions[_base].jsonl (in dataset order), return text
    metrics (`{prefix}_rouge-1`, ...). `prefix` is `predict` (the tuned model) or `predict_base`. With
    `thinking` (the rows from `tokenize_prompts` with it) thoughts are split from the answers."""
    drop_last = trainer.args.dataloader_drop_last
    if drop_last:
        logger.warning(
            "predict answers every prompt, the smaller last batch too: dataloader_drop_last is not applied."
        )
    trainer.args.dataloader_drop_last = False  # the Trainer drops a smaller last batch at predict time too
    try:
        output = trainer.predict(dataset, metric_key_prefix=prefix)
    finally:
        trainer.args.dataloader_drop_last = drop_last
    # one array (batches padded to the longest answer with IGNORE_INDEX), or one per batch when
    # eval_do_concat_batches is false; pad is special, so decoding drops it with the stop token
    batches = output.predictions if isinstance(output.predictions, list) else [output.predictions]
    texts = []
    for tokens in batches:
        tokens[tokens == IGNORE_INDEX] = tokenizer.pad_token_id
        texts += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    split = [split_answer(text, thinking, row["prompt"]) for row, text in zip(rows, texts, strict=True)]
    answers = [answer.strip() for _, answer in split]
    metrics = {f"{prefix}_{k}": v for k, v in text_metrics(answers, [r["label"] for r in rows]).items()}
    metrics.update({k: v for k, v in output.metrics.items() if k.endswith(("runtime", "samples_per_second"))})
    entries = []
    for row, (thought, answer) in zip(rows, split, strict=True):
        entry = {"prompt": row["prompt"], "predict": answer.strip(), "label": row["label"]}
        if thinking is not None:
            entry |= {"predict_reasoning": thought, "label_reasoning": row.get("label_reasoning")}
        entries.append((row["index"], entry))
    if trainer.is_world_process_zero():
        name = PREDICTIONS if prefix == "predict" else BASE_PREDICTIONS
        write_jsonl(output_dir / name, (entry for _, entry in sorted(entries, key=lambda pair: pair[0])))
    return metrics


def write_pair_scores(
    output_dir: Path,
    pairs: Dataset,
    encoded: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    chosen: list[float],
    rejected: list[float],
) -> None:
    """rm: generated_predictions.jsonl with, per held-out pair (`pairs`, the rows `encoded["row"]` names),
    the prompt as the model saw it, both answers and their scores."""

    def entries() -> Iterator[dict[str, Any]]:
        for row, c, r in zip(encoded["row"], chosen, rejected, strict=True):
            pair = pairs[row]
            yield {
                "prompt": render(tokenizer, pair["messages"], add_generation_prompt=True),
                "chosen": pair["chosen"],
                "rejected": pair["rejected"],
                "chosen_score": round(c, 4),
                "rejected_score": round(r, 4),
            }

    write_jsonl(output_dir / PREDICTIONS, entries())


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, or [] when absent."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_answers(output_dir: Path) -> list[dict[str, str]]:
    """The held-out rows with `prompt`, `label`, `tuned` and (when the base answered too) `base`; [] when
    the run wrote no generated answers (e.g. rm's pair scores)."""
    tuned = read_jsonl(Path(output_dir) / PREDICTIONS)
    if not tuned or "predict" not in tuned[0]:
        return []
    base = read_jsonl(Path(output_dir) / BASE_PREDICTIONS)
    rows = [{"prompt": t["prompt"], "label": t["label"], "tuned": t["predict"]} for t in tuned]
    if len(base) == len(tuned):
        for row, b in zip(rows, base, strict=True):
            row["base"] = b["predict"]
    return rows


def read_pair_scores(output_dir: Path) -> list[dict[str, Any]]:
    """rm's scored held-out pairs; [] when the file holds generated answers instead."""
    rows = read_jsonl(Path(output_dir) / PREDICTIONS)
    return rows if rows and "chosen_score" in rows[0] else []


def sample_answers(output_dir: Path) -> dict[str, str] | None:
    """The first held-out question with its reference, tuned and base answers."""
    rows = read_answers(output_dir)
    return rows[0] if rows and "base" in rows[0] else None
