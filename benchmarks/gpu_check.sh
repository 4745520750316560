#!/usr/bin/env bash
# The CUDA check, in one short run on a lent GPU machine (see docs/performance.md, "GPU check").
#
# Prepare here (no GPU needed), from the repository root:
#   python benchmarks/make_mnist_bundle.py ../shared/data/mnist.npz --k 2 --r 1 --out runs/gpu/mnist-k2r1
#   python benchmarks/make_mnist_bundle.py ../shared/data/mnist.npz --k 4 --r 2 --out runs/gpu/mnist-k4r2
#   benchmarks/gpu_wheels.sh            # Ray + the serving dependencies the image lacks, as cp312 wheels in .whl/
# Run there (carry runs/gpu and .whl), with OUT set to a folder that comes back:
#   OUT=/some/dir benchmarks/gpu_check.sh [parts]      # parts: env,pytest,fisher,encode,serve,path,tail (default all)
# Writes OUT/summary.json (every part's figures, or its error) and OUT/logs.tgz (logs, tables, plots).
# DEVICE=cpu runs the same steps without a GPU (how the script itself is tested).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu/out}
PARTS=${1:-env,pytest,fisher,encode,serve,path,tail}
WORK=${WORK:-/tmp/coinfer-gpu-check}
mkdir -p "$OUT" "$WORK" /tmp/coinfer-bin
export PYTHONPATH="$PWD/src"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/coinfer-site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/coinfer-site:$PYTHONPATH"
fi
# the `coinfer` command, for the parts that start `coinfer serve` / `coinfer bench`
printf '#!/bin/sh\nexec %s -m coinfer.cli "$@"\n' "$(command -v "$PY")" > /tmp/coinfer-bin/coinfer
chmod +x /tmp/coinfer-bin/coinfer
export PATH="/tmp/coinfer-bin:$PATH" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" benchmarks/gpu_check.py --bundle-k2 runs/gpu/mnist-k2r1 --bundle-k4 runs/gpu/mnist-k4r2 \
  --data runs/gpu/mnist-k2r1.test.npz --out "$WORK" --parts "$PARTS" --device "${DEVICE:-cuda}" \
  --tail-requests "${TAIL_REQUESTS:-300}" --tail-timeout "${TAIL_TIMEOUT:-330}"
rc=$?
cp "$WORK/summary.json" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null
exit $rc
