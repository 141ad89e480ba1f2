"""`sftflow expand` (LLaMA Pro block expansion, LLaMA-Factory's scripts/llama_pro.py): the expanded model
computes the same logits, and `finetuning_type: freeze` + `use_llama_pro: true` trains only the new blocks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftflow.cli import main as cli_main
from sftflow.errors import SftflowError
from sftflow.model.expand import expand_blocks

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2], [1, 40, 41, 42, 3, 8, 2]])


def logits(path, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


def test_expanded_model_has_the_same_logits(tmp_path, tiny_model_dir):
    out = tmp_path / "pro"
    assert cli_main(["expand", str(tiny_model_dir), str(out), "--num-expand", "2"]) == 0
    before, base = logits(tiny_model_dir)
    after, pro = logits(out)
    assert pro.config.num_hidden_layers == 4 == base.config.num_hidden_layers + 2
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    for new, old in ((1, 0), (3, 1)):  # a copy after each group: zero output projections, the rest copied
        block, source = pro.model.layers[new], base.model.layers[old]
        assert not block.self_attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert torch.equal(block.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        assert torch.equal(block.mlp.up_proj.weight, source.mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in pro.model.layers] == [0, 1, 2, 3]
    # generation with the KV cache agrees too
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(base.generate(IDS[:1], **greedy), pro.generate(IDS[:1], **greedy))


def test_bad_expansions_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(SftflowError, match="divide the model's 2 decoder blocks"):
        expand_blocks(str(tiny_model_dir), tmp_path / "a", 3)
    with pytest.raises(SftflowError, match="is the model being expanded"):
        expand_blocks(str(tiny_model_dir), tiny_model_dir, 1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SftflowError, match="already holds files"):
        expand_blocks(str(tiny_model_dir), tmp_path / "full", 1)


@pytest.mark.integration
def test_llama_pro_trains_only_the_expanded_blocks(tmp_path, tiny_model_dir, toy_data_dir):
    from sftflow.config import load_args
    from sftflow.stages.registry import run_stage

    pro = expand_blocks(str(tiny_model_dir), tmp_path / "pro", 2)
    keys = {
        "model_name_or_path": pro, "dataset_dir": toy_data_dir, "dataset": "toy", "cutoff_len": 64,
        "finetuning_type": "freeze", "use_llama_pro": True, "freeze_trainable_layers": 2,
        "output_dir": tmp_path / "out", "do_train": True, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "max_steps": 2, "report_to": "none", "plot_loss": False, "tokenized_cache_dir": tmp_path / "cache",
    }  # fmt: skip
    run_stage(load_args(None, [f"{k}={v}" for k, v in keys.items()]))
    start = AutoModelForCausalLM.from_pretrained(pro, dtype=torch.float32).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    changed = {
        k.split(".")[2]
        for k in start
        if k.startswith("model.layers.") and not torch.equal(start[k], tuned[k])
    }
    assert changed == {"1", "3"}  # only the copies
    assert all(
        torch.equal(start[k], tuned[k])
        for k in start
        if not k.startswith(("model.layers.1.", "model.layers.3."))
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
