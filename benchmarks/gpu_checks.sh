#!/usr/bin/env bash
# One short device session: GPU-only tests of the CUDA-graph decoder, then the decode and
# inner-step benchmarks on the card (tiny4m, then a random-init Qwen2.5-0.5B-shaped model; about
# 6-9 minutes in all). Results go to $OUT (default benchmarks/results/gpu).
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
# A random-init model of Qwen2.5-0.5B's shape (494M parameters, no weights needed), fast backend vs
# TRL 1.16: both in fp32 (their defaults on CUDA), then both in bf16 (TRL bf16=True, mirrorlab
# compute_dtype bfloat16); 1 and 8 prompts x 8 completions x 64 tokens, 3 timed steps after 1 warm-up.
timeout 240 python3 benchmarks/inner_step.py --device cuda --skip-tiny --skip-smollm --qwen-prompts 1,8 \
  --smollm-steps 3 --out "$OUT/inner_step_cuda_${CARD}_qwen05b_fp32.json" 2>&1 | grep -v "it/s" | tail -6 \
  | tee "$OUT/inner_step_qwen05b_fp32.txt"
stamp "inner step qwen2.5-0.5b shape fp32 done"
timeout 240 python3 benchmarks/inner_step.py --device cuda --skip-tiny --skip-smollm --qwen-prompts 1,8 \
  --smollm-steps 3 --compute-dtype bfloat16 --trl-bf16 --out "$OUT/inner_step_cuda_${CARD}_qwen05b_bf16.json" \
  2>&1 | grep -v "it/s" | tail -6 | tee "$OUT/inner_step_qwen05b_bf16.txt"
stamp "inner step qwen2.5-0.5b shape bf16 done"
# The real testbed's first arm-seed (experiments/real_testbed.yaml: LoRA top 8 layers, chat_order,
# 24 steps) on a random-init model of SmolLM2-135M's shape, at its 4 prompts and at 32: carry the
# shape files made on the CPU machine with `python benchmarks/real_testbed_gpu.py --prepare .shape/smollm2`.
if [ -d .shape/smollm2 ]; then
  timeout 300 python3 benchmarks/real_testbed_gpu.py --shape .shape/smollm2 --prompts 4,32 --steps 4 \
    --out "$OUT/real_testbed_cuda_${CARD}.json" 2>&1 | grep -v "it/s" | tail -5 | tee "$OUT/real_testbed.txt"
  stamp "real testbed arm-seed done"
else
  echo "no .shape/smollm2: real testbed check skipped (see benchmarks/real_testbed_gpu.py)" | tee -a "$OUT/log.txt"
fi
