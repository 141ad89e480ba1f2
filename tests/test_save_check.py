"""The check after every save: the adapter on disk is the one in memory (FSDP2 + PEFT saves that kept only
rank 0's shard of the LoRA weights: accelerate PR #4206, peft PR #3251). A planted bad save stops the run
with a clear error, before the checkpoint is renamed into place or the final files are published."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sftflow.errors import SftflowError


def zero_a_shard(directory: Path, match: str = "lora_A") -> str:
    """Zero the second half of the rows of the first saved tensor whose name holds `match` (what a save
    that kept rank 0's shard of two leaves). Returns its name."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    state = load_file(path)
    name = next(n for n in sorted(state) if match in n)
    tensor = state[name].clone()
    tensor[tensor.shape[0] // 2 :] = 0
    state[name] = tensor
    save_file(state, path, metadata={"format": "pt"})
    return name


@pytest.fixture
def lora_model(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def test_a_faithful_save_passes_and_a_zeroed_shard_is_named(tmp_path, lora_model):
    from sftflow.train.save_check import verify_adapter_save

    lora_model.save_pretrained(tmp_path)
    verify_adapter_save(lora_model, tmp_path, reads=True, distributed=False)

    name = zero_a_shard(tmp_path, "lora_B")
    with pytest.raises(
        SftflowError, match=r"is not the one in memory: .*lora_B.*L2 norm .* on disk"
    ) as error:
        verify_adapter_save(lora_model, tmp_path, reads=True, distributed=False)
    assert (
        name in str(error.value)
        and "(1 of " in str(error.value)
        and "accelerate PR #4206" in str(error.value)
    )
    # A process that did not write the dir does not read it.
    verify_adapter_save(lora_model, tmp_path, reads=False, distributed=False)


def test_a_missing_tensor_or_file_is_refused(tmp_path, lora_model):
    from safetensors.torch import load_file, save_file

    from sftflow.train.save_check import verify_adapter_save

    with pytest.raises(SftflowError, match="no adapter file"):
        verify_adapter_save(lora_model, tmp_path, reads=True, distributed=False)
    lora_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(SftflowError, match=f"{dropped}: missing on disk"):
        verify_adapter_save(lora_model, tmp_path, reads=True, distributed=False)


def test_a_model_without_adapter_is_not_checked(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftflow.train.save_check import memory_norms, verify_adapter_save

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert memory_norms(model) is None
    verify_adapter_save(model, tmp_path, reads=True, distributed=False)  # nothing to compare, no error


def run_config(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    values = {
        "model_name_or_path": str(model_dir),
        "dataset_dir": str(data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "lora_target": "all",
        "lora_rank": 4,
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "do_train": True,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "seed": 7,
        "preview_rows": 0,
        **overrides,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("when", ["checkpoint", "final"])
def test_a_planted_bad_save_stops_the_run(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch, when):
    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft
    from sftflow.train.trainer import SftflowTrainer

    save = SftflowTrainer._save

    def bad_save(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if (when == "checkpoint") == ("checkpoint-" in str(output_dir)):
            zero_a_shard(Path(output_dir))

    monkeypatch.setattr(SftflowTrainer, "_save", bad_save)
    steps = {"save_strategy": "steps", "save_steps": 2} if when == "checkpoint" else {}
    args = load_args(run_config(tmp_path, tiny_model_dir, toy_data_dir, **steps))
    with pytest.raises(SftflowError, match=r"is not the one in memory: .*lora_A.*Training stopped"):
        run_sft(args)
    out = tmp_path / "out"
    leftovers = sorted(p.name for p in out.iterdir())
    # Nothing the bad save wrote was put in place: no checkpoint, no staging dir, no final adapter.
    assert not any(n.startswith(("checkpoint-", ".tmp")) for n in leftovers), leftovers
    assert not (out / "adapter_model.safetensors").exists() and not (out / "all_results.json").exists()
