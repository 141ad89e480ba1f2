"""stage: dpo on a tiny random model: the DPO loss goes down from log(2), the preference metrics are
reported, the reference is the base with the adapter disabled, and the same outputs as sft are written."""

from __future__ import annotations

import json
import math

import pytest

from helpers import pair_config
from sftflow.config import load_args
from sftflow.errors import SftflowError


@pytest.mark.integration
@pytest.mark.parametrize("pref_loss", ["sigmoid", "orpo", "simpo"])
def test_dpo_loss_goes_down_and_writes_the_sft_outputs(tmp_path, tiny_model_dir, pref_loss):
    from sftflow.stages.registry import run_stage

    args = load_args(
        None,
        pair_config(tmp_path, tiny_model_dir, stage="dpo", pref_loss=pref_loss, pref_beta=0.5, max_steps=8),
    )
    result = run_stage(args)
    out = tmp_path / "out"
    for name in [
        "adapter_model.safetensors",
        "train_results.json",
        "eval_results.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "sftflow_args.yaml",
    ]:
        assert (out / name).is_file(), name
    assert not (out / "ref").exists()  # no reference adapter copy is kept or saved
    entries = [
        e for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e
    ]
    losses = [e["loss"] for e in entries]
    assert len(losses) == 8
    for entry in entries:  # sftflow's throughput figures on every training log entry, dpo and orpo
        assert entry["tokens_per_second"] > 0 and entry["mfu"] > 0 and entry["peak_memory_gb"] > 0
    if pref_loss == "sigmoid":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
        assert result.metrics["eval_rewards/accuracies"] > 0.5
        assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    else:  # ORPO's loss is mostly the NLL of the chosen answers, large on a random model; SimPO has no
        # reference and a margin, so it starts above log(2)
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def test_dpo_config_maps_pref_keys_and_keeps_fp32(tmp_path, tiny_model_dir):
    from sftflow.data.prepare import prepare
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.dpo import dpo_trainer
    from sftflow.train.perf import ModelShape, ThroughputMeter, forward_flops_per_token
    from sftflow.train.steps import build_model

    args = load_args(
        None, pair_config(tmp_path, tiny_model_dir, stage="dpo", pref_loss="ipo", pref_beta=0.3, pref_ftx=0.5)
    )
    tokenizer = load_chat_tokenizer(args.model, args.data)
    pairs = prepare("dpo", args.data, tokenizer, args.training.seed).train
    trainer = dpo_trainer(args, build_model(args, tokenizer), tokenizer, pairs, None, [])
    assert trainer.args.beta == 0.3
    assert trainer.args.loss_type == ["ipo", "sft"] and trainer.args.loss_weights == [1.0, 0.5]
    assert trainer.args.bf16 is False and trainer.args.learning_rate == 3e-2  # the run's values, not TRL's
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    # the logged MFU counts the reference's forward of every sequence, as plan does
    shape = ModelShape.from_model(trainer.model)
    policy = ThroughputMeter(trainer.model).flops([10, 20])
    reference = 10 * forward_flops_per_token(shape, 10) + 20 * forward_flops_per_token(shape, 20)
    assert policy > 0 and trainer.throughput.flops([10, 20]) == pytest.approx(policy + reference)
    # completions are the trained answers through their end-of-turn token, after the shared prompt
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["chosen_ids"]).endswith("Wren<|im_end|>")
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_dpo_refuses_do_predict_and_a_plain_dataset(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    with pytest.raises(SftflowError, match="do_predict: false"):
        run_stage(
            load_args(
                None,
                pair_config(
                    tmp_path, tiny_model_dir, stage="dpo", do_predict=True, predict_with_generate=True
                ),
            )
        )
