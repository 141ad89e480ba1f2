"""`sftflow predict` on a tiny model + LoRA adapter: batched left-padded generation, longest prompts first,
predictions in dataset order, metrics against the references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import make_run_dir
from sftflow.cli.predict import main
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError
from sftflow.infer.engine import load_engine
from sftflow.infer.predict import run_predict


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"), max_new_tokens=4)


def write_config(tmp_path: Path, model_dir: Path, run_dir: Path, data_dir: Path, **extra) -> Path:
    config = {
        "model_name_or_path": str(model_dir),
        "adapter_name_or_path": str(run_dir),
        "dataset_dir": str(data_dir),
        "eval_dataset": "toy_heldout",
        "cutoff_len": 128,
        "max_new_tokens": 4,
        "per_device_eval_batch_size": 3,
        "repetition_penalty": 5.0,  # greedy, but the random tiny model then says more than newlines
        "output_dir": str(tmp_path / "predictions"),
        **extra,
    }
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_writes_predictions_in_dataset_order_with_metrics(
    tmp_path, tiny_model_dir, run_dir, toy_data_dir, monkeypatch
):
    from transformers import GenerationMixin

    batches: list[list[int]] = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        mask = kwargs["attention_mask"]
        assert (mask[:, -1] == 1).all(), "generation batches must be left-padded"
        batches.append(mask.sum(dim=1).tolist())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    config = write_config(tmp_path, tiny_model_dir, run_dir, toy_data_dir)
    args = infer_args(str(config), [])
    metrics = run_predict(args)

    # 4 prompts in batches of 3, longest first
    lengths = [n for batch in batches for n in batch]
    assert [len(b) for b in batches] == [3, 1] and lengths == sorted(lengths, reverse=True)
    out = tmp_path / "predictions"
    rows = read_jsonl(out / "generated_predictions.jsonl")
    references = json.loads((toy_data_dir / "heldout.json").read_text())
    assert [r["label"] for r in rows] == [r["output"] for r in references]  # dataset order
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    assert sum(bool(r["predict"]) for r in rows) >= 3
    # each answer is what the engine (one prompt at a time, greedy, same adapter) generates
    engine = load_engine(args)
    try:
        for row, ref in zip(rows, references, strict=True):
            messages = [
                {"role": "system", "content": ref["system"]},
                {"role": "user", "content": ref["instruction"]},
            ]
            assert row["predict"] == engine.generate(messages).choices[0].text.strip()
    finally:
        engine.close()
    saved = json.loads((out / "predict_results.json").read_text())
    for key in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"):
        assert saved[key] == metrics[key] and 0 <= saved[key] <= 100


def test_predict_command_on_a_run_dir(run_dir, toy_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(run_dir), f"dataset_dir={toy_data_dir}", "eval_dataset=toy_heldout", "max_new_tokens=2"]
    assert main(argv) == 0
    rows = read_jsonl(run_dir / "predict" / "generated_predictions.jsonl")  # beside the run, not over it
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "predict", "label"}
    captured = capsys.readouterr()
    assert "4 predictions written to" in captured.out
    assert "100%" in captured.err  # the progress bar


def test_predict_without_data_is_refused(tmp_path, tiny_model_dir, run_dir, toy_data_dir):
    config = write_config(tmp_path, tiny_model_dir, run_dir, toy_data_dir, eval_dataset=None)
    with pytest.raises(SftflowError, match="needs data"):
        run_predict(infer_args(str(config), []))
    with pytest.raises(SftflowError, match="always generates"):
        main([str(config), "predict_with_generate=false"])
