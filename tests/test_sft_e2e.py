"""End to end: `sftflow train` on a tiny random model trains, evaluates, predicts and writes every output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import train_config
from sftflow.config import load_args
from sftflow.errors import SftflowError


def write_config(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    values = {
        "eval_dataset": "toy_heldout",
        "cutoff_len": 128,
        "lora_target": "all",
        "lora_rank": 4,
        "do_eval": True,
        "do_predict": True,
        "predict_with_generate": True,
        "max_new_tokens": 8,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "learning_rate": 5e-3,
        "max_steps": 6,
        "logging_steps": 1,
        **overrides,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(train_config(model_dir, data_dir, tmp_path / "out", **values)))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "sftflow.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_cli_train_eval_predict_writes_every_output(tmp_path, tiny_model_dir, toy_data_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(tmp_path, tiny_model_dir, toy_data_dir)
    proc = run_cli("train", str(config), "seed=7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "sftflow_args.yaml",
        "train_results.json",
        "eval_results.json",
        "predict_results.json",
        "all_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "training_eval_loss.png",
        "generated_predictions.jsonl",
        "generated_predictions_base.jsonl",
    ]:
        assert (out / name).is_file(), f"{name} missing"

    predict = json.loads((out / "predict_results.json").read_text())
    for key in (
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
        "predict_bleu-4",
        "predict_base_rouge-l",
    ):
        assert 0 <= predict[key] <= 100
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_tokens_per_second"] > 0
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) == {"prompt", "predict", "label"}
    assert lines[0]["label"] == "1 plus 1 is 2. Wren"  # dataset order is kept
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((out / "sftflow_args.yaml").read_text())["seed"] == 7
    assert "sftflow: run finished" in proc.stdout and "base model:" in proc.stdout

    # The adapter is a standard PEFT dir, its LoRA weights moved away from their init (B starts at 0).
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert not torch.allclose(base(ids).logits, tuned(ids).logits)
    # The saved tokenizer carries the chat template used in training.
    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    )


@pytest.mark.integration
def test_generate_only_sees_prompts(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    from transformers import AutoTokenizer, GenerationMixin

    from sftflow.stages.sft import run_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen: list[list[int]] = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
        assert (mask[:, -1] == 1).all(), "generation batches must be left-padded"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    config = write_config(
        tmp_path, tiny_model_dir, toy_data_dir, do_train=False, do_eval=False, compare_base=False
    )
    run_sft(load_args(config))
    assert len(seen) == 4
    rows = json.loads((toy_data_dir / "heldout.json").read_text())
    for row in rows:
        messages = [
            {"role": "system", "content": row["system"]},
            {"role": "user", "content": row["instruction"]},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert prompt_ids in seen  # exactly the prompt: no response token reached generate


@pytest.mark.integration
def test_cli_prints_user_errors_without_traceback(tmp_path, tiny_model_dir, toy_data_dir):
    config = write_config(tmp_path, tiny_model_dir, toy_data_dir)
    proc = run_cli("train", str(config), "lora_rnak=4", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sftflow error: unknown key 'lora_rnak'. Did you mean 'lora_rank'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier run")
    proc = run_cli("train", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "overwrite_output_dir" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier run"


@pytest.mark.integration
def test_cli_help_lists_keys_fast(tmp_path):
    proc = run_cli("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "lora_target" in proc.stdout and "learning_rate" in proc.stdout


def test_bad_lora_target_is_refused(tmp_path, tiny_model_dir, toy_data_dir):
    from sftflow.stages.sft import run_sft

    config = write_config(tmp_path, tiny_model_dir, toy_data_dir, lora_target="q_proj,qkv")
    with pytest.raises(SftflowError, match=r"lora_target \['qkv'\] not found.*q_proj"):
        run_sft(load_args(config))
