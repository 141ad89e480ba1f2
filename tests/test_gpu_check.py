"""benchmarks/gpu_check.sh --dry-run: the whole GPU check's pipeline on CPU with a tiny shape (the gpu
tests skip, the three trainers run 3 steps each on the same packed rows, the report prints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_gpu_check_dry_run_runs_the_pipeline_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    assert "cuda False" in out and "skipped" in out  # the gpu tests skip cleanly on CPU
    for arm in ("sftflow", "hf", "trl"):
        line = next(line for line in out.splitlines() if line.startswith(arm + " "))
        assert float(line.split()[1]) > 0, line  # tokens/s
    assert "peak memory: measured" in out and "plan" in out
    assert "gpu_check: PASS" in out and out.rstrip().endswith("gpu_check.sh: PASS")
