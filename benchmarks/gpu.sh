#!/usr/bin/env bash
# The GPU checks of issue 11, as one script for a lent GPU machine: the tests that
# run only where CUDA is present, then the training benchmark on every preset that
# fits. Writes what it ran and measured under OUT (default benchmarks/out/gpu).
#
#   here:   .venv/bin/python benchmarks/gpu_kit.py --out .whl   # what the machine lacks, as wheels
#           echo /.whl/ >> .git/info/exclude                     # carried, never committed
#   there:  benchmarks/gpu.sh [PHASE ...]   # with `.whl` carried; OUT=... (the device tool sets it)
#
# A lent machine reaches no package index: its image's python3 holds a CUDA torch,
# and `.whl` (benchmarks/gpu_kit.py) the rest (Ray, pydantic, ...), installed here
# into a folder of its own. Phases, run in the order given (default: all four, in
# this order, most needed first, for a device lease is short):
#   tests    tests/test_gpu.py (a site on CUDA, 3 sites sharing the GPUs),
#            tests/test_offload.py (the codec's bytes on the device against the CPU's),
#            tests/test_devices.py and test_precision.py (placement, Ray from the kit,
#            the step under CUDA's sync debug mode)
#   bf16     benchmarks/train.py, every preset that fits, bf16 (the issue's MFU goal)
#   compile  the same through torch.compile, medium and larger
#   rest     every preset in fp16 and fp32
# Each benchmark phase writes its own JSON, rewritten after every row; everything
# printed goes to OUT/log.txt as well (4 files in all: the device tool returns 8).
# PYTHON=... picks the interpreter (default: .venv/bin/python where there is one,
# else python3). It changes no device setting and starts nothing that outlives it.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASES=("$@")
[ ${#PHASES[@]} -gt 0 ] || PHASES=(tests bf16 compile rest)
OUT="${OUT:-benchmarks/out/gpu}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
for phase in "${PHASES[@]}"; do
  case "$phase" in tests|bf16|compile|rest) ;; *)
    echo "gpu.sh: unknown phase '$phase'; use tests, bf16, compile or rest" >&2; exit 2;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  KIT="${GEOTRAIN_KIT_DIR:-/tmp/geotrain-kit}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$KIT" .whl/*.whl > /tmp/geotrain-kit.log 2>&1 \
      || { cat /tmp/geotrain-kit.log >&2; echo "gpu.sh: installing .whl failed (above)" >&2; exit 1; }
  export PYTHONPATH="$KIT:$PYTHONPATH" PATH="$KIT/bin:$PATH"
fi
"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import torch, ray, pydantic
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "| ray", ray.__version__, "| pydantic", pydantic.__version__)
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**30, "GiB")
PY
gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
status=0
for phase in "${PHASES[@]}"; do
  case "$phase" in
    tests)
      "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_offload.py \
          tests/test_devices.py tests/test_precision.py 2>&1 | tee -a "$OUT/log.txt" || status=1;;
    bf16)
      "$PYTHON" benchmarks/train.py --precisions bf16 --out "$OUT/train-bf16.json" 2>&1 \
          | tee -a "$OUT/log.txt" || status=1;;
    compile)
      presets=medium,large,xl; [ "$gpu" = 1 ] || presets=tiny
      "$PYTHON" benchmarks/train.py --compile --precisions bf16 --presets "$presets" \
          --out "$OUT/train-compile.json" 2>&1 | tee -a "$OUT/log.txt" || status=1;;
    rest)
      precisions=fp16,fp32; [ "$gpu" = 1 ] || precisions=fp32
      "$PYTHON" benchmarks/train.py --precisions "$precisions" --out "$OUT/train-rest.json" 2>&1 \
          | tee -a "$OUT/log.txt" || status=1;;
  esac
done
exit $status
