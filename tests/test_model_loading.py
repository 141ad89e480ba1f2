"""Model loading: dtype rule, attention kernels, remote code, pickle refusal, hub errors, new tokens,
and 4-/8-bit bitsandbytes loading with LoRA training through the HF Trainer on CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.errors import SftflowError
from sftflow.model import loader
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import load_model, load_tokenizer, resolve_dtype, resolve_model_path


def model_args(path: Path, **kwargs) -> ModelArguments:
    return ModelArguments(model_name_or_path=str(path), **kwargs)


# --- dtype ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "bf16", "name", "expected"),
    [
        (False, False, "auto", torch.float32),
        (True, True, "auto", torch.bfloat16),
        (True, False, "auto", torch.float16),
        (False, False, "bfloat16", torch.bfloat16),
        (True, True, "float16", torch.float16),
        (True, True, "float32", torch.float32),
    ],
)
def test_dtype_rule(monkeypatch, cuda, bf16, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype(name) is expected


def test_explicit_bf16_is_honoured_and_trainable_params_are_fp32(tiny_model_dir, tiny_tokenizer):
    args = model_args(tiny_model_dir, dtype="bfloat16")
    model = load_model(args)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = apply_finetuning(model, args, FinetuningArguments(lora_rank=2), tokenizer=tiny_tokenizer)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all("lora_" in n for n in trainable)
    assert frozen == {torch.bfloat16}


# --- attention, remote code, pickles, paths, hub -------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attn_implementation_is_passed(tiny_model_dir, attn):
    model = load_model(model_args(tiny_model_dir, attn_implementation=attn))
    assert model.config._attn_implementation == attn


def test_flash_attention_needs_the_package_and_a_gpu(tiny_model_dir, monkeypatch):
    real_find_spec = loader.importlib.util.find_spec
    monkeypatch.setattr(
        loader.importlib.util,
        "find_spec",
        lambda name: None if name == "flash_attn" else real_find_spec(name),
    )
    with pytest.raises(SftflowError, match="flash-attn package"):
        load_model(model_args(tiny_model_dir, attn_implementation="flash_attention_2"))
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SftflowError, match="only on CUDA GPUs"):
        load_model(model_args(tiny_model_dir, attn_implementation="flash_attention_2"))


CUSTOM_MODELING = """
from transformers import LlamaForCausalLM
from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""

CUSTOM_CONFIG = """
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "sftflow_test_custom"
"""


def test_remote_code_runs_only_when_asked(tiny_model_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    (custom / "modeling_custom.py").write_text(CUSTOM_MODELING)
    (custom / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "sftflow_test_custom"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(SftflowError, match="trust_remote_code: true"):
        load_model(model_args(custom))
    assert not any(name.endswith("modeling_custom") for name in sys.modules)
    model = load_model(model_args(custom, trust_remote_code=True))
    assert type(model).__name__ == "CustomForCausalLM"


def test_pickle_weights_need_opt_in(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, pickled / name)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SftflowError, match=r"pickle weights \(pytorch_model.bin\).*use_safetensors: false"):
        load_model(model_args(pickled))
    model = load_model(model_args(pickled, use_safetensors=False))
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_local_path_errors(tmp_path):
    with pytest.raises(SftflowError, match="model path not found"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(SftflowError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(SftflowError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path), gguf_file="model.Q4_0.gguf")
    with pytest.raises(SftflowError, match="gguf_file needs model_name_or_path to be a local dir"):
        resolve_model_path(str(tmp_path / "nope"), gguf_file="model.gguf")


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SftflowError, match=r"(?s)HF_HUB_OFFLINE is set.*point model_name_or_path at the local dir"
    ):
        load_tokenizer(ModelArguments(model_name_or_path="sftflow-test-org/no-such-model"))


# --- new special tokens --------------------------------------------------------------------------------


def test_new_special_tokens_resize_and_train_only_their_rows(tiny_model_dir):
    from peft import PeftModel  # noqa: F401  (the merged result below is a plain model)

    args = model_args(tiny_model_dir, new_special_tokens=["<tool>", "</tool>"])
    tokenizer = load_tokenizer(args)
    base_vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(["<tool>", "</tool>"]) == [base_vocab, base_vocab + 1]
    assert tokenizer.encode("<tool>", add_special_tokens=False) == [base_vocab]  # one token, never split
    model = load_model(args, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == base_vocab + 2
    before = model.get_input_embeddings().weight.detach().clone()
    model = apply_finetuning(model, args, FinetuningArguments(lora_rank=2), tokenizer=tokenizer)
    deltas = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert [tuple(p.shape) for p in deltas.values()] == [(2, 64)]  # the 2 new rows, not the whole matrix
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[5, base_vocab, 7, base_vocab + 1, 9]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    merged = model.merge_and_unload()
    after = merged.get_input_embeddings().weight
    assert torch.equal(after[:base_vocab], before[:base_vocab])
    assert not torch.allclose(after[base_vocab:], before[base_vocab:])
    assert merged.get_output_embeddings().weight is after  # still tied


# --- bitsandbytes --------------------------------------------------------------------------------------


def train_with_hf_trainer(model, tokenizer, tmp_path: Path, steps: int = 2) -> list[float]:
    """A few optimizer steps through the HF Trainer; returns the logged losses."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from sftflow.data.collator import SftCollator

    ids = tokenizer.encode("What is two plus two? Two plus two is four.")
    data = Dataset.from_dict({"input_ids": [ids] * 4, "labels": [ids] * 4})
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=SftCollator(tokenizer.pad_token_id)
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize(
    ("bits", "quant_type", "layer_class"),
    [(4, "nf4", "Linear4bit"), (4, "fp4", "Linear4bit"), (8, "nf4", "Linear8bitLt")],
)
def test_quantized_lora_trains_on_cpu(
    tiny_model_dir, tiny_tokenizer, tmp_path, bits, quant_type, layer_class
):
    pytest.importorskip("bitsandbytes")
    args = model_args(tiny_model_dir, quantization_bit=bits, quantization_type=quant_type)
    model = load_model(args)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_class
    if bits == 4:
        assert q_proj.weight.quant_state.quant_type == quant_type
        assert q_proj.weight.quant_state.nested  # double quantization
    model = apply_finetuning(
        model, args, FinetuningArguments(lora_rank=4), tokenizer=tiny_tokenizer, gradient_checkpointing=True
    )
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    losses = train_with_hf_trainer(model, tiny_tokenizer, tmp_path)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert len(changed) == len(lora_b)  # every LoRA B matrix (zero at init) moved
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer_class


def test_bitsandbytes_missing_or_broken_is_a_clear_error(tiny_model_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    with pytest.raises(SftflowError, match=r"bitsandbytes .* cannot run on cpu \(RuntimeError: no kernel"):
        load_model(model_args(tiny_model_dir, quantization_bit=4))
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SftflowError, match=r"needs bitsandbytes: pip install 'sftflow\[quant\]'"):
        load_model(model_args(tiny_model_dir, quantization_bit=8))
