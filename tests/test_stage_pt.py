"""stage: pt on a tiny random model: loss goes down, eval perplexity, the same outputs as sft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import as_overrides, train_config
from sftflow.config import load_args
from sftflow.errors import SftflowError

TEXTS = [f"Wren counts {n} birds. The sftflow team counts {n + 1} birds." for n in range(40)]


def pt_config(tmp_path: Path, model_dir: Path, **overrides) -> dict:
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"texts": {"file_name": "texts.jsonl", "columns": {"prompt": "text"}}})
    )
    values = {
        "stage": "pt",
        "dataset": "texts",
        "val_size": 4,
        "cutoff_len": 32,
        "finetuning_type": "full",  # a random tiny model learns fastest with every weight
        "do_eval": True,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "max_steps": 8,
        "logging_steps": 1,
        "tokenized_cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return train_config(model_dir, tmp_path, tmp_path / "out", **values)


@pytest.mark.integration
def test_pt_trains_every_token_and_writes_the_sft_outputs(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    config = pt_config(tmp_path, tiny_model_dir)
    result = run_stage(load_args(None, as_overrides(config)))
    out = tmp_path / "out"
    for name in [
        "model.safetensors",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "training_eval_loss.png",
        "sftflow_args.yaml",
    ]:
        assert (out / name).is_file(), name
    losses = [
        e["loss"]
        for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
        if "loss" in e
    ]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2  # the text is learnable: loss goes down
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert result.metrics["eval_loss"] == metrics["eval_loss"]


def test_pt_rows_are_texts_plus_eos_cut_to_cutoff_len(tiny_model_dir, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    from sftflow.data.prepare import tokenize_texts

    args = load_args(None, as_overrides(pt_config(tmp_path, tiny_model_dir)))
    rows = tokenize_texts(Dataset.from_dict({"text": TEXTS[:3]}), tiny_tokenizer, args.data, "train")
    eos = tiny_tokenizer.eos_token_id
    stream = [t for text in TEXTS[:3] for t in [*tiny_tokenizer.encode(text, add_special_tokens=False), eos]]
    assert [t for ids in rows["input_ids"] for t in ids] == stream
    assert all(len(ids) == 32 for ids in rows["input_ids"][:-1])
    assert rows["labels"] == rows["input_ids"]


def test_pt_refuses_do_predict(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    config = pt_config(tmp_path, tiny_model_dir, do_predict=True, predict_with_generate=True)
    with pytest.raises(SftflowError, match="do_predict: false"):
        run_stage(load_args(None, as_overrides(config)))
