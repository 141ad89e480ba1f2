"""stage: rm on a tiny random model: a learnable preference is learned, scores are written, the LoRA
adapter holds the score head, and the same outputs as sft are written."""

from __future__ import annotations

import json

import pytest

from helpers import pair_config
from sftflow.config import load_args

pytestmark = pytest.mark.integration  # both tests run the rm recipe


def test_rm_learns_the_preference_and_saves_the_score_head(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from sftflow.stages.registry import run_stage

    args = load_args(None, pair_config(tmp_path, tiny_model_dir, stage="rm", do_predict=True))
    result = run_stage(args)
    out = tmp_path / "out"
    for name in [
        "adapter_model.safetensors",
        "train_results.json",
        "eval_results.json",
        "predict_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "training_eval_loss.png",
        "generated_predictions.jsonl",
    ]:
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 10 and losses[0] > 0.5  # starts near log(2): the head is random
    # sftflow's throughput figures (both sequences of each pair counted), on every training log entry
    for entry in (e for e in log if "loss" in e):
        assert entry["tokens_per_second"] > 0 and entry["mfu"] > 0 and entry["peak_memory_gb"] > 0
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    # accuracy above chance on held-out pairs (8 pairs: 0.5 is chance)
    assert result.metrics["predict_accuracy"] >= 0.875
    assert result.metrics["eval_accuracy"] >= 0.875
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert (
        sum(r["chosen_score"] > r["rejected_score"] for r in rows) / 8 == result.metrics["predict_accuracy"]
    )
    assert rows[0]["chosen"].endswith("Wren") and "plus" in rows[0]["prompt"]
    # the adapter saves the (fully trained) score head besides the LoRA weights
    weights = load_file(out / "adapter_model.safetensors")
    assert any("score" in key and "lora" not in key for key in weights)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_rm_adapter_reloads_with_the_same_scores(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sftflow.stages.registry import run_stage

    args = load_args(None, pair_config(tmp_path, tiny_model_dir, stage="rm", max_steps=2, do_eval=False))
    run_stage(args)
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, out).eval()
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is 1 plus 1?"},
            {"role": "assistant", "content": "1 plus 1 is 2. Wren"},
        ],
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        reloaded = model(**ids).logits.item()
        # the score head is the trained one, not a fresh random head: disabling the adapter changes the score
        with model.disable_adapter():
            untrained = model(**ids).logits.item()
    assert reloaded != untrained
