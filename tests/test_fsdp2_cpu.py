"""FSDP2 (`torch.distributed.fsdp.fully_shard`) + PEFT LoRA in 2 CPU processes over gloo: a training step
runs, the save check reads the sharded adapter's norms (DTensors gathered) and passes a faithful save, and
refuses, on both ranks, a save that kept only rank 0's shard (accelerate PR #4206, peft PR #3251).

The HF Trainer cannot run FSDP on CPU (accelerate sets its FSDP mode for accelerator devices only; with
use_cpu it runs DDP, and sftflow refuses fsdp on CPU), so the Trainer's FSDP2 save -> kill -> resume round
trip is in benchmarks/gpu_check.sh's list for a machine with 2+ GPUs; this test drives FSDP2 directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
        reason="torchrun is not installed",
    ),
]

SCRIPT = """
import sys
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForCausalLM

from sftflow.errors import SftflowError
from sftflow.train.save_check import memory_norms, verify_adapter_save

model_dir, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
before = memory_norms(model)
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
print(f"rank {rank} sharded: {type(next(p for p in model.parameters() if p.requires_grad)).__name__}", flush=True)

# One training step on the sharded model.
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(rank))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
optimizer.step()
print(f"rank {rank} step loss {loss.item():.4f}", flush=True)
for module in model.modules():  # back to the sharded state a save sees between steps
    if isinstance(module, FSDPModule):
        module.reshard()
kinds = {type(v).__name__ for k, v in model.state_dict().items() if "lora_" in k}
print(f"rank {rank} adapter weights held as: {sorted(kinds)}", flush=True)
after = memory_norms(model)
moved = sum(abs(after[k][2] - before[k][2]) > 1e-6 for k in before)
print(f"rank {rank} tensors {len(after)} moved {moved}", flush=True)

# A faithful save: every shard gathered (peft 0.22 gathers DTensors itself; every rank calls it).
full = get_peft_model_state_dict(model)
if rank == 0:
    save_file({k: v.contiguous() for k, v in full.items()}, f"{out}/good/adapter_model.safetensors")
dist.barrier()
verify_adapter_save(model, f"{out}/good", reads=rank == 0, distributed=True)
print(f"rank {rank} faithful save: passed", flush=True)

# The silent loss: rank 0's shard of each tensor (its first half of rows under Shard(0)), the rest zeros.
local = {}
for k, v in full.items():
    whole = torch.zeros_like(v)
    rows = (v.shape[0] + 1) // 2
    whole[:rows] = v[:rows]
    local[k] = whole
if rank == 0:
    save_file(local, f"{out}/bad/adapter_model.safetensors")
dist.barrier()
try:
    verify_adapter_save(model, f"{out}/bad", reads=rank == 0, distributed=True)
    print(f"rank {rank} rank-0-shard save: NOT caught", flush=True)
except SftflowError as exc:
    print(f"rank {rank} rank-0-shard save: refused: {str(exc)[:200]}", flush=True)
dist.destroy_process_group()
"""


def test_fsdp2_lora_step_and_save_check_on_gloo(tmp_path, tiny_model_dir):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "fsdp2.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "fsdp2.py", str(tiny_model_dir), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} sharded: DTensor" in out
        assert f"rank {rank} adapter weights held as: ['DTensor']" in out
        assert f"rank {rank} faithful save: passed" in out
        assert f"rank {rank} rank-0-shard save: refused: the adapter saved in" in out, out
    tensors = int(out.split("rank 0 tensors ")[1].split()[0])
    assert f"rank 0 tensors {tensors} moved {tensors}" in out  # the step trained every LoRA tensor
