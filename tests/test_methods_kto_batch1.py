"""stage: kto with per_device_train_batch_size 1 (LLaMA-Factory's kto example): TRL refuses it because its
in-batch pairing would give a row its own answer; sftflow pairs each row with the previous row of the split,
as LLaMA-Factory pairs rows across its preprocessing batch, and the loss is the KTO formula on that pair."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import completion_logps, kto_args
from sftflow.stages.kto import mismatched_completions


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [2, 3, 5, 7])
def test_no_row_is_paired_with_its_own_answer(batch_size, rows):
    answers = [[i] for i in range(rows)]
    kl = mismatched_completions(answers, batch_size)
    assert len(kl) == rows and all(k != a for k, a in zip(kl, answers, strict=True))
    if batch_size > 1:  # inside a full batch, the pairs are the batch's own answers
        for start in range(0, rows - rows % batch_size, batch_size):
            assert {k[0] for k in kl[start : start + batch_size]} == set(range(start, start + batch_size))


def test_batch_one_loss_is_the_kto_formula_on_the_mismatched_pair(tmp_path, tiny_model_dir):
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.kto import kto_completions, kto_trainer
    from sftflow.train.steps import build_model, prepare_data

    args = kto_args(tmp_path, tiny_model_dir, val_size=0, do_eval=False, per_device_train_batch_size=1)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    (tmp_path / "out").mkdir()
    data = kto_completions(prepare_data(args, tokenizer).train)
    model = build_model(args, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer = kto_trainer(args, model, tokenizer, data, None, [])
    assert trainer.args.per_device_train_batch_size == 1 and trainer._train_batch_size == 1
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    rows = trainer.train_dataset
    assert len(loader) == len(rows)  # one row per step
    assert rows[0]["KL_completion_ids"] == rows[len(rows) - 1]["completion_ids"]
    assert rows[1]["KL_completion_ids"] == rows[0]["completion_ids"]
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        row = rows[0]
        with model.disable_adapter():
            ref = completion_logps(model, row["prompt_ids"], row["completion_ids"])
            ref_kl = completion_logps(model, row["prompt_ids"], row["KL_completion_ids"])
        pol = completion_logps(model, row["prompt_ids"], row["completion_ids"])
        pol_kl = completion_logps(model, row["prompt_ids"], row["KL_completion_ids"])
    beta, kl = 0.5, max(pol_kl - ref_kl, 0)
    weight, margin = (1.0, pol - ref - kl) if row["label"] else (1.5, kl - (pol - ref))
    torch.testing.assert_close(loss, weight * (1 - torch.sigmoid(beta * margin)), atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_kto_batch_one_run_trains_and_evaluates(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    result = run_stage(
        kto_args(tmp_path, tiny_model_dir, per_device_train_batch_size=1, per_device_eval_batch_size=1)
    )
    logged = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.metrics["eval_loss"]) and "eval_kl" in result.metrics
