#!/usr/bin/env bash
# The GPU checks of issue 11, as one script for a lent GPU machine: the tests that
# run only where CUDA is present, then the training benchmark on every preset that
# fits. Writes what it ran and measured under OUT (default benchmarks/out/gpu).
#
#   here:   .venv/bin/python benchmarks/gpu_kit.py --out .whl   # what the machine lacks, as wheels
#           echo /.whl/ >> .git/info/exclude                     # carried, never committed
#   there:  OUT=$OUT benchmarks/gpu.sh [all|tests|bench|compile]  # with `.whl` carried
#
# A lent machine reaches no package index: its image's python3 holds a CUDA torch,
# and `.whl` (benchmarks/gpu_kit.py) the rest (Ray, pydantic, ...), installed here
# into a folder of its own. Phases: `tests` (tests/test_gpu.py: a site on CUDA, 3 sites
# sharing the GPUs; tests/test_offload.py: the codec's bytes on the device against the
# CPU's), `bench` (benchmarks/train.py, every preset and precision), `compile` (bf16,
# medium and larger, through torch.compile); `all` is the three in that order.
# PYTHON=... picks the interpreter (default: .venv/bin/python where there is one,
# else python3). It changes no device setting and starts nothing that outlives it.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
OUT="${OUT:-benchmarks/out/gpu}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "$PHASE" in all|tests|bench|compile) ;; *)
  echo "gpu.sh: unknown phase '$PHASE'; use all, tests, bench or compile" >&2; exit 2;;
esac
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  KIT="${GEOTRAIN_KIT_DIR:-/tmp/geotrain-kit}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$KIT" .whl/*.whl > "$OUT/kit.txt" 2>&1 \
      || { cat "$OUT/kit.txt" >&2; echo "gpu.sh: installing .whl failed (above)" >&2; exit 1; }
  export PYTHONPATH="$KIT:$PYTHONPATH" PATH="$KIT/bin:$PATH"
fi
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/device.txt"
import torch, ray, pydantic
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "| ray", ray.__version__, "| pydantic", pydantic.__version__)
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**30, "GiB")
PY
status=0
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_offload.py \
      tests/test_devices.py tests/test_precision.py \
      2>&1 | tee "$OUT/tests.txt" || status=1
fi
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  "$PYTHON" benchmarks/train.py --out "$OUT/train-gpu.json" 2>&1 | tee "$OUT/train.txt" || status=1
fi
if [ "$PHASE" = all ] || [ "$PHASE" = compile ]; then
  presets=medium,large,xl
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || presets=tiny
  "$PYTHON" benchmarks/train.py --compile --precisions bf16 --presets "$presets" \
      --out "$OUT/train-gpu-compile.json" 2>&1 | tee "$OUT/train-compile.txt" || status=1
fi
exit $status
