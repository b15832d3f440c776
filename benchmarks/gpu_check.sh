#!/usr/bin/env bash
# The one script for a lent GPU: build the CUDA extension, run the test suite on CUDA, run the
# benchmarks at GPU presets, write JSON + logs to $OUT, print a short table last.
#   usage: benchmarks/gpu_check.sh [all|tests|bench]     (default all)
#   env:   TESTS (pytest paths, default tests), BENCH_OPS (default all), PEFTKERN_COMMIT (the tree
#          travels without .git: pass `git rev-parse --short HEAD` from the checkout)
# Runs from the repo root with the machine's own torch/triton/peft (no install, no network).
# Keep each call under the device's 10-minute limit: `tests` and `bench` can be separate calls.
set -uo pipefail
stage=${1:-all}
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PEFTKERN_CACHE_DIR=${PEFTKERN_CACHE_DIR:-$PWD/.peftkern_cache}   # kept between calls on a warm machine
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
rc=0

export PEFTKERN_COMMIT=${PEFTKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "commit $PEFTKERN_COMMIT"; } \
  2>&1 | tee "$OUT/device.txt"
$PY -m peftkern.cli info 2>&1 | tail -n 40 > "$OUT/info.txt"

echo "== build CUDA extension"
( time $PY -m peftkern.cli build ) > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED (see build.log)"; rc=1; }
tail -n 3 "$OUT/build.log"

if [[ $stage == all || $stage == tests ]]; then
  echo "== tests on CUDA"
  # One tile config per kernel: tuning every test shape would cost compiles, not coverage.
  # Triton compiles dominate a GPU test run and are CPU-bound: spread them over the cores.
  par=""; $PY -c "import xdist" 2>/dev/null && par="-n ${PYTEST_WORKERS:-8}"
  PEFTKERN_TUNE=0 timeout "${TEST_TIMEOUT:-420}" $PY -m pytest ${TESTS:-tests} -q -p no:cacheprovider $par \
    --tb=short -p no:logging --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
  trc=$?; [[ $trc == 0 ]] || rc=1
  echo "pytest exit $trc"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 5
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
  # Users run the autotuned kernels: check the paths where tuning itself could corrupt results.
  timeout 240 $PY -m pytest -q -p no:cacheprovider --tb=short -p no:logging ${TUNED_TESTS:-\
    tests/test_lora.py::test_triton_gemm_modes tests/test_lora.py::test_dropout_mask_same_in_every_kernel} \
    > "$OUT/tests_tuned.log" 2>&1 || { rc=1; echo "TUNED TESTS FAILED (tests_tuned.log)"; }
  tail -n 2 "$OUT/tests_tuned.log"
fi

if [[ $stage == all || $stage == bench ]]; then
  echo "== benchmarks"
  dev=$($PY -c "import torch;print(torch.cuda.get_device_name().replace(' ','_'))" 2>/dev/null || echo gpu)
  $PY -m peftkern.cli bench ${BENCH_OPS:-all} --json "$OUT/bench_${dev}.json" > "$OUT/bench.log" 2> "$OUT/bench.err" || rc=1
  tail -n 5 "$OUT/bench.err"
  cat "$OUT/bench.log"
fi
exit $rc
