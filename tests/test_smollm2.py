"""The real bundled model (SmolLM2-135M-Instruct, converted once per machine): templating and a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftflow.config import load_args
from sftflow.data.encode import IGNORE_INDEX, encode_prompt, encode_sft

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Wren."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好！今天天气怎么样？"},
        {"role": "assistant", "content": "今天晴天 ☀️ 🙂"},
        {"role": "user", "content": "Write add in Python"},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"},
    ],
]


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_ids_equal_the_model_template_and_only_answers_are_trained(smol_tokenizer, conversation):
    tok = smol_tokenizer
    encoded = encode_sft(tok, conversation, cutoff_len=1024)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert encoded.input_ids == tok.encode(rendered, add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == end == tok.pad_token_id  # eos doubles as pad: labels must keep it
    expected = []
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            prompt = encode_prompt(tok, conversation[: i + 1], 1024)
            assert encoded.input_ids[: len(prompt)] == prompt  # each prompt prefix is a prefix of the ids
            expected += tok.encode(message["content"], add_special_tokens=False) + [end]
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == expected
    if conversation[0]["role"] != "system":  # the template injects its default system prompt
        assert "named SmolLM" in tok.decode(encoded.input_ids)


def test_short_lora_run_on_the_real_model(tmp_path, smollm2_dir):
    from sftflow.stages.sft import run_sft

    config = {
        "model_name_or_path": "smollm2-135m-instruct",
        "dataset_dir": str(PROJECT / "data"),
        "dataset": "wren_identity",
        "eval_dataset": "wren_identity_heldout",
        "max_samples": 8,
        "cutoff_len": 128,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "predict_with_generate": True,
        "max_new_tokens": 8,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "logging_steps": 1,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_sft(load_args(tmp_path / "run.yaml"))
    out = tmp_path / "out"
    losses = [
        e["loss"]
        for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
        if "loss" in e
    ]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert result.sample is not None and result.sample["label"].endswith("— Wren")
    assert len((out / "generated_predictions_base.jsonl").read_text().splitlines()) == 8
