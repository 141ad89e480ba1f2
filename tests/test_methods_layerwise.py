"""galore_layerwise / apollo_layerwise run as in LLaMA-Factory: one optimizer per weight, stepped in its
backward hook (gradients freed at once), driven by the Trainer's scheduler; gradient accumulation refused
(#28: LF's galore/apollo layerwise example configs)."""

from __future__ import annotations

import json
import types

import pytest
import torch

from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import load_model
from sftflow.train.optim import LayerwiseOptimizer, build_optimizer

TRAINING = types.SimpleNamespace(
    learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01
)
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


def setup(model_dir, tokenizer, **ft):
    finetuning = FinetuningArguments(finetuning_type="full", **ft)
    args = ModelArguments(model_name_or_path=str(model_dir))
    model = apply_finetuning(load_model(args), args, finetuning, tokenizer=tokenizer)
    return model, build_optimizer(model, finetuning, TRAINING)


def train(model, optimizer, n: int = 3) -> None:
    for _ in range(n):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_layerwise_steps_in_backward_and_frees_gradients(tiny_model_dir, tiny_tokenizer, name):
    pytest.importorskip(f"{name}_torch")  # the methods extra
    model, optimizer = setup(tiny_model_dir, tiny_tokenizer, **{f"use_{name}": True, f"{name}_rank": 4, f"{name}_layerwise": True})  # fmt: skip
    assert isinstance(optimizer, LayerwiseOptimizer)
    weights = [p for p in model.parameters() if p.requires_grad]
    assert len(optimizer.inner) == len(weights)
    before = [p.detach().clone() for p in weights]
    model(IDS, labels=IDS).loss.backward()  # no optimizer.step(): the hooks updated every weight
    assert all(p.grad is None for p in weights)
    assert all(not torch.equal(b, p) for b, p in zip(before, weights, strict=True))
    down = model.model.layers[0].mlp.down_proj.weight  # (64, 128): a projected target
    assert optimizer.inner[id(down)].state[down]["exp_avg"].shape[0] == 4  # the moments live in rank 4
    optimizer.param_groups[0]["lr"] = 0.0  # what the Trainer's scheduler sets, each hook uses
    frozen = [p.detach().clone() for p in weights]
    model(IDS, labels=IDS).loss.backward()
    assert all(torch.equal(b, p) for b, p in zip(frozen, weights, strict=True))
    state = optimizer.state_dict()
    optimizer.load_state_dict(
        json.loads(json.dumps({"lr": state["lr"]})) | {"per_weight": state["per_weight"]}
    )


def test_galore_layerwise_equals_galore(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("galore_torch")
    keys = {"use_galore": True, "galore_rank": 4, "galore_update_interval": 2}
    whole, optimizer = setup(tiny_model_dir, tiny_tokenizer, **keys)
    train(whole, optimizer)
    layerwise, optimizer = setup(tiny_model_dir, tiny_tokenizer, **keys, galore_layerwise=True)
    train(layerwise, optimizer)
    for (name, a), b in zip(whole.named_parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def config(tmp_path, model_dir, data_dir, **keys):
    base = {
        "model_name_or_path": model_dir, "dataset_dir": data_dir, "dataset": "toy", "cutoff_len": 64,
        "finetuning_type": "full", "output_dir": tmp_path / "out", "do_train": True,
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler_type": "linear", "max_steps": 3,
        "report_to": "none", "plot_loss": False, "tokenized_cache_dir": tmp_path / "cache", "logging_steps": 1,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in {**base, **keys}.items()]


@pytest.mark.integration
@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_layerwise_sft_run_trains(tmp_path, tiny_model_dir, toy_data_dir, name):
    pytest.importorskip(f"{name}_torch")
    from transformers import TrainerCallback

    from sftflow.config import load_args
    from sftflow.stages.registry import run_stage

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            seen.append((type(optimizer.optimizer).__name__, lr_scheduler.get_last_lr()[0]))

    keys = {f"use_{name}": True, f"{name}_layerwise": True, f"{name}_rank": 4, f"{name}_target": "all"}
    run_stage(load_args(None, config(tmp_path, tiny_model_dir, toy_data_dir, **keys)), callbacks=[Record()])
    assert [n for n, _ in seen] == ["LayerwiseOptimizer"] * 3
    assert seen[0][1] > seen[1][1] > seen[2][1]  # the Trainer's linear schedule reaches the hooks
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 3 and all(v == v for v in losses)
    base = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    tuned = load_model(ModelArguments(model_name_or_path=str(tmp_path / "out")))
    assert not torch.equal(
        base.model.layers[0].mlp.down_proj.weight, tuned.model.layers[0].mlp.down_proj.weight
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: 1"),
        ({"max_grad_norm": 0.5}, "max_grad_norm has no effect"),
    ],
)
def test_layerwise_refusals(tmp_path, tiny_model_dir, toy_data_dir, keys, message):
    pytest.importorskip("galore_torch")
    from sftflow.config import load_args

    with pytest.raises(SftflowError, match=message):
        load_args(
            None,
            config(tmp_path, tiny_model_dir, toy_data_dir, use_galore=True, galore_layerwise=True, **keys),
        )
