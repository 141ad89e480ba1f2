"""The one performance model (sftflow.train.perf): the logged MFU counts the FLOPs plan predicts, for tied
and untied models, LoRA, full and freeze; the setup read from a built model is the one read from its
arguments; batch lengths and throughput figures."""

from __future__ import annotations

import json

import pytest
import torch

from sftflow.config.args import FinetuningArguments, ModelArguments
from sftflow.data.collator import PackedCollator, SftCollator
from sftflow.data.packing import pack_rows
from sftflow.train.perf import (
    ModelShape,
    ThroughputMeter,
    TrainSetup,
    flops_per_token,
    forward_flops_per_token,
    sequence_lengths,
    sustained_matmul_flops,
)

SETUPS = {
    "lora_all": {"finetuning_type": "lora", "lora_target": ["all"], "lora_rank": 4},
    "lora_qv": {"finetuning_type": "lora", "lora_target": ["q_proj", "v_proj"], "lora_rank": 8},
    "full": {"finetuning_type": "full"},
    "freeze_last": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
}


@pytest.fixture(scope="module", params=["tied", "untied"])
def model_dir(request, tiny_model_dir, tmp_path_factory):
    """The tiny Llama, and an untied twin (its own output head; qwen2-style q/k/v biases too)."""
    if request.param == "tied":
        return tiny_model_dir
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("untied")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def tuned(model_dir, setup: dict):
    from transformers import AutoModelForCausalLM

    from sftflow.model.adapter import apply_finetuning

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    finetuning = FinetuningArguments(**setup)
    return apply_finetuning(model, ModelArguments(model_name_or_path=str(model_dir)), finetuning), finetuning


@pytest.mark.parametrize("name", list(SETUPS))
def test_logged_mfu_counts_the_flops_plan_predicts(model_dir, name):
    from transformers import AutoConfig

    model, finetuning = tuned(model_dir, SETUPS[name])
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))  # what plan reads
    setup = TrainSetup.from_args(shape, finetuning)
    meter = ThroughputMeter(model)
    assert meter.shape == shape and meter.setup == setup
    for seq in (1, 17, 64):
        assert meter.flops([seq]) == seq * flops_per_token(shape, setup, seq, gradient_checkpointing=False)
    assert meter.flops([3, 5]) == meter.flops([3]) + meter.flops([5])  # each example at its own length
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert setup.trainable_params(shape) == trainable


def test_untied_full_tuning_counts_the_output_head_once_in_flops(model_dir):
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    full = TrainSetup.from_args(shape, FinetuningArguments(finetuning_type="full"))
    # 6N over the matmul parameters (the head once, tied or not) plus attention
    assert flops_per_token(shape, full, 10, False) == 6 * shape.matmul_params() + 12 * shape.layers * (
        shape.heads * shape.head_dim * 10
    )
    assert forward_flops_per_token(shape, 10) == 2 * shape.matmul_params() + 4 * shape.layers * (
        shape.heads * shape.head_dim * 10
    )


def test_a_reward_model_has_a_score_head_that_trains(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sftflow.model.adapter import apply_finetuning

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    shape = ModelShape.from_model(model)
    assert shape == ModelShape.from_config(AutoConfig.from_pretrained(tiny_model_dir), head="score")
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert shape.matmul_params() == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    finetuning = FinetuningArguments(
        finetuning_type="lora", lora_target=["all"], lora_rank=4, additional_target=["score"]
    )
    tuned_model = apply_finetuning(
        model, ModelArguments(model_name_or_path=str(tiny_model_dir)), finetuning, task_type="SEQ_CLS"
    )
    setup = TrainSetup.from_model(shape, tuned_model)
    assert setup == TrainSetup.from_args(shape, finetuning) and setup.head
    assert setup.trainable_params(shape) == sum(
        p.numel() for p in tuned_model.parameters() if p.requires_grad
    )


def test_sequence_lengths_of_padded_and_packed_batches():
    packed = PackedCollator(0)(
        [pack_rows([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}])]
        + [pack_rows([{"input_ids": [8], "labels": [8]}])]
    )
    assert sequence_lengths({**packed}, pad_token_id=0) == [2, 1, 1]  # the pad block is no example
    padded = SftCollator(0)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert sequence_lengths(padded) == [3, 1]


def test_meter_reports_tokens_mfu_and_memory(tiny_model_dir):
    model, _ = tuned(tiny_model_dir, SETUPS["lora_qv"])
    meter = ThroughputMeter(model)
    assert meter.report() == {}
    meter.add([3, 5])
    report = meter.report()
    assert report["tokens_per_second"] > 0 and report["mfu"] > 0 and report["peak_memory_gb"] > 0
    json.dumps(report)
    assert meter.report() == {}  # a new window starts empty


def test_meter_without_a_llama_shape_logs_no_mfu():
    model = torch.nn.Linear(4, 4)
    meter = ThroughputMeter(model)
    meter.add([3])
    report = meter.report()
    assert "mfu" not in report and report["tokens_per_second"] > 0


def test_sustained_matmul_rate_is_positive():
    assert sustained_matmul_flops(size=(64, 32, 48), runs=3) > 0
    assert sustained_matmul_flops(size=(64, 32, 48), runs=3, cpu_time=True) > 0


def test_dpo_meter_counts_the_reference_forward_as_plan_does(tiny_model_dir):
    from transformers import AutoConfig

    model, finetuning = tuned(tiny_model_dir, SETUPS["lora_all"])
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    setup = TrainSetup.from_args(shape, finetuning)
    meter = ThroughputMeter(model, reference_forward=True)
    policy_and_reference = flops_per_token(shape, setup, 12, False) + forward_flops_per_token(shape, 12)
    assert meter.flops([12]) == 12 * policy_and_reference


def test_docstring_examples_hold():
    import doctest

    from sftflow.data import audit, packing
    from sftflow.train import perf

    for module in (perf, packing, audit):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
