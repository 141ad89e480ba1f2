"""The data step under torchrun (2 CPU processes, gloo): rank 0 tokenizes into the cache while rank 1 waits
outside the process group's collectives, then reads the cache rank 0 wrote (LLaMA-Factory #2424: the other
ranks timed out in `main_process_first`'s barrier while rank 0 tokenized a large dataset).

The process group's timeout is set to 4 s and rank 0 sleeps 8 s before tokenizing: a wait inside the
process group's barrier fails with gloo's "Timed out waiting 4000ms" (measured with the Trainer's
`main_process_first`), the wait `data_step_first` makes does not.
"""

from __future__ import annotations

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

# The torchrun entry: a short process-group timeout (the Trainer passes ddp_timeout on to the process
# group on GPUs only) and a slow tokenizer on local rank 0, then `python -m sftflow.cli ...`.
ENTRY = """
import datetime, os, sys, time
import torch.distributed as dist
import sftflow.data.prepare as prepare_module

init = dist.init_process_group
def init_with_short_timeout(*args, **kwargs):
    kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT"]))
    return init(*args, **kwargs)
dist.init_process_group = init_with_short_timeout

tokenize = prepare_module.tokenize_sft
def slow_on_rank0(*args, **kwargs):
    if os.environ.get("LOCAL_RANK") == "0":
        print(f"rank 0 starts tokenizing at {time.time():.3f}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["SLOW_TOKENIZE"]))
    return tokenize(*args, **kwargs)
prepare_module.tokenize_sft = slow_on_rank0

from sftflow.cli import main
sys.exit(main())
"""


def torchrun() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def test_rank0_tokenizes_into_the_cache_while_rank1_waits_outside_the_process_group(
    tmp_path, tiny_model_dir, toy_data_dir
):
    cache = tmp_path / "cache"
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "lora_target": "all",
        "lora_rank": 4,
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(cache),
        "overwrite_cache": True,  # only rank 0 rebuilds; rank 1 reads what it wrote
        "do_train": True,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "use_cpu": True,
        "seed": 7,
        "preview_rows": 0,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "entry.py").write_text(ENTRY)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PG_TIMEOUT": "4",
        "SLOW_TOKENIZE": "8",
    }
    proc = subprocess.run(
        [torchrun(), "--standalone", "--nproc_per_node", "2", "entry.py", "train", "run.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Timed out" not in log
    # Rank 1 waited on the data step's own barrier, then read the entry rank 0 wrote: written once, read once.
    assert "rank 1 waits for the main process to finish dataset preprocessing" in log
    assert log.count("rank 0 starts tokenizing") == 1
    assert log.count("Saved tokenized data to the cache") == 1
    assert log.count("Loaded tokenized data from the cache") == 1
    entries = [p.name for p in cache.iterdir()]
    assert len(entries) == 1 and ".tmp" not in entries[0], entries
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # DDP holds the whole head weight on each rank: the fused trained-token head ran on both.
    assert log.count("output head fused into the loss") == 2, log[-3000:]
