"""LLaMA-Factory configs: docs/llamafactory.md agrees with the parser row by row, and an LF-shaped config
(report_to: none, save_steps alone, warmup_ratio, ...) trains unchanged."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sftflow.config.compat import ALIASES, REFUSED
from sftflow.config.parser import args_from_dict, field_index
from sftflow.errors import SftflowError

TABLE = Path(__file__).parents[1] / "docs" / "llamafactory.md"
BASE = {"model_name_or_path": "some/model", "output_dir": "/tmp/sftflow-test-out"}


def table_rows() -> dict[str, dict[str, str]]:
    """key -> {group, status, text, accepted} for every row of the tables in docs/llamafactory.md."""
    rows = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key, group, status, text, accepted = cells
        assert key.strip("`") not in rows, f"{key} is listed twice"
        rows[key.strip("`")] = {"group": group, "status": status, "text": text, "accepted": accepted}
    return rows


ROWS = table_rows()
BY_STATUS = {
    s: sorted(k for k, r in ROWS.items() if r["status"] == s)
    for s in ("same", "alias", "refused", "issue 18")
}

# one value per alias and what its target must hold afterwards
ALIAS_SAMPLES = {
    "warmup_ratio": ("0.1", 0.1),
    "evaluation_strategy": ("no", "no"),
    "no_cuda": ("true", True),
    "per_gpu_train_batch_size": ("3", 3),
    "per_gpu_eval_batch_size": ("3", 3),
    "push_to_hub_model_id": ("me/model", "me/model"),
    "push_to_hub_token": ("hf_x", "hf_x"),
    "torchdynamo": ("eager", "eager"),
    "group_by_length": ("true", "group_by_length"),
    "torch_dtype": ("float32", "float32"),
    "infer_dtype": ("bfloat16", "bfloat16"),
    "add_special_tokens": ("<a>,<b>", ["<a>", "<b>"]),
    "flash_attn": ("fa2", "flash_attention_2"),
    "enable_liger_kernel": ("false", False),
    "disable_gradient_checkpointing": ("true", False),
    "use_reentrant_gc": ("false", {"use_reentrant": False}),
    "tokenized_path": ("/tmp/tok", "/tmp/tok"),
    "neat_packing": ("true", True),
    "eval_num_beams": ("4", 4),
    "pure_bf16": ("true", "bfloat16"),
}


def value_of(args, key: str):
    for group in (args.model, args.data, args.finetuning, args.generating, args.training):
        if hasattr(group, key):
            value = getattr(group, key)
            return value.value if hasattr(value, "value") and not isinstance(value, str) else value
    raise AssertionError(f"{key} is on no argument group")


def test_the_table_lists_every_alias_and_refusal_and_only_known_statuses():
    assert set(ROWS) >= set(ALIASES) | set(REFUSED), sorted(set(ALIASES) | set(REFUSED) - set(ROWS))
    assert {r["status"] for r in ROWS.values()} <= {"same", "alias", "refused", "issue 18"}
    assert len(ROWS) >= 270  # LLaMA-Factory's 246 keys plus the transformers ones
    assert set(ALIAS_SAMPLES) == set(ALIASES), "give every alias a sample value here"


@pytest.mark.parametrize("key", BY_STATUS["same"])
def test_same_keys_load_with_their_default(key):
    index = field_index()
    assert key in index, f"{key} is marked same in docs/llamafactory.md but is not a sftflow key"
    assert key not in ALIASES and key not in REFUSED
    f = index[key][1]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    default = BASE.get(key, getattr(default, "value", default))
    args = args_from_dict({**BASE, key: default})
    assert key in args.user_keys
    value_of(args, key)  # the key is a field of one of the argument groups


@pytest.mark.parametrize("key", BY_STATUS["alias"])
def test_alias_keys_load_and_land_on_their_target(key):
    target = ALIASES[key].target
    assert f"→ `{target}`" in ROWS[key]["text"], f"the table maps {key} elsewhere than {target}"
    value, expected = ALIAS_SAMPLES[key]
    args = args_from_dict({**BASE, key: value})
    landed = value_of(args, target)
    assert landed == pytest.approx(expected) if isinstance(expected, float) else landed == expected
    with pytest.raises(SftflowError, match=f"{key} and {target} are both set"):
        args_from_dict({**BASE, key: value, target: value_of(args_from_dict(BASE), target) or value})


def _accepted(cell: str) -> list[str]:
    return [v.strip("`") for v in re.findall(r"`[^`]*`", cell)]


@pytest.mark.parametrize("key", BY_STATUS["refused"] + BY_STATUS["issue 18"])
def test_refused_keys_are_refused_with_the_tables_reason(key):
    if ROWS[key]["status"] == "issue 18" and key in field_index():
        args_from_dict({**BASE})  # issue 18 made it a sftflow key: it is a field, no longer refused
        assert key not in REFUSED or key in field_index()
        return
    assert key in REFUSED, f"{key} is marked {ROWS[key]['status']} but the parser does not refuse it"
    reason = REFUSED[key].reason
    assert ROWS[key]["text"] == reason, f"docs/llamafactory.md gives {key} another reason than the parser"
    with pytest.raises(SftflowError, match=re.escape(f"{key}: {reason}.")):
        args_from_dict({**BASE, key: "sftflow-test-value"})
    for value in _accepted(ROWS[key]["accepted"]):
        args = args_from_dict({**BASE, key: value})  # what sftflow does anyway: taken without effect
        assert key not in args.user_keys
    assert len(_accepted(ROWS[key]["accepted"])) == len(REFUSED[key].accepted)


def test_readme_links_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/llamafactory.md" in readme


def test_a_llamafactory_shaped_config_trains_unchanged(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """The keys of LLaMA-Factory's examples/train_lora/*_sft.yaml, as an LF user writes them."""
    from sftflow.cli import main

    config = tmp_path / "lora_sft.yaml"
    config.write_text(
        f"""### model
model_name_or_path: {tiny_model_dir}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all

### dataset
dataset: toy
dataset_dir: {toy_data_dir}
cutoff_len: 64
max_samples: 8
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 1
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
infer_backend: huggingface
export_legacy_format: false
""",
        encoding="utf-8",
    )
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # LF's output_dir is relative to where the command runs
    try:
        code = main(["train", str(config), f"tokenized_cache_dir={tmp_path / 'cache'}", "preview_rows=0"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    out = tmp_path / "saves/tiny/lora/sft"
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # save_steps alone
    saved = yaml.safe_load((out / "sftflow_args.yaml").read_text())
    assert saved["report_to"] == [] and saved["warmup_steps"] == pytest.approx(0.1)
    assert saved["save_strategy"] == "steps" and saved["lr_scheduler_type"] == "cosine"
