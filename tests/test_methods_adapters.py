"""Adapter-side methods (model/adapter.py) are really on: PiSSA's adapter + residual reproduce the weights and
its conversion works on the original base; OFT trains its blocks; LLaMA Pro trains only the expanded
blocks; NEFTune noise is on in training and off in eval."""

from __future__ import annotations

import pytest
import torch

from helpers import as_overrides
from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.model.adapter import apply_finetuning, llama_pro_layers, save_pissa_converted
from sftflow.model.loader import load_model

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


def setup(model_dir, tokenizer, **ft):
    args = ModelArguments(model_name_or_path=str(model_dir))
    return apply_finetuning(load_model(args), args, FinetuningArguments(**ft), tokenizer=tokenizer)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_pissa_adapter_plus_residual_reproduce_the_weights(tiny_model_dir, tiny_tokenizer):
    original = dict(load_model(ModelArguments(model_name_or_path=str(tiny_model_dir))).named_parameters())
    model = setup(tiny_model_dir, tiny_tokenizer, lora_rank=4, pissa_init=True, pissa_iter=-1)
    layers = lora_layers(model)
    assert len(layers) == 14
    for name, layer in layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert b.abs().sum() > 0  # plain LoRA starts with B = 0; PiSSA with the top singular vectors
        residual = layer.base_layer.weight
        key = name.removeprefix("base_model.model.") + ".weight"
        assert not torch.allclose(residual, original[key])  # the base holds the residual ...
        rebuilt = residual + layer.scaling["default"] * b @ a  # ... and adapter + residual = the weight
        torch.testing.assert_close(rebuilt, original[key], atol=1e-5, rtol=1e-4)
        # the adapter holds the principal part: its norm is the top-4 singular values' share
        top = torch.linalg.svdvals(original[key])[:4]
        assert torch.allclose(
            torch.linalg.matrix_norm(layer.scaling["default"] * b @ a), top.norm(), rtol=1e-3
        )


def test_pissa_convert_gives_a_plain_lora_for_the_original_base(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel

    model = setup(tiny_model_dir, tiny_tokenizer, lora_rank=2, pissa_init=True, pissa_iter=4)
    model.save_pretrained(tmp_path / "pissa_init")
    torch.manual_seed(0)
    with torch.no_grad():  # "training": move every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    trained = logits(model)
    out = save_pissa_converted(model, tmp_path, tmp_path / "pissa_init")
    base = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    converted = PeftModel.from_pretrained(base, out)
    assert converted.peft_config["default"].r == 4  # rank 2r
    torch.testing.assert_close(logits(converted), trained, atol=1e-4, rtol=1e-4)


def test_oft_trains_its_orthogonal_blocks(tiny_model_dir, tiny_tokenizer):
    model = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="oft", oft_block_size=16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".oft_" in n for n in trainable)
    assert type(model.peft_config["default"]).__name__ == "OFTConfig"
    before_out = logits(model)
    torch.testing.assert_close(before_out, logits(model))  # identity rotation at init ...
    before = {n: p.detach().clone() for n, p in trainable.items()}
    model.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    assert not torch.allclose(logits(model), before_out)  # ... trained rotations change the output


def four_layer_model(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def test_llama_pro_trains_only_the_expanded_blocks(tmp_path, tiny_tokenizer):
    path = four_layer_model(tmp_path, tiny_tokenizer)
    assert llama_pro_layers(4, 2) == [1, 3]
    frozen = setup(
        path, tiny_tokenizer, finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=2
    )
    layers = {n.split(".")[2] for n, p in frozen.named_parameters() if p.requires_grad}
    assert layers == {"1", "3"}
    lora = setup(path, tiny_tokenizer, finetuning_type="lora", use_llama_pro=True, freeze_trainable_layers=2)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * 2  # A and B of 7 linears in each of 2 blocks
    assert {n.split("layers.")[1].split(".")[0] for n in trained} == {"1", "3"}


def test_neftune_noise_is_on_in_training_and_off_in_eval(tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from transformers import Seq2SeqTrainingArguments

    from sftflow.data.collator import SftCollator
    from sftflow.train.trainer import SftflowTrainer

    model = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="full")
    rows = Dataset.from_list(
        [{"input_ids": r, "labels": r, "attention_mask": [1] * 7} for r in IDS.tolist()] * 2
    )
    seen: list[tuple[bool, bool]] = []  # (training, embeddings as the first layer sees them == clean)

    def check(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        clean = model.get_input_embeddings().weight[captured[-1]]
        seen.append((module.training, torch.allclose(hidden.reshape(clean.shape), clean)))

    captured: list[torch.Tensor] = []
    model.model.register_forward_pre_hook(lambda m, a, k: captured.append(k["input_ids"]), with_kwargs=True)
    model.model.layers[0].register_forward_pre_hook(check, with_kwargs=True)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        neftune_noise_alpha=5.0,
        max_steps=2,
        per_device_train_batch_size=2,
        eval_strategy="steps",
        eval_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = SftflowTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=SftCollator(tiny_tokenizer.pad_token_id),
        fast_loss=False,
    )
    trainer.train()
    assert {flag for training, flag in seen if training} == {False}  # noisy in every training forward
    assert {flag for training, flag in seen if not training} == {True}  # clean in eval


@pytest.mark.integration
def test_sft_with_pissa_convert_writes_an_adapter_for_the_original_base(
    tmp_path, tiny_model_dir, toy_data_dir
):
    from peft import PeftModel

    from sftflow.config import load_args
    from sftflow.stages.registry import run_stage

    config = {
        "model_name_or_path": tiny_model_dir,
        "dataset_dir": toy_data_dir,
        "dataset": "toy",
        "cutoff_len": 64,
        "lora_rank": 2,
        "pissa_init": True,
        "pissa_convert": True,
        "pissa_iter": -1,
        "output_dir": tmp_path / "out",
        "do_train": True,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "report_to": "none",
        "plot_loss": False,
        "tokenized_cache_dir": tmp_path / "cache",
    }
    run_stage(load_args(None, as_overrides(config)))
    out = tmp_path / "out"
    base = lambda: load_model(ModelArguments(model_name_or_path=str(tiny_model_dir)))  # noqa: E731
    converted = PeftModel.from_pretrained(base(), out / "pissa_converted")
    assert converted.peft_config["default"].r == 4
    # the trained adapter in output_dir (PEFT redoes the PiSSA split of the base when it loads it) and the
    # converted plain LoRA on the untouched base give the same model, which differs from the base
    trained = PeftModel.from_pretrained(base(), out)
    torch.testing.assert_close(logits(converted), logits(trained), atol=2e-3, rtol=1e-3)
    assert not torch.allclose(logits(converted), logits(base()), atol=1e-3)
