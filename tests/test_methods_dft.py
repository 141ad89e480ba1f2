"""use_dft_loss: the DFT loss in sftflow's fused trained-token loss equals its formula (each token's
cross-entropy times its detached probability) on a hand-computed batch, with the formula's gradients, and
batch 8 x accumulation 1 equals batch 1 x accumulation 8 as the plain loss does."""

from __future__ import annotations

import math

import pytest
import torch

from sftflow.data.collator import SftCollator
from sftflow.train.loss import causal_lm_loss, linear_cross_entropy


def test_dft_on_a_hand_computed_batch():
    # two tokens, vocab 2: logits [ln 3, 0] -> p(target 0) = 3/4; logits [0, 0] -> p(target 1) = 1/2
    hidden = torch.tensor([[math.log(3.0)], [0.0]], requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]])
    targets = torch.tensor([0, 1])
    expected = 0.75 * -math.log(0.75) + 0.5 * -math.log(0.5)  # sum of p * (-log p) = 0.5623...
    dft = linear_cross_entropy(hidden, weight, targets, dft=True)
    assert dft.item() == pytest.approx(expected, abs=1e-6)
    assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(-math.log(0.375), abs=1e-6)
    dft.backward()
    # d/dh [p_const * CE]: p * (softmax - onehot) @ weight = 0.75 * (0.75 - 1) and 0.5 * 0.5
    torch.testing.assert_close(hidden.grad, torch.tensor([[-0.1875], [0.25]]))


@pytest.mark.parametrize("chunk", [2**25, 7], ids=["one-chunk", "chunked"])
def test_fused_dft_equals_the_formula_and_its_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    t = torch.randint(0, 7, (9,))
    fused = linear_cross_entropy(h, w, t, chunk_elements=chunk, dft=True)
    grads = torch.autograd.grad(fused, (h, w))
    ce = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none")
    formula = (ce * ce.detach().neg().exp()).sum()
    torch.testing.assert_close(fused, formula)
    for mine, reference in zip(grads, torch.autograd.grad(formula, (h, w)), strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused-head", "model-logits"])
def test_causal_lm_dft_loss_equals_the_formula_on_the_model(tiny_model_dir, tiny_tokenizer, fused_head):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [
        {"input_ids": [1, 5, 9, 20, 33, 7], "labels": [-100, -100, 9, 20, 33, 7]},
        {"input_ids": [1, 40, 41, 42], "labels": [-100, -100, 41, 42]},
    ]
    batch = SftCollator(tiny_tokenizer.pad_token_id)(rows)
    loss, _ = causal_lm_loss(model, batch, num_items_in_batch=10, fused_head=fused_head, dft=True)
    total = torch.zeros(())
    for row in rows:
        logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
        total = total + (ce * (-ce).exp())[targets != -100].sum()
    torch.testing.assert_close(loss, total / 10, atol=1e-5, rtol=1e-5)


def one_step_dft_update(tmp_path, model_dir, tokenizer, batch, accumulation):
    from datasets import Dataset
    from transformers import Seq2SeqTrainingArguments

    from helpers import examples, lora_model
    from sftflow.train.trainer import SftflowTrainer

    model = lora_model(model_dir)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / f"dft-{batch}-{accumulation}"),
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
        use_cpu=True,
        seed=0,
    )
    trainer = SftflowTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples(tokenizer)),
        data_collator=SftCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        dft_loss=True,
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, log["loss"]


@pytest.mark.integration
def test_dft_batch_8_equals_batch_1_times_accumulation_8(tmp_path, tiny_model_dir, tiny_tokenizer):
    from helpers import assert_close, lora_model

    big, big_loss = one_step_dft_update(tmp_path, tiny_model_dir, tiny_tokenizer, 8, 1)
    small, small_loss = one_step_dft_update(tmp_path, tiny_model_dir, tiny_tokenizer, 1, 8)
    start = {n: p.detach() for n, p in lora_model(tiny_model_dir).named_parameters() if p.requires_grad}
    assert any((big[n] - start[n]).abs().max() > 1e-4 for n in big)
    assert_close(big, small)
    assert abs(big_loss - small_loss) <= 1e-5
