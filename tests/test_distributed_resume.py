"""Save -> kill -9 -> resume under torchrun (2 CPU processes, DDP over gloo): rank 0 is killed right after
checkpoint-2 is in place (torchrun then stops rank 1), the same command with resume_from_checkpoint=true
finishes the run, and its adapter and its losses after step 2 equal one uninterrupted process with the same
global batch within 1e-5 (the tolerance of tests/test_distributed.py). Every save on the way passed the save
check (the adapter on disk == the one in memory, agreed on by both ranks).

FSDP2 cannot run this round trip on CPU (the HF Trainer has no FSDP mode without accelerator devices:
tests/test_fsdp2_cpu.py); it is listed for a machine with 2+ GPUs in docs/scaling.md.
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

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
        reason="torchrun is not installed",
    ),
]
TOL = 1e-5

# The torchrun entry: rank 0 kills itself (SIGKILL) once checkpoint-KILL_AFTER is renamed into place.
ENTRY = """
import os, signal, sys
from sftflow.train.trainer import SftflowTrainer

save_checkpoint = SftflowTrainer._save_checkpoint
def save_then_die(self, model, trial):
    save_checkpoint(self, model, trial)
    if os.environ.get("RANK") == "0" and self.state.global_step == int(os.environ.get("KILL_AFTER", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
SftflowTrainer._save_checkpoint = save_then_die

from sftflow.cli import main
sys.exit(main())
"""


def settings(model_dir: Path, data_dir: Path, out: Path, **overrides) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "dataset_dir": str(data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "lora_target": "all",
        "lora_rank": 4,
        "output_dir": str(out),
        "tokenized_cache_dir": str(out.parent / f"cache-{out.name}"),
        "do_train": True,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "seed": 7,
        "preview_rows": 0,
        **overrides,
    }


def losses(out: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def test_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(
    tmp_path, tiny_model_dir, toy_data_dir
):
    import torch
    from safetensors.torch import load_file

    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    (tmp_path / "entry.py").write_text(ENTRY)
    two = tmp_path / "two.yaml"
    out = tmp_path / "two"
    two.write_text(
        yaml.safe_dump(
            settings(tiny_model_dir, toy_data_dir, out, per_device_train_batch_size=2, use_cpu=True)
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "entry.py", "train", str(two)]
    killed = subprocess.run(
        command, cwd=tmp_path, env={**env, "KILL_AFTER": "2"}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run(
        [*command, "resume_from_checkpoint=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Timed out" not in resumed.stderr

    # The same global batch (4) in one process, uninterrupted.
    one = tmp_path / "one.yaml"
    one.write_text(
        yaml.safe_dump(
            settings(tiny_model_dir, toy_data_dir, tmp_path / "one", per_device_train_batch_size=4)
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sft(load_args(one))
    finally:
        torch.set_num_threads(threads)
    single, double = losses(tmp_path / "one"), losses(out)
    assert sorted(double) == [1, 2, 3, 4], double  # each step logged once, across the kill
    assert all(abs(single[s] - double[s]) <= TOL for s in single), (single, double)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
