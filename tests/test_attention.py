"""Padding-free attention (sftflow.train.attention): per-example sdpa on the flattened rows of the
trained-token loss gives the same loss and LoRA gradients as the model's own loss with plain sdpa, on
both of its layouts; models it must not touch keep their own attention."""

from __future__ import annotations

import doctest

import pytest
import torch

from helpers import TOL, assert_close, examples, lora_grads, lora_model, one_layer_config
from sftflow.data.collator import PackedCollator, SftCollator
from sftflow.data.packing import pack_rows
from sftflow.train import attention, loss
from sftflow.train.attention import NAME, segment_attention, segment_index, sequence_starts
from sftflow.train.loss import causal_lm_loss


def test_docstring_examples_hold():
    for module in (attention, loss):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_starts_and_layout_indices():
    starts, longest = sequence_starts(torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]]))
    assert starts.tolist() == [0, 3, 4, 8] and longest == 4
    gather, scatter, rows, width = segment_index(starts, longest)
    assert (rows, width) == (3, 4)
    # padding repeats each example's last token; scatter finds every token's slot in the padded layout
    assert gather.view(rows, width).tolist() == [[0, 1, 2, 2], [3, 3, 3, 3], [4, 5, 6, 7]]
    assert scatter.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert gather[scatter].tolist() == list(range(8))


@pytest.mark.parametrize("layout", ["per_example", "padded"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded_batch", "packed_rows"])
def test_segment_attention_matches_the_model_loss(
    tiny_model_dir, tiny_tokenizer, monkeypatch, layout, packed
):
    monkeypatch.setattr(attention, "per_example_calls", lambda query: layout == "per_example")
    model = lora_model(tiny_model_dir)
    rows = examples(tiny_tokenizer)
    padded = SftCollator(tiny_tokenizer.pad_token_id)(rows)
    batch = (
        PackedCollator(tiny_tokenizer.pad_token_id)([pack_rows(rows[:5]), pack_rows(rows[5:])])
        if packed
        else padded
    )

    reference = model(**padded, use_cache=False).loss  # plain sdpa, padded batch
    reference.backward()
    expected = lora_grads(model)

    calls = []
    real = attention.segment_sdpa
    monkeypatch.setattr(attention, "segment_sdpa", lambda *a, **k: calls.append(sorted(k)) or real(*a, **k))
    with segment_attention(model) as switched:
        assert switched and model.config._attn_implementation == NAME
        got, _ = causal_lm_loss(model, batch)
        got.backward()
    assert model.config._attn_implementation == "sdpa"  # put back
    assert calls and all("cu_seq_lens_q" in c for c in calls)  # the per-example path did run
    assert abs(got.item() - reference.item()) <= TOL
    assert_close(lora_grads(model), expected)


def test_without_segments_it_is_plain_sdpa(tiny_model_dir, tiny_tokenizer):
    """Eval and generation inside the block (padded batches, KV cache) see transformers' sdpa unchanged."""
    model = lora_model(tiny_model_dir).eval()
    batch = SftCollator(tiny_tokenizer.pad_token_id)(examples(tiny_tokenizer, 4))
    prompt = torch.tensor([tiny_tokenizer("What is 2 plus 2?")["input_ids"]])
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
        with segment_attention(model):
            assert torch.allclose(model(**batch).logits, logits, atol=TOL, rtol=0)
            assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), generated)


def test_gradient_checkpointing_carries_the_segments(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    batch = SftCollator(tiny_tokenizer.pad_token_id)(examples(tiny_tokenizer))
    model(**batch, use_cache=False).loss.backward()
    expected = lora_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    with segment_attention(model):
        got, _ = causal_lm_loss(model, batch)
        got.backward()
    assert_close(lora_grads(model), expected)


def test_eager_models_and_sliding_windows_are_left_alone(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = one_layer_config(tiny_tokenizer)
    eager = LlamaForCausalLM(LlamaConfig(**small, attn_implementation="eager"))
    with segment_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"

    # a sliding window narrower than the examples: the window comes with the mask, so the dense mask is used
    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(**small, sliding_window=3, attn_implementation="sdpa"))
    batch = SftCollator(tiny_tokenizer.pad_token_id)(examples(tiny_tokenizer, 4))
    reference = windowed(**batch, use_cache=False).loss
    with segment_attention(windowed) as switched:
        assert switched
        got, _ = causal_lm_loss(windowed, batch)
    assert abs(got.item() - reference.item()) <= TOL
