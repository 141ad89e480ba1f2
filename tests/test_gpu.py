"""Checks that need a CUDA GPU (marker `gpu`; each skips cleanly without one): run by
benchmarks/gpu_check.sh on a GPU machine.

- bf16: the trained-token loss (fused head and kept logits) equals the model's own loss within bf16
  tolerance, on the GPU's kernels;
- packed rows: `sftflow_sdpa` (one batched sdpa call over the right-padded examples on accelerators) and
  torch's flash varlen kernel equal each example run alone;
- QLoRA: a 4-bit (bitsandbytes) LoRA training step runs through sftflow and saves a checked adapter;
- serving: the serving engine's greedy answer equals `generate` on the same model.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16_TOL = 2e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, summed over a few layers


def llama(vocab: int = 512, hidden: int = 256, layers: int = 2, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def padded_batch(lengths: list[int], vocab: int = 512, prompt: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {k: v.cuda() for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def test_bf16_trained_token_loss_equals_the_models_own_loss():
    from sftflow.train.loss import causal_lm_loss

    model = llama()
    inputs = padded_batch([40, 64, 17, 33])
    with torch.no_grad():
        reference = model(**inputs).loss.float().item()
        fused = causal_lm_loss(model, inputs, fused_head=True)[0].float().item()
        kept = causal_lm_loss(model, inputs, fused_head=False)[0].float().item()
    assert abs(fused - reference) <= BF16_TOL * abs(reference), (fused, reference)
    assert abs(kept - reference) <= BF16_TOL * abs(reference), (kept, reference)


def test_sftflow_sdpa_packed_row_equals_each_example_alone():
    from sftflow.train.attention import segment_attention, uses_segment_attention
    from sftflow.train.loss import causal_lm_loss

    model = llama()
    lengths = [40, 64, 17, 33]
    inputs = padded_batch(lengths)
    with torch.no_grad():
        # each example alone: its own sum of token losses
        alone = 0.0
        for row, n in enumerate(lengths):
            one = {k: v[row : row + 1, :n] for k, v in inputs.items()}
            trained = int(one["labels"][0, 1:].ne(-100).sum())
            alone += model(**one).loss.float().item() * trained
        alone /= int(inputs["labels"][:, 1:].ne(-100).sum())
        with segment_attention(model) as switched:
            assert switched and uses_segment_attention(model)
            packed = causal_lm_loss(model, inputs)[0].float().item()
    assert abs(packed - alone) <= BF16_TOL * abs(alone), (packed, alone)


@pytest.mark.skipif(
    importlib.util.find_spec("torch.nn.attention.varlen") is None, reason="no torch varlen_attn"
)
def test_flash_varlen_equals_each_example_alone():
    import torch.nn.functional as F
    from torch.nn.attention.varlen import varlen_attn

    lengths = [40, 64, 17, 33]
    heads, dim = 4, 64
    total = sum(lengths)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    packed = varlen_attn(q, k, v, starts, starts, max(lengths), max(lengths), window_size=(-1, 0))
    for (a, b), n in zip(zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True), lengths, strict=True):
        one = F.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v)), is_causal=True
        )[0].transpose(0, 1)
        assert one.shape == (n, heads, dim)
        torch.testing.assert_close(packed[a:b].float(), one.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_4bit_step(tmp_path, tiny_model_dir, toy_data_dir):
    from safetensors.torch import load_file

    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft

    values = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "quantization_bit": 4,
        "lora_target": "all",
        "lora_rank": 4,
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "do_train": True,
        "bf16": True,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "preview_rows": 0,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    result = run_sft(load_args(tmp_path / "run.yaml"))
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())


def test_serving_engine_greedy_equals_generate(tmp_path, tiny_model_dir):
    """The batched serving engine (as `sftflow api` runs it) on the GPU answers greedily what `generate`
    answers on the same loaded model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftflow.config.run_dir import infer_args
    from sftflow.infer.engine import load_engine
    from sftflow.infer.requests import SamplingParams

    run = tmp_path / "run"  # what `sftflow train` leaves: an adapter, the tokenizer, sftflow_args.yaml
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(run)
    args = {"model_name_or_path": str(tiny_model_dir), "cutoff_len": 128, "max_new_tokens": 8}
    (run / "sftflow_args.yaml").write_text(yaml.safe_dump(args))

    engine = load_engine(infer_args(str(run), []), batched=True)
    try:
        assert next(engine.model.parameters()).is_cuda
        question = [{"role": "user", "content": "What is two plus two?"}]
        answer = engine.generate(question, SamplingParams(max_new_tokens=8)).choices[0]
        prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device="cuda")
        with torch.no_grad():
            expected = engine.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert answer.text == tokenizer.decode(expected[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    finally:
        engine.close()
