"""Per-method rules (config/methods.py): each method's keys load under LLaMA-Factory's names, and a method
that cannot run with the rest of the config is refused before anything loads, with the reason."""

from __future__ import annotations

import pytest

from sftflow.config import load_args
from sftflow.config.methods import check_stage_name
from sftflow.errors import SftflowError

BASE = ["model_name_or_path=x", "dataset=a", "output_dir=/tmp/sftflow-methods-out"]


def load(*overrides: str):
    return load_args(None, [*BASE, *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        ["loraplus_lr_ratio=16"],
        ["use_muon=true"],
        ["finetuning_type=full", "use_galore=true", "galore_rank=8", "galore_target=q_proj,v_proj"],
        ["finetuning_type=full", "use_apollo=true", "apollo_rank=8"],
        ["finetuning_type=full", "use_badam=true", "badam_mode=ratio"],
        ["finetuning_type=full", "use_adam_mini=true"],
        ["pissa_init=true", "pissa_convert=true"],
        ["finetuning_type=oft", "oft_block_size=16"],
        ["finetuning_type=freeze", "use_llama_pro=true", "freeze_trainable_layers=8"],
        ["use_dft_loss=true"],
        ["neftune_noise_alpha=5", "fast_loss=false"],
        ["stage=kto", "per_device_train_batch_size=2", "kto_rejected_weight=1.5"],
    ],
)
def test_method_keys_load_under_llamafactory_names(overrides):
    args = load(*overrides)
    for item in overrides:
        key, value = item.split("=")
        group = next(g for g in (args.finetuning, args.training) if hasattr(g, key))
        assert value.split(",")[-1] in str(getattr(group, key)).lower(), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantization_method=hqq"], "HqqConfig raises NotImplementedError"),
        (["neftune_noise_alpha=5"], "Set fast_loss: false"),
        (["use_muon=true", "loraplus_lr_ratio=4"], "set only one"),
        (["use_galore=true"], "finetuning_type: full or freeze, not lora"),
        (["use_badam=true", "finetuning_type=freeze"], "finetuning_type: full, not freeze"),
        (
            [
                "finetuning_type=full",
                "use_galore=true",
                "galore_layerwise=true",
                "gradient_accumulation_steps=2",
            ],
            "gradient_accumulation_steps: 1",
        ),
        (["pissa_init=true"], "pissa_convert: true"),
        (["pissa_init=true", "pissa_iter=-1", "quantization_bit=4"], "unquantized base"),
        (["finetuning_type=oft", "stage=dpo"], "stage: sft or pt"),
        (["finetuning_type=oft", "new_special_tokens=<x>"], "trains no embedding rows"),
        (["finetuning_type=full", "use_llama_pro=true"], "freeze or lora"),
        (["use_dft_loss=true", "fast_loss=false"], "fast_loss: true"),
        (["use_dft_loss=true", "stage=pt"], "sft loss"),
        (["pref_loss=simpo"], "stage: dpo"),
        (["stage=kto", "per_device_train_batch_size=2", "packing=true"], "packing: false"),
        (["use_asft_loss=true"], "out of scope"),
        (["use_eaft_loss=true"], "out of scope"),
        (["mixture_of_depths=convert"], "mixture-of-depths"),
        (["fp8=true"], "FP8"),
    ],
)
def test_methods_that_cannot_run_are_refused_with_the_reason(overrides, message):
    with pytest.raises(SftflowError, match=message):
        load("do_train=true", *overrides)


def test_ppo_is_refused_with_the_reason():
    with pytest.raises(SftflowError, match="out of scope.*reward model"):
        check_stage_name("PPO")
    check_stage_name("kto")  # sftflow's own stages pass


def test_simpo_and_the_method_keys_load_in_the_pair_stages():
    for stage_keys in (["stage=rm", "use_muon=true"], ["stage=dpo", "loraplus_lr_ratio=4"]):
        load("do_train=true", *stage_keys)
    args = load("stage=dpo", "pref_loss=simpo", "simpo_gamma=1.0", "use_muon=true")
    assert args.finetuning.pref_loss == "simpo" and args.finetuning.simpo_gamma == 1.0
