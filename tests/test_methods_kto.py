"""stage: kto on LLaMA-Factory's KTO data form (a kto_tag column) through TRL's KTOTrainer on sftflow's
tokenization: the data form, the loss against the KTO formula on the same batch, and a whole run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import KTO_ROWS, completion_logps, kto_args


def test_kto_form_keeps_the_tag_and_trains_only_the_last_answer(tmp_path, tiny_model_dir, tiny_tokenizer):
    from sftflow.data.prepare import prepare
    from sftflow.stages.kto import kto_completions

    args = kto_args(tmp_path, tiny_model_dir, val_size=0, do_eval=False)
    prepared = prepare("kto", args.data, tiny_tokenizer, seed=0)
    rows = kto_completions(prepared.train)
    assert sorted(rows.column_names) == ["completion_ids", "label", "prompt_ids"]
    assert rows["label"] == [row["label"] for row in KTO_ROWS]
    first = rows[0]
    assert tiny_tokenizer.decode(first["completion_ids"]) == "1 plus 1 is 2.<|im_end|>"
    assert tiny_tokenizer.decode(first["prompt_ids"]).endswith(
        "What is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_kto_loss_matches_the_kto_formula_on_the_same_batch(tmp_path, tiny_model_dir):
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.kto import kto_completions, kto_trainer
    from sftflow.train.steps import build_model, prepare_data

    args = kto_args(tmp_path, tiny_model_dir, val_size=0, do_eval=False)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    (tmp_path / "out").mkdir()
    data = kto_completions(prepare_data(args, tokenizer).train)
    model = build_model(args, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer = kto_trainer(args, model, tokenizer, data, None, [])
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout; the formula below runs the same weights
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        rows = [trainer.train_dataset[i] for i in range(4)]  # sequential sampler: the first batch
        with model.disable_adapter():
            ref = [completion_logps(model, r["prompt_ids"], r["completion_ids"]) for r in rows]
            ref_kl = [completion_logps(model, r["prompt_ids"], r["KL_completion_ids"]) for r in rows]
        pol = [completion_logps(model, r["prompt_ids"], r["completion_ids"]) for r in rows]
        pol_kl = [completion_logps(model, r["prompt_ids"], r["KL_completion_ids"]) for r in rows]
    beta = 0.5
    kl = max(sum(p - q for p, q in zip(pol_kl, ref_kl, strict=True)) / 4, 0)
    losses = [
        (1.0 * (1 - torch.sigmoid(beta * (p - q - kl))))
        if r["label"]
        else (1.5 * (1 - torch.sigmoid(beta * (kl - (p - q)))))
        for r, p, q in zip(rows, pol, ref, strict=True)
    ]
    assert any(r["label"] for r in rows) and not all(r["label"] for r in rows)
    assert kl > 0 or any(abs(p - q) > 1e-3 for p, q in zip(pol, ref, strict=True))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-4)
    # the KL pairs are the batch's own answers on their neighbours' prompts
    assert [r["KL_completion_ids"] for r in rows] == [
        rows[3]["completion_ids"],
        *[r["completion_ids"] for r in rows[:3]],
    ]


@pytest.mark.integration
def test_kto_run_trains_evaluates_and_writes_the_stage_outputs(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    result = run_stage(kto_args(tmp_path, tiny_model_dir))
    out = tmp_path / "out"
    for name in [
        "adapter_model.safetensors",
        "train_results.json",
        "eval_results.json",
        "trainer_log.jsonl",
        "report.html",
    ]:
        assert (out / name).is_file(), name
    assert "ref" not in json.loads((out / "adapter_config.json").read_text()).get(
        "base_model_name_or_path", ""
    )
    assert math.isfinite(result.metrics["eval_loss"]) and "eval_kl" in result.metrics
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("tokens_per_second" in str(entry) for entry in logged)  # Resilience's throughput log
