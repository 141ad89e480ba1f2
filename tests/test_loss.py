"""The trained-token loss (sftflow.train.loss) is exact: same loss and LoRA gradients as the model's own
loss, and batch 8 x accumulation 1 equals batch 1 x accumulation 8 through the Trainer, padded and packed."""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, assert_close, examples, lora_grads, lora_model, one_layer_config
from sftflow.data.collator import PackedCollator, SftCollator
from sftflow.data.packing import pack_rows
from sftflow.train.loss import (
    causal_lm_loss,
    flatten_batch,
    linear_cross_entropy,
    output_head,
    supports_fast_loss,
)


def test_flatten_drops_padding_and_keeps_positions():
    flat = flatten_batch(
        {
            "input_ids": torch.tensor([[5, 6, 0], [0, 7, 8]]),
            "attention_mask": torch.tensor([[1, 1, 0], [0, 1, 1]]),  # right and left padding
            "labels": torch.tensor([[-100, 6, -100], [-100, -100, 8]]),
        }
    )
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1]]
    assert flat["targets"].tolist() == [[6, -100, 8, -100]]


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused_head", "kept_logits"])
def test_loss_and_lora_grads_equal_the_model_loss(tiny_model_dir, tiny_tokenizer, fused_head):
    model = lora_model(tiny_model_dir)
    batch = SftCollator(tiny_tokenizer.pad_token_id)(examples(tiny_tokenizer))
    assert supports_fast_loss(model, batch)

    reference = model(**batch, use_cache=False).loss  # transformers' own mean over trained tokens
    reference.backward()
    expected = lora_grads(model)

    loss, outputs = causal_lm_loss(model, batch, fused_head=fused_head)
    loss.backward()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    # no logits on prompt/padding; with the fused head only the one position that checks the head
    assert outputs.logits.shape == (1, 1 if fused_head else trained, model.config.vocab_size)
    assert abs(loss.item() - reference.item()) <= TOL
    assert_close(lora_grads(model), expected)


def test_packed_loss_equals_the_padded_loss(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    rows = examples(tiny_tokenizer)
    padded = SftCollator(tiny_tokenizer.pad_token_id)(rows)
    packed = PackedCollator(tiny_tokenizer.pad_token_id)([pack_rows(rows[:5]), pack_rows(rows[5:])])

    model(**padded, use_cache=False).loss.backward()
    expected = lora_grads(model)
    # the model's own loss on packed rows (block-diagonal mask from position_ids) and ours agree with it
    reference = model(**packed, use_cache=False).loss
    loss, _ = causal_lm_loss(model, packed)
    loss.backward()
    assert abs(loss.item() - reference.item()) <= TOL
    assert_close(lora_grads(model), expected)


@pytest.mark.parametrize("head_trains", [False, True], ids=["frozen_head", "trained_head"])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(head_trains):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=head_trains)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain * 0.5).backward()
    expected = (hidden.grad.clone(), weight.grad.clone() if head_trains else None)
    hidden.grad, weight.grad = None, None
    fused = linear_cross_entropy(hidden, weight, targets, chunk_elements=10 * 50)  # 4 chunks, the last short
    (fused * 0.5).backward()
    assert abs(fused.item() - plain.item()) <= 1e-4
    assert torch.allclose(hidden.grad, expected[0], atol=TOL, rtol=0)
    if head_trains:
        assert torch.allclose(weight.grad, expected[1], atol=1e-4, rtol=0)
    else:
        assert weight.grad is None


def test_a_head_that_is_not_plain_linear_gets_the_model_logits(tiny_tokenizer):
    """Gemma2 soft-caps its logits after the linear head: the one-position check sees it and the loss
    uses the model's own (capped) logits instead of fusing the head."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(**one_layer_config(tiny_tokenizer), head_dim=16, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config)
    batch = SftCollator(tiny_tokenizer.pad_token_id)(examples(tiny_tokenizer, 4))
    reference = model(**batch, use_cache=False).loss
    assert output_head(model) is not None  # structurally a plain nn.Linear ...
    got, outputs = causal_lm_loss(model, batch)
    assert abs(got.item() - reference.item()) <= TOL  # ... but the capped logits were used
    assert outputs.logits.shape[1] == int((batch["labels"][:, 1:] != -100).sum())


def test_empty_window_gives_zero_loss(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    rows = [
        {"input_ids": r["input_ids"], "labels": [-100] * len(r["labels"])}
        for r in examples(tiny_tokenizer, 2)
    ]
    loss, _ = causal_lm_loss(model, SftCollator(tiny_tokenizer.pad_token_id)(rows))
    assert loss.item() == 0.0
    loss.backward()  # still a graph, so DDP's hooks fire on every rank


def one_step_lora_update(tmp_path, model_dir, tokenizer, batch, accumulation, packed, fast_loss):
    """LoRA weights after one SGD step (lr 1, no clipping) over the same 8 examples, and the logged loss."""
    from datasets import Dataset
    from transformers import Seq2SeqTrainingArguments

    from sftflow.train.trainer import SftflowTrainer

    rows = examples(tokenizer)
    if packed:  # one example per packed row, so the batch sizes mean the same examples
        rows = [pack_rows([r]) for r in rows]
    model = lora_model(model_dir)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / f"out-{batch}-{accumulation}-{packed}-{fast_loss}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    collator = (PackedCollator if packed else SftCollator)(tokenizer.pad_token_id)
    trainer = SftflowTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
        fast_loss=fast_loss,
    )
    trainer.train()
    assert model.config._attn_implementation == "sdpa"  # per-example attention only inside train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return weights, log


@pytest.mark.integration
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_batch_8_equals_batch_1_times_accumulation_8(tmp_path, tiny_model_dir, tiny_tokenizer, packed):
    big, big_log = one_step_lora_update(tmp_path, tiny_model_dir, tiny_tokenizer, 8, 1, packed, True)
    small, small_log = one_step_lora_update(tmp_path, tiny_model_dir, tiny_tokenizer, 1, 8, packed, True)
    plain, plain_log = one_step_lora_update(tmp_path, tiny_model_dir, tiny_tokenizer, 8, 1, packed, False)
    start = {n: p.detach() for n, p in lora_model(tiny_model_dir).named_parameters() if p.requires_grad}
    assert any((big[n] - start[n]).abs().max() > 1e-3 for n in big)  # the step moved the weights
    assert_close(big, small)
    assert_close(big, plain)  # the same update as the model's own loss
    assert abs(big_log["loss"] - small_log["loss"]) <= TOL
    assert abs(big_log["loss"] - plain_log["loss"]) <= TOL
    # throughput figures are logged with the loss
    assert big_log["tokens_per_second"] > 0 and big_log["mfu"] > 0 and big_log["peak_memory_gb"] > 0
