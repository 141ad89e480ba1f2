"""The trained-token loss on each launcher, and the data step in one process (the torchrun side of both:
tests/test_distributed_data.py, tests/test_distributed.py).

One process, DDP and DeepSpeed ZeRO-1/2 hold the whole output head weight on every rank, so the fused head
runs there (2 CPU processes under torchrun equal one process within 1e-5: tests/test_distributed.py, whose
runs take the fused head, as tests/test_distributed_data.py's log shows); FSDP and ZeRO-3 shard it, so the
kept positions' logits come from the model's forward, and the log says why once.
"""

from __future__ import annotations

import pytest
import yaml

FSDP_REASON = "FSDP shards the output head's weight and gathers it only inside the model's forward"


def test_one_process_runs_the_data_step_as_it_is():
    from types import SimpleNamespace

    from sftflow.train.distributed import data_step_first

    ran = []
    with data_step_first(SimpleNamespace(world_size=1)):
        ran.append(1)
    assert ran == [1]


def test_the_fused_head_runs_where_the_head_weight_is_whole():
    from types import SimpleNamespace

    from sftflow.train.distributed import fused_head_reason

    def trainer(fsdp=False, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
        return SimpleNamespace(
            is_fsdp_enabled=fsdp,
            is_deepspeed_enabled=stage is not None,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        )

    assert fused_head_reason(trainer()) is None  # one process or DDP
    assert fused_head_reason(trainer(stage=1)) is None and fused_head_reason(trainer(stage=2)) is None
    assert "ZeRO-3 shards the output head" in fused_head_reason(trainer(stage=3))
    assert fused_head_reason(trainer(fsdp=True)) == FSDP_REASON


@pytest.mark.integration
def test_the_loss_path_is_said_once(tmp_path, tiny_model_dir, toy_data_dir, caplog, monkeypatch):
    """Where the head is sharded (FSDP, as `fused_head_reason` says), the kept logits come from the forward
    (exact: `logits_to_keep`) on every step, and the log says why once."""
    import logging

    import torch

    from sftflow.config import load_args
    from sftflow.train import trainer as trainer_module
    from sftflow.train.loss import causal_lm_loss

    calls = []

    def recording_loss(*args, fused_head=True, **kwargs):
        calls.append(fused_head)
        return causal_lm_loss(*args, fused_head=fused_head, **kwargs)

    monkeypatch.setattr(trainer_module, "causal_lm_loss", recording_loss)
    monkeypatch.setattr(trainer_module, "fused_head_reason", lambda trainer: FSDP_REASON)
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "dataset_dir": str(toy_data_dir),
                "dataset": "toy",
                "cutoff_len": 64,
                "output_dir": str(tmp_path / "out"),
                "tokenized_cache_dir": str(tmp_path / "cache"),
                "do_train": True,
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "preview_rows": 0,
            }
        )
    )
    from sftflow.stages.sft import run_sft

    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="sftflow.train.trainer"):
        run_sft(load_args(tmp_path / "run.yaml"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training loss:")]
    assert calls == [False, False]
    assert len(said) == 1 and "instead of the fused head: FSDP shards the output head's weight" in said[0]


def test_both_loss_paths_equal_the_models_own_loss(tiny_model_dir):
    """The fused head (one process, DDP, ZeRO-1/2) and the forward's kept logits (FSDP, ZeRO-3) give the
    model's own padded loss, and the same gradients, within 1e-5."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftflow.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    ids = torch.randint(3, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    reference = loss_and_grads(lambda: model(**inputs).loss)
    for fused in (True, False):
        loss, grads = loss_and_grads(lambda fused=fused: causal_lm_loss(model, inputs, fused_head=fused)[0])
        assert abs(loss - reference[0]) <= 1e-5, (fused, loss, reference[0])
        assert max((a - b).abs().max().item() for a, b in zip(grads, reference[1], strict=True)) <= 1e-5
