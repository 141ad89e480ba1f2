"""Shared fixtures: a tiny BPE tokenizer with a chat template, a tiny random Llama, the real SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TOY_ROWS, build_tokenizer, make_run_dir, write_alpaca


def build_model(tokenizer, save_dir: Path, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(save_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 64) with the tiny tokenizer: a valid model_name_or_path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(path)
    build_model(tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def toy_data_dir(tmp_path) -> Path:
    """A dataset_dir with a registry, 18 training rows and 4 held-out rows (alpaca)."""
    write_alpaca(tmp_path / "train.json", TOY_ROWS)
    write_alpaca(tmp_path / "heldout.json", TOY_ROWS[:4])
    registry = {
        "toy": {"file_name": "train.json"},
        "toy_heldout": {"file_name": "heldout.json", "formatting": "alpaca"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path


@pytest.fixture(scope="session")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished LoRA run dir on the tiny model (helpers.make_run_dir), made once and shared by the
    inference modules; read-only: a module that writes into its run dir, or needs other settings, makes
    its own."""
    return make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once (atomically) into the shared sftflow cache."""
    from sftflow.errors import SftflowError
    from sftflow.model.loader import resolve_model_path

    try:
        return Path(resolve_model_path("smollm2-135m-instruct"))
    except SftflowError as exc:
        pytest.fail(f"the slow tests need the bundled model: {exc}")
