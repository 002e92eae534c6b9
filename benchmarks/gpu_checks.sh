#!/usr/bin/env bash
# One short device session: GPU-only tests of the CUDA-graph decoder, then the decode and
# inner-step benchmarks on the card. Results go to $OUT (default benchmarks/results/gpu).
# Usage on a GPU machine without internet (wheels carried in .whl, see benchmarks/README.md):
#   bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$OUT/log.txt"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ml . >/dev/null 2>&1 \
  || { echo "mirrorlab install failed"; exit 1; }
export PYTHONPATH=/tmp/ml:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE "[ahbl][0-9]{2,3}" | head -1 | tr A-Z a-z)
CARD=${CARD:-gpu}
stamp "installed"
timeout 90 python3 -P -m pytest -q -p no:cacheprovider tests/test_gbmpo_sampling.py -k "cuda" 2>&1 | tail -15 | tee "$OUT/pytest_cuda_graph.txt"
stamp "pytest done"
timeout 60 python3 benchmarks/decode.py --device cuda --dtype float32 --repeats 10 \
  --out "$OUT/decode_cuda_${CARD}_float32.json" 2>&1 | grep -v "it/s" | tee "$OUT/decode_float32.txt"
stamp "decode fp32 done"
timeout 120 python3 benchmarks/inner_step.py --device cuda --steps 8 --warmup 2 --skip-smollm \
  --out "$OUT/inner_step_cuda_${CARD}_fast_graph.json" 2>&1 | grep -v "it/s" | tail -8 | tee "$OUT/inner_step_graph.txt"
stamp "inner step (graph) done"
timeout 60 python3 benchmarks/decode.py --device cuda --dtype bfloat16 --repeats 10 \
  --out "$OUT/decode_cuda_${CARD}_bfloat16.json" 2>&1 | grep -v "it/s" | tee "$OUT/decode_bfloat16.txt"
stamp "decode bf16 done"
timeout 120 python3 benchmarks/inner_step.py --device cuda --steps 8 --warmup 2 --skip-smollm --no-cuda-graph \
  --out "$OUT/inner_step_cuda_${CARD}_fast_nograph.json" 2>&1 | grep -v "it/s" | tail -8 | tee "$OUT/inner_step_nograph.txt"
stamp "inner step (no graph) done"
