"""Data parallel on CPU: `torchrun --standalone --nproc_per_node 2` (gloo) equals one process with the same
global batch; only rank 0 writes; the example launch configs are well formed.

Tolerance: per-step losses and final adapter weights agree within 1e-5 absolute (measured: ~5e-7; the
two runs pad their batches differently and reduce gradients in a different order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import LORA_RUN, train_config, write_config
from sftflow.config import load_args
from sftflow.errors import SftflowError

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def config(path: Path, model_dir: Path, data_dir: Path, out: Path, **overrides) -> Path:
    """LORA_RUN writing to out, with its own tokenized cache (concurrent runs share no cache entry)."""
    cache = str(out.parent / f"cache-{out.name}")
    return write_config(
        path, train_config(model_dir, data_dir, out, tokenized_cache_dir=cache, **{**LORA_RUN, **overrides})
    )


def log_losses(out: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert len(steps) == len(set(steps)), f"a step was logged more than once (two writers?): {steps}"
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.mark.distributed
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_model_dir, toy_data_dir):
    import torch
    from safetensors.torch import load_file

    from sftflow.stages.sft import run_sft

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    two = config(
        tmp_path / "two.yaml",
        tiny_model_dir,
        toy_data_dir,
        tmp_path / "two",
        per_device_train_batch_size=2,
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sftflow.cli", "train", str(two)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Meanwhile, the same global batch (4) in one process.
    one = config(
        tmp_path / "one.yaml", tiny_model_dir, toy_data_dir, tmp_path / "one", per_device_train_batch_size=4
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sft(load_args(one))
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    # The same loss curve and the same adapter.
    single, double = log_losses(tmp_path / "one"), log_losses(tmp_path / "two")
    assert sorted(double) == [1, 2, 3, 4] and single.keys() == double.keys()
    assert all(abs(single[s] - double[s]) <= TOL for s in single), (single, double)
    a, b = (
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    train = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert (
        train["num_input_tokens_seen"]
        == json.loads((tmp_path / "one" / "train_results.json").read_text())["num_input_tokens_seen"]
    )

    # Only rank 0 wrote: the same files as the single process (plus checkpoints), one summary.
    files = {p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("checkpoint-")}
    assert files == {p.name for p in (tmp_path / "one").iterdir()}
    assert stdout.count("sftflow: run finished") == 1
    # Checkpoints were renamed into place once both ranks had written their part (each its RNG state).
    checkpoints = sorted(
        p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(("checkpoint-", ".tmp-"))
    )
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {
        p.name for p in (tmp_path / "two" / "checkpoint-4").iterdir()
    }


def test_multi_process_launch_without_process_group_is_refused():
    from sftflow.train.trainer import check_launch

    with pytest.raises(SftflowError, match=r"started as 2 processes .* set use_cpu: true"):
        check_launch({"WORLD_SIZE": "2"}, world_size=1)
    check_launch({"WORLD_SIZE": "2"}, world_size=2)
    check_launch({}, world_size=1)


def test_example_launch_configs_are_well_formed():
    examples = ROOT / "examples"
    for name in [
        "torchrun_cpu_sft.yaml",
        "fsdp_sft.yaml",
        "deepspeed_sft.yaml",
        "accelerate_multi_gpu.yaml",
        "accelerate_multi_node.yaml",
    ]:
        first = (examples / name).read_text().splitlines()[0]
        assert first.startswith("# ") and ("torchrun" in first or "accelerate launch" in first), name
    torchrun = load_args(examples / "torchrun_cpu_sft.yaml")
    assert torchrun.training.use_cpu and torchrun.data.dataset == ["wren_identity"]
    # fsdp_sft.yaml needs GPUs: on CPU it is refused (tests/test_scale_configs.py checks its shape)
    for stage in (2, 3):
        ds = json.loads((examples / f"deepspeed_z{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == "auto"
    ds_run = yaml.safe_load((examples / "deepspeed_sft.yaml").read_text())
    assert (ROOT / ds_run["deepspeed"]).is_file()
    for name in ["accelerate_multi_gpu.yaml", "accelerate_multi_node.yaml"]:
        accel = yaml.safe_load((examples / name).read_text())
        assert accel["distributed_type"] == "MULTI_GPU" and accel["num_processes"] >= 2
