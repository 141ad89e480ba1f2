#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU check needs beyond torch/transformers/peft/accelerate
# into benchmarks/wheels/ (give it to `run` in carry: 64 MiB at most). PYVER: the GPU machine's Python
# (e.g. 3.11). bitsandbytes (~70 MB) does not fit: without it the QLoRA test skips.
#   PYVER=3.11 benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
PYVER=${PYVER:-3.11}
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d wheels \
    trl datasets pyarrow dill multiprocess xxhash fsspec psutil
du -sh wheels
