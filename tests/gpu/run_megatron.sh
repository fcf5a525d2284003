#!/bin/bash
# The Megatron backend's GPU checks and benchmark in one call on the GPU machine:
#   source .whl/setup.sh && bash tests/gpu/run_megatron.sh [tests|parallel|bench|all] [bench args...]
# `parallel`: the multi-GPU layout tests (each layout skips below its GPU count).
# Logs go to $OUT (the device tool brings them back); the last lines printed are the summaries.
set -o pipefail
stage=${1:-all}; shift || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megahybrid-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import triton, torch, transformer_engine as te; print('torch', torch.__version__, 'triton', triton.__version__, 'te', te.__version__)" 2>&1 | grep -v -i warn | tail -1
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -m gpu tests/gpu -q -s -p no:cacheprovider -W ignore \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^(== |[A-Za-z0-9*-]+ +(float32|bfloat16)|packed|GDN guard|FP8 |FAILED|ERROR|[0-9]+ (passed|failed))|Error" | tail -40
fi
if [ "$stage" = parallel ]; then
  timeout ${TEST_TIMEOUT:-500} python3 -m pytest -m gpu tests/gpu/test_parallel_layouts.py -q -s -p no:cacheprovider -W ignore \
    2>&1 | tee "$OUT/parallel_tests.log" | grep -E "^(layout |FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed))|Error" | tail -40
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 tools/bench.py --json "$OUT/bench.json" --profile-dir "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v -i -E "warn|use_mem_eff_path|^\s*$|^\{" | tail -${BENCH_TAIL:-70}
fi
