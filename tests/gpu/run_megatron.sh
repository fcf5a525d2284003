#!/bin/bash
# The Megatron backend's GPU checks and benchmark in one call on the GPU machine:
#   source .whl/setup.sh && bash tests/gpu/run_megatron.sh [tests|parallel|train|cp|cpbench|bench|all] [bench args...]
# `parallel`: the multi-GPU layout tests (each layout skips below its GPU count); `cp`: the one-GPU
# state-passing CP kernel test; `cpbench`: tools/bench_cp.py on every visible GPU (torchrun).
# Logs go to $OUT (the device tool brings them back); the last lines printed are the summaries.
set -o pipefail
stage=${1:-all}; shift || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megahybrid-out}; mkdir -p "$OUT"
# Triton's compile cache travels between sessions: a fresh machine spent ~6 minutes compiling and
# autotuning FLA / mamba_ssm kernels before the first layout test ran (2026-11-25, H100). Carry
# `.triton-cache.tgz` (from a previous call's $OUT, copied to the repo root) to start warm.
export TRITON_CACHE_AUTOTUNING=1 MEGAHYBRID_CACHE=${MEGAHYBRID_CACHE:-/tmp/megahybrid-cache}
if [ -f .triton-cache.tgz ] && [ ! -f "$TRITON_CACHE_DIR/.from-carry" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf .triton-cache.tgz -C "$TRITON_CACHE_DIR" && touch "$TRITON_CACHE_DIR/.from-carry" \
    && echo "triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) entries from .triton-cache.tgz"
fi
save_triton_cache() {  # at most 15 MiB comes back (the device tool's per-file limit is 16 MiB)
  [ -d "$TRITON_CACHE_DIR" ] || return 0
  tar czf /tmp/triton-cache.tgz -C "$TRITON_CACHE_DIR" --exclude=.from-carry . 2>/dev/null
  if [ "$(stat -c %s /tmp/triton-cache.tgz)" -le 15728640 ]; then cp /tmp/triton-cache.tgz "$OUT/triton-cache.tgz"
  else echo "triton cache: $(du -h /tmp/triton-cache.tgz | cut -f1) compressed, too large to bring back"; fi
}
trap save_triton_cache EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import triton, torch, transformer_engine as te; print('torch', torch.__version__, 'triton', triton.__version__, 'te', te.__version__)" 2>&1 | grep -v -i warn | tail -1
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -m gpu tests/gpu -q -s -p no:cacheprovider -W ignore \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^(== |[A-Za-z0-9*-]+ +(float32|bfloat16)|packed|GDN guard|FP8 |FAILED|ERROR|[0-9]+ (passed|failed))|Error" | tail -40
fi
if [ "$stage" = parallel ]; then  # the Triton-free pattern first: its layouts need no Triton compile
  set -f  # the patterns hold '*'
  for pattern in ${LAYOUT_PATTERNS:-*-E-*-E- M*-EG*-E}; do
    echo "== layouts of $pattern"
    LAYOUT_PATTERN="$pattern" timeout ${TEST_TIMEOUT:-500} python3 -m pytest -m gpu tests/gpu/test_parallel_layouts.py -q -s \
      -p no:cacheprovider -W ignore 2>&1 | tee -a "$OUT/parallel_tests.log" \
      | grep -E "^(layout |FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed))|Error" | tail -40
  done
  set +f
fi
if [ "$stage" = train ]; then
  timeout ${TEST_TIMEOUT:-500} python3 -m pytest -m gpu tests/gpu/test_megatron_train.py -q -s -p no:cacheprovider -W ignore \
    2>&1 | tee "$OUT/megatron_train.log" | grep -E "^(megatron loop|FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed))|Error" | tail -40
fi
if [ "$stage" = cp ]; then
  timeout ${TEST_TIMEOUT:-500} python3 -m pytest -m gpu tests/gpu/test_cp_kernels.py -q -s -p no:cacheprovider -W ignore \
    2>&1 | tee "$OUT/cp_kernels.log" | grep -E "^(cp-kernels|FAILED|ERROR|[0-9]+ (passed|failed))|Error" | tail -40
fi
if [ "$stage" = cpbench ]; then
  timeout ${BENCH_TIMEOUT:-500} python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" \
    tools/bench_cp.py --json "$OUT/bench_cp.json" "$@" 2>&1 | tee "$OUT/bench_cp.log" | grep -v -i warn | tail -30
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 tools/bench.py --json "$OUT/bench.json" --profile-dir "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v -i -E "warn|use_mem_eff_path|^\s*$|^\{" | tail -${BENCH_TAIL:-70}
fi
