"""Optimizer-side methods (train/optim.py) are really on: the param groups and optimizer state each method
defines, on the tiny model, and the stage recipes hand the optimizer to the Trainer."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import as_overrides
from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import load_model
from sftflow.train.optim import MuonWithAdamW, build_optimizer

LR = 1e-3
TRAINING = types.SimpleNamespace(
    learning_rate=LR, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01
)
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


def setup(model_dir, tokenizer, **ft):
    finetuning = FinetuningArguments(**ft)
    args = ModelArguments(model_name_or_path=str(model_dir))
    model = apply_finetuning(load_model(args), args, finetuning, tokenizer=tokenizer)
    return model, build_optimizer(model, finetuning, TRAINING)


def steps(model, optimizer, n: int = 2) -> None:
    for _ in range(n):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_no_method_leaves_the_optimizer_to_the_trainer(tiny_model_dir, tiny_tokenizer):
    assert setup(tiny_model_dir, tiny_tokenizer)[1] is None


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_model_dir, tiny_tokenizer):
    model, optimizer = setup(tiny_model_dir, tiny_tokenizer, lora_rank=2, loraplus_lr_ratio=16)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    b = [n for n in names if "lora_B" in n]
    a = [n for n in names if "lora_A" in n]
    assert b and a
    assert {lr_of[id(names[n])] for n in b} == {16 * LR}
    assert {lr_of[id(names[n])] for n in a} == {LR}


def test_muon_updates_the_hidden_matrices_and_adamw_the_rest(tiny_model_dir, tiny_tokenizer):
    model, optimizer = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_muon=True)
    assert isinstance(optimizer, MuonWithAdamW)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps(model, optimizer)
    muon_params = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if id(param) in muon_params:
            assert param.ndim == 2 and "layers." in name and "embed" not in name
            assert type(optimizer.muon.state[param]["momentum_buffer"]) is torch.Tensor
            assert optimizer.muon.state[param]["momentum_buffer"].shape == param.shape
        else:  # embeddings (tied head), norms: AdamW's two moments
            assert optimizer.adamw.state[param]["exp_avg_sq"].shape == param.shape
        assert not torch.equal(before[name], param), name
    assert len(muon_params) == 2 * 7  # q k v o gate up down in each of the 2 layers
    # the scheduler sees both optimizers' groups; the checkpoint holds both states
    assert len(optimizer.param_groups) == len(optimizer.muon.param_groups) + len(optimizer.adamw.param_groups)
    state = optimizer.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]


def test_galore_projects_the_moments_of_the_target_weights(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("galore_torch")  # the methods extra
    model, optimizer = setup(
        tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_galore=True, galore_rank=4
    )
    steps(model, optimizer)
    weight = model.model.layers[0].mlp.down_proj.weight  # (64, 128)
    state = optimizer.state[weight]
    from galore_torch import GaLoreAdamW

    assert isinstance(optimizer, GaLoreAdamW)
    assert type(state["projector"]).__name__ == "GaLoreProjector"
    assert state["exp_avg"].shape == (4, 128)  # rank x the longer side: the moments live in the projection
    norm = model.model.norm.weight
    assert optimizer.state[norm]["exp_avg"].shape == norm.shape and "projector" not in optimizer.state[norm]


def test_apollo_keeps_low_rank_moments_on_the_target_weights(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("apollo_torch")  # the methods extra
    model, optimizer = setup(
        tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_apollo=True, apollo_rank=4
    )
    steps(model, optimizer)
    weight = model.model.layers[0].mlp.down_proj.weight  # (64, 128)
    state = optimizer.state[weight]
    from apollo_torch import APOLLOAdamW

    assert isinstance(optimizer, APOLLOAdamW)
    assert 4 in state["exp_avg"].shape and state["exp_avg"].numel() < weight.numel()


def test_adam_mini_keeps_one_second_moment_per_head(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("adam_mini")  # the methods extra
    model, optimizer = setup(tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_adam_mini=True)
    steps(model, optimizer)
    q = model.model.layers[0].self_attn.q_proj.weight  # 4 heads
    k = model.model.layers[0].self_attn.k_proj.weight  # 2 kv heads
    assert type(optimizer).__name__ == "Adam_mini"
    assert optimizer.state[q]["vmean"].shape == (4, 1)
    assert optimizer.state[k]["vmean"].shape == (2, 1)


def test_badam_trains_one_layer_at_a_time(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("badam")  # the methods extra
    model, optimizer = setup(
        tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_badam=True, badam_switch_interval=1
    )
    assert type(optimizer).__name__ == "BlockOptimizer"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.0.") for n in trained)
    steps(model, optimizer, n=1)  # switch_interval 1: the next block
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") for n in trained)


def test_badam_ratio_mode_keeps_sparse_moments(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("badam")  # the methods extra
    model, optimizer = setup(
        tiny_model_dir, tiny_tokenizer, finetuning_type="full", use_badam=True, badam_mode="ratio"
    )
    steps(model, optimizer, n=1)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q]["exp_avg"].numel() == int(0.05 * q.numel())


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"use_muon": True, "use_galore": True}, "set only one"),
        ({"loraplus_lr_ratio": 4, "finetuning_type": "full"}, "finetuning_type: lora"),
        ({"use_galore": True}, "full or freeze"),
        ({"use_badam": True, "finetuning_type": "freeze"}, "finetuning_type: full"),
        ({"use_galore": True, "finetuning_type": "full", "galore_target": ["nope"]}, "galore_target"),
    ],
)
def test_methods_that_do_not_fit_are_refused(tiny_model_dir, tiny_tokenizer, keys, message):
    with pytest.raises(SftflowError, match=message):
        setup(tiny_model_dir, tiny_tokenizer, **keys)


@pytest.mark.integration
def test_sft_hands_the_method_optimizer_to_the_trainer(tmp_path, tiny_model_dir, toy_data_dir):
    from transformers import TrainerCallback

    from sftflow.config import load_args
    from sftflow.stages.registry import run_stage

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            seen.append((type(optimizer.optimizer).__name__, lr_scheduler.get_last_lr()))

    config = {
        "model_name_or_path": tiny_model_dir,
        "dataset_dir": toy_data_dir,
        "dataset": "toy",
        "cutoff_len": 64,
        "finetuning_type": "full",
        "use_muon": True,
        "output_dir": tmp_path / "out",
        "do_train": True,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "max_steps": 2,
        "report_to": "none",
        "plot_loss": False,
        "tokenized_cache_dir": tmp_path / "cache",
    }
    run_stage(load_args(None, as_overrides(config)), callbacks=[Record()])
    assert [name for name, _ in seen] == ["MuonWithAdamW"] * 2
    # the Trainer's scheduler drives every group of both optimizers
    assert len(seen[0][1]) == 3 and len(set(seen[0][1])) == 1 and seen[1][1][0] < seen[0][1][0]
