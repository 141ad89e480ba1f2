"""Tuning types: LoRA options, freeze selection, gradient checkpointing for every type, fp32 trainable
parameters, continuing and stacking adapters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.errors import SftflowError
from sftflow.model.adapter import adapter_paths, apply_finetuning
from sftflow.model.loader import load_model

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


def setup(path: Path, tokenizer, model_kw: dict | None = None, gc: bool = False, gc_kwargs=None, **ft):
    args = ModelArguments(model_name_or_path=str(path), **(model_kw or {}))
    model = load_model(args)
    return apply_finetuning(
        model,
        args,
        FinetuningArguments(**ft),
        tokenizer=tokenizer,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs=gc_kwargs,
    )


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def save_random_adapter(model, tokenizer, out: Path, seed: int) -> Path:
    """Give every LoRA B (zero at init) random values so the adapter changes the output, and save it."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- LoRA options --------------------------------------------------------------------------------------


def test_lora_all_targets_every_linear_but_the_head(tiny_model_dir, tiny_tokenizer):
    model = setup(tiny_model_dir, tiny_tokenizer, lora_rank=2)
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in trainable_names(model))


def test_lora_dora_rslora_and_additional_target(tiny_model_dir, tiny_tokenizer):
    model = setup(
        tiny_model_dir,
        tiny_tokenizer,
        lora_rank=4,
        lora_alpha=8,
        lora_target=["q_proj", "v_proj"],
        use_dora=True,
        use_rslora=True,
        additional_target=["norm"],
    )
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora and config.modules_to_save == ["norm"]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    names = trainable_names(model)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in names)
    assert not any("k_proj" in n for n in names)
    with pytest.raises(SftflowError, match=r"additional_target \['nope'\]"):
        setup(tiny_model_dir, tiny_tokenizer, additional_target=["nope"])
    with pytest.raises(SftflowError, match=r"lora_target \['qkv'\] not found"):
        setup(tiny_model_dir, tiny_tokenizer, lora_target=["qkv"])


# --- freeze --------------------------------------------------------------------------------------------


def test_freeze_selects_layers_modules_and_extras(tiny_model_dir, tiny_tokenizer):
    last = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="freeze", freeze_trainable_layers=1)
    assert trainable_names(last) and all(n.startswith("model.layers.1.") for n in trainable_names(last))
    first = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="freeze", freeze_trainable_layers=-1)
    assert all(n.startswith("model.layers.0.") for n in trainable_names(first))
    mlp = setup(
        tiny_model_dir,
        tiny_tokenizer,
        finetuning_type="freeze",
        freeze_trainable_layers=1,
        freeze_trainable_modules=["mlp"],
        freeze_extra_modules=["norm"],
    )
    assert sorted(trainable_names(mlp)) == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    with pytest.raises(SftflowError, match=r"freeze_trainable_modules \['attn'\] not found"):
        setup(tiny_model_dir, tiny_tokenizer, finetuning_type="freeze", freeze_trainable_modules=["attn"])
    with pytest.raises(SftflowError, match="selects no layer"):
        setup(tiny_model_dir, tiny_tokenizer, finetuning_type="freeze", freeze_trainable_layers=0)


# --- gradient checkpointing and fp32 trainable params --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model_kw", "gc_kwargs"),
    [
        ("lora", {}, None),
        ("lora", {}, {"use_reentrant": True}),  # needs the input-grad hook, or LoRA gets no gradient
        ("full", {"dtype": "bfloat16"}, None),
        ("freeze", {}, {"use_reentrant": True}),
        ("qlora", {"quantization_bit": 4}, None),
    ],
)
def test_gradient_checkpointing_gives_every_trainable_param_a_gradient(
    tiny_model_dir, tiny_tokenizer, kind, model_kw, gc_kwargs
):
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    ft = {"finetuning_type": "lora" if kind == "qlora" else kind, "freeze_trainable_layers": 1}
    if kind == "lora" and gc_kwargs is None:
        assert not setup(
            tiny_model_dir, tiny_tokenizer, model_kw, **ft
        ).is_gradient_checkpointing  # off by default
    model = setup(tiny_model_dir, tiny_tokenizer, model_kw, gc=True, gc_kwargs=gc_kwargs, **ft)
    assert model.is_gradient_checkpointing
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    if kind == "lora" or kind == "qlora":  # LoRA B starts at zero, so A gets no gradient in step one
        with torch.no_grad():
            for n, p in params.items():
                if "lora_B" in n:
                    p.fill_(0.01)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --- continuing and stacking adapters ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tiny_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("adapters")
    a = save_random_adapter(setup(tiny_model_dir, tiny_tokenizer, lora_rank=2), tiny_tokenizer, out / "a", 1)
    b = save_random_adapter(
        setup(tiny_model_dir, tiny_tokenizer, lora_rank=4, lora_target=["q_proj", "o_proj"]),
        tiny_tokenizer,
        out / "b",
        2,
    )
    return a, b


def reference_logits(tiny_model_dir, paths) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for path in paths:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return logits(model)


def test_continue_training_an_adapter(tiny_model_dir, tiny_tokenizer, two_adapters):
    a, _ = two_adapters
    model = setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": str(a)}, lora_rank=16)
    assert model.peft_config["default"].r == 2  # the adapter's own rank, not lora_rank
    assert trainable_names(model) and all("lora_" in n for n in trainable_names(model))
    torch.testing.assert_close(logits(model), reference_logits(tiny_model_dir, [a]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("create_new", [False, True])
def test_stack_adapters(tiny_model_dir, tiny_tokenizer, two_adapters, create_new):
    a, b = two_adapters
    model = setup(
        tiny_model_dir,
        tiny_tokenizer,
        {"adapter_name_or_path": f"{a},{b}"},
        lora_rank=8,
        create_new_adapter=create_new,
    )
    # a merged; b continued (rank 4), or both merged and a fresh rank-8 adapter (B = 0: no change yet)
    assert model.peft_config["default"].r == (8 if create_new else 4)
    torch.testing.assert_close(logits(model), reference_logits(tiny_model_dir, [a, b]), atol=1e-5, rtol=0)


def test_adapter_mistakes_are_clear(tiny_model_dir, tiny_tokenizer, two_adapters, tmp_path):
    a, b = two_adapters
    assert adapter_paths(f" {a} ,{b},") == [str(a), str(b)]
    with pytest.raises(SftflowError, match="works with finetuning_type: lora, not full"):
        setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": str(a)}, finetuning_type="full")
    with pytest.raises(SftflowError, match="not a PEFT adapter dir"):
        setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": str(tmp_path)})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(SftflowError, match="only pickle weights"):
        setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": str(pickled)})


def test_quantized_base_accepts_one_adapter_only(tiny_model_dir, tiny_tokenizer, two_adapters):
    pytest.importorskip("bitsandbytes")
    a, b = two_adapters
    with pytest.raises(SftflowError, match="quantized base cannot have adapters merged"):
        setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": f"{a},{b}", "quantization_bit": 4})
    model = setup(tiny_model_dir, tiny_tokenizer, {"adapter_name_or_path": str(a), "quantization_bit": 4})
    assert trainable_names(model) and all("lora_" in n for n in trainable_names(model))
