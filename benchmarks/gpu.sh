#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (issue 11): the tests that
# run only where CUDA is present, then the training benchmark on every preset
# that fits. Writes what it measured under OUT (default benchmarks/out/gpu).
#
#   OUT=/path/to/out benchmarks/gpu.sh          # from the repository root
#
# Needs a CUDA build of torch in .venv (or PYTHON=...). It changes no device
# setting and starts nothing that outlives it.
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**30, "GiB")
PY
# The CUDA tests: whole sites on CUDA (NCCL with 2+ GPUs), and the codec's bytes
# and offload on the device against the CPU's.
"$PYTHON" -m pytest -q -rs tests/test_gpu.py tests/test_offload.py 2>&1 | tee "$OUT/tests.txt"
"$PYTHON" benchmarks/train.py --out "$OUT/train-gpu.json" 2>&1 | tee "$OUT/train.txt"
