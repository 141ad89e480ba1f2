#!/usr/bin/env bash
# The GPU check (issue #27): one NVIDIA H100/H200, no network, torch/transformers/peft/accelerate installed.
#   (a) the tests marked `gpu` (bf16 fused loss == model loss, sftflow_sdpa / flash varlen == unpacked,
#       a QLoRA 4-bit step, serving greedy == generate); they skip cleanly without CUDA;
#   (b) Llama-3.2-1B-shaped LoRA r16 training, bf16, cutoff 2048, packed, 50 steps: sftflow beside the
#       plain HF Trainer and TRL's SFTTrainer on the same packed rows, tokens/s and MFU;
#   (c) sftflow's peak GPU memory against `sftflow plan`'s prediction.
# Budget: under 8 minutes (each part has its own timeout). Anything not installed on the machine travels
# as wheels in benchmarks/wheels/ (64 MiB at most; see benchmarks/gpu_wheels.sh) and is installed offline.
#
#   benchmarks/gpu_check.sh             # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run   # anywhere: the same pipeline, tiny shape on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=()
[[ "${1:-}" == "--dry-run" ]] && DRY=(--dry-run)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --find-links benchmarks/wheels benchmarks/wheels/*.whl \
        || echo "gpu_check: some wheels did not install (see above); going on"
fi
"$PYTHON" - <<'PY'
import importlib.util, torch
missing = [m for m in ("datasets", "trl", "yaml", "psutil", "bitsandbytes") if importlib.util.find_spec(m) is None]
print(f"gpu_check: torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      f"{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else ''}; missing: {missing or 'none'}")
PY

status=0
echo "== (a) tests marked gpu"
timeout 180 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
echo "== (b, c) training throughput and peak memory"
timeout 360 "$PYTHON" benchmarks/gpu_check.py "${DRY[@]}" || status=1
echo "gpu_check.sh: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
