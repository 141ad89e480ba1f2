"""`sftflow export`: merged logits == base + adapters, a standard sharded HF dir, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import ADAPTER_TEMPLATE, make_adapter
from sftflow.cli import main as cli_main
from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.export import export_model
from sftflow.model.loader import load_model, load_tokenizer

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("export-adapters")
    a = make_adapter(tiny_model_dir, out / "a", 1, lora_rank=2)
    b = make_adapter(
        tiny_model_dir, out / "b", 2, lora_rank=4, use_dora=True, lora_target=["q_proj", "down_proj"]
    )
    return a, b


def base_plus_adapters_logits(base: Path, paths: list[Path]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for path in paths[:-1]:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model = PeftModel.from_pretrained(model, paths[-1])  # the last one unmerged: the runtime sum
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def test_cli_export_merges_stacked_adapters_into_a_plain_hf_dir(tiny_model_dir, adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = adapters
    export_dir = tmp_path / "merged"
    config = tmp_path / "export.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "adapter_name_or_path": f"{a},{b}",
                "export_dir": str(export_dir),
                "export_size": 0.0001,  # 100 kB shards: the tiny model needs several
            }
        )
    )
    assert cli_main(["export", str(config)]) == 0

    shards = sorted(p.name for p in export_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (export_dir / "model.safetensors.index.json").is_file()
    assert not list(export_dir.glob("*.bin")) and not (export_dir / "adapter_config.json").exists()
    assert all(p.stat().st_size <= 100_000 + 30_000 for p in export_dir.glob("*.safetensors"))

    merged = AutoModelForCausalLM.from_pretrained(export_dir)  # plain transformers, no PEFT
    merged.eval()
    with torch.no_grad():
        got = merged(IDS).logits
    expected = base_plus_adapters_logits(tiny_model_dir, [a, b])
    assert (got - expected).abs().max().item() <= 1e-4
    assert merged.dtype == torch.float32  # auto: the base checkpoint's own dtype

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert tokenizer.chat_template == ADAPTER_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = merged.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert merged.generation_config.pad_token_id == tokenizer.pad_token_id
    assert json.loads((export_dir / "config.json").read_text())["use_cache"] is True


def test_export_refuses_a_quantized_base(tiny_model_dir, adapters, tmp_path, capsys):
    a, _ = adapters
    args = ["export", f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={a}"]
    assert cli_main([*args, f"export_dir={tmp_path / 'x'}", "quantization_bit=4"]) == 2
    assert "cannot merge into a quantized base" in capsys.readouterr().err

    quantized = tmp_path / "prequantized"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(SftflowError, match="holds quantized weights"):
        export_model(ModelArguments(model_name_or_path=str(quantized), export_dir=str(tmp_path / "y")))
    assert cli_main(["export", f"model_name_or_path={tiny_model_dir}"]) == 2
    assert "export_dir is required" in capsys.readouterr().err


def test_export_dtype_and_overwrite(tiny_model_dir, adapters, tmp_path):
    from safetensors import safe_open

    a, _ = adapters
    export_dir = tmp_path / "merged"
    args = ModelArguments(
        model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(a), export_dir=str(export_dir)
    )
    export_model(args)
    stale = export_dir / "model-00009-of-00009.safetensors"
    stale.write_bytes(b"old shard")
    with pytest.raises(SftflowError, match="already holds files"):
        export_model(args)
    args.dtype = "bfloat16"
    export_model(args, overwrite=True)
    assert not stale.exists()
    with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_export_adapter_with_new_tokens(tiny_model_dir, tmp_path):
    """An adapter trained with new_special_tokens holds only the new rows; export resizes the base to the
    adapter's tokenizer and merges them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ModelArguments(model_name_or_path=str(tiny_model_dir), new_special_tokens=["<tool>"])
    tokenizer = load_tokenizer(args)
    model = apply_finetuning(
        load_model(args, tokenizer), args, FinetuningArguments(lora_rank=2), tokenizer=tokenizer
    )
    new_id = tokenizer.convert_tokens_to_ids("<tool>")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.fill_(0.5)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter, save_embedding_layers=False)
    tokenizer.save_pretrained(adapter)

    export_dir = tmp_path / "merged"
    export_model(
        ModelArguments(
            model_name_or_path=str(tiny_model_dir),
            adapter_name_or_path=str(adapter),
            export_dir=str(export_dir),
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(export_dir)
    assert merged.get_input_embeddings().weight.shape[0] == new_id + 1
    assert torch.all(merged.get_input_embeddings().weight[new_id] == 0.5)
    assert AutoTokenizer.from_pretrained(export_dir).encode("<tool>", add_special_tokens=False) == [new_id]
