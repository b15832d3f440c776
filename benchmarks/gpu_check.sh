#!/usr/bin/env bash
# The one call for a lent GPU (H200 class; torch 2.11, Triton 3.6, transformers 5.17, peft; no network;
# a bare machine). It ends within 7 minutes, most important evidence first, and writes every step's
# results into $OUT as the step finishes, so a call cut short still returns what it measured.
#
#   PEFTKERN_COMMIT=<hash> bash benchmarks/gpu_check.sh        # on the GPU: the default steps, <= 7 min
#   PEFTKERN_COMMIT=<hash> bash benchmarks/gpu_check.sh --steps cuda   # later, optional: build + check
#                                                                      # the CUDA extension (<= 9.5 min)
#   bash benchmarks/gpu_check.sh --rehearse      # CI: the same steps on CPU at tiny sizes (a few minutes)
#
# The tree travels to the GPU machine without .git: pass the commit it was copied from (the literal
# hash of a clean checkout) or render_table.py refuses the results. PEFTKERN_NO_BUILD=1 is the default
# here: no step starts an nvcc build (1.5-4 min); the cuda backend's rows say "skipped" until the cuda step.
#
# Steps, in priority order. Budget = the step's `timeout -s INT` cap in seconds (pytest and the bench
# print what they have on SIGINT; SIGKILL 10 s later). All default steps share one deadline,
# GPU_CHECK_BUDGET (default 400 s) from the start: a step gets min(its cap, what is left), so the
# lowest priorities are the ones cut.
#   step       cap   what                                                              writes to $OUT
#   env         30   nvidia-smi, versions, GPU clocks, `peftkern info`                 env.json env.txt
#   correct     90   tests/gpu: forward + every gradient vs fp64 at training shapes    correct.xml correct.log
#                    on the default path (auto backend; one tile config per kernel,
#                    PEFTKERN_TUNE=0: the bench steps check the tuned kernels)
#   lora       100   `peftkern bench lora`: the LoRA layer ratios (train, decode)      bench_lora.json
#   overhead    60   `peftkern bench overhead --quick` (skipped, saying so, if absent) bench_overhead.json
#   e2e        120   `peftkern bench e2e`: Llama-1.1B training step, LoRA case first   bench_e2e.json
#                    (the JSON is written when the op ends: a cut here keeps only the log)
#   ops         90   `peftkern bench` of the other ops (adapter, ia3, prefix, ...)     bench_ops.json
#   tests     rest   op, integration and distributed tests on CUDA (cut at the         tests.xml tests.log
#                    deadline: a cut here is reported, not a failure)
#   cuda       540   optional (--with-cuda or --steps cuda; its own deadline): build  cuda_*.log
#                    the extension, its tests, bench rows with the cuda backend        bench_cuda.json
# Every peftkern bench row is checked elementwise against fp64 on the inputs it is timed on (an error
# row fails the step); every step's wall time is printed and kept in $OUT/steps.tsv.
#
# --rehearse: CPU, tiny presets, --quick, the correctness tests on the Triton kernels under
# TRITON_INTERPRET=1 (PEFTKERN_REHEARSE=1), a small test list; caps x2 and a 600 s deadline (a shared
# 2-core CI machine); exits non-zero when a step fails or times out, like the real call.
# --steps a,b: only those steps (e.g. --steps cuda for the optional second call).
# Env: OUT (default .out, or a fresh temp dir with --rehearse), PYTHON, GPU_CHECK_BUDGET, CUDA_BUDGET,
# TESTS (pytest paths for the tests step), PYTEST_WORKERS (with pytest-xdist), PEFTKERN_COMMIT.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
rehearse=0; with_cuda=0; only=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --rehearse) rehearse=1 ;;
    --with-cuda) with_cuda=1 ;;
    --steps) only=${2:?--steps needs a comma-separated list}; shift ;;
    --steps=*) only=${1#--steps=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ALL_STEPS="env,correct,lora,overhead,e2e,ops,tests"
steps=${only:-$ALL_STEPS$([[ $with_cuda == 1 ]] && echo ,cuda)}
for s in ${steps//,/ }; do
  [[ ",$ALL_STEPS,cuda," == *",$s,"* ]] || { echo "gpu_check.sh: unknown step $s (have $ALL_STEPS,cuda)" >&2; exit 2; }
done
want() { [[ ",$steps," == *",$1,"* ]]; }

T0=$(date +%s)
# A rehearsal runs on a small shared CPU: caps x2 and a 10-minute deadline, only so a hang cannot outlast CI.
SCALE=$([[ $rehearse == 1 ]] && echo 2 || echo 1)
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET:-$([[ $rehearse == 1 ]] && echo 600 || echo 400)}))
GRACE=10  # SIGINT first; SIGKILL this much later if the step has not exited

if [[ $rehearse == 1 ]]; then
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_rehearse.XXXXXX")}
  PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
  DEV=(--device cpu --preset tiny --quick)
else
  OUT=${OUT:-$PWD/.out}
  PY=${PYTHON:-python3}
  DEV=()
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PEFTKERN_NO_BUILD=${PEFTKERN_NO_BUILD:-1}
export PEFTKERN_HOST_EXT=${PEFTKERN_HOST_EXT:-0}  # the CPU host extension serves CPU tensors only: no 30 s build here
export PEFTKERN_CACHE_DIR=${PEFTKERN_CACHE_DIR:-$PWD/.peftkern_cache}   # kept between calls on a warm machine
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [[ -z ${PEFTKERN_COMMIT:-} ]]; then
  PEFTKERN_COMMIT=$(git rev-parse --short HEAD 2>/dev/null) || PEFTKERN_COMMIT=unknown
  [[ $PEFTKERN_COMMIT != unknown && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] \
    && PEFTKERN_COMMIT=$PEFTKERN_COMMIT-dirty
fi
export PEFTKERN_COMMIT
[[ $PEFTKERN_COMMIT == unknown ]] && echo "WARNING: commit unknown (no .git here): render_table.py will refuse these" \
  "results; run as PEFTKERN_COMMIT=<hash> bash benchmarks/gpu_check.sh"

# Python with SIGINT as KeyboardInterrupt even where the caller started us with SIGINT ignored (a
# background job): pytest then prints its summary and junit XML when `timeout -s INT` fires.
PRELUDE='import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)'
PYRUN=("$PY" -c "$PRELUDE")  # then the module and its arguments

rc_all=0
printf 'step\tstatus\texit\tseconds\tcap\n' > "$OUT/steps.tsv"
summary=()

# run_step NAME CAP KIND CMD...: KIND is pytest|bench|plain (what to print from the log afterwards).
run_step() {
  local name=$1 cap=$2 kind=$3; shift 3
  local now left t status rc secs log=$OUT/$name.log
  now=$(date +%s); left=$((DEADLINE - now - GRACE)); cap=$((cap * SCALE))
  t=$(( cap < left ? cap : left ))
  if (( t < 10 )); then
    status="not run: no time left before the deadline"; rc=0; secs=0
  else
    local shown="$*"; shown=${shown//"-c $PRELUDE"/-m}
    echo "== [$name] cap ${t}s: $shown" | cut -c1-240
    local s0; s0=$(date +%s.%N)
    timeout -k "$GRACE" -s INT "$t" "$@" > "$log" 2>&1
    rc=$?
    secs=$(awk -v a="$s0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    if (( rc == 124 || rc == 137 )); then
      if [[ $name == tests ]] && ! grep -qE "[0-9]+ (failed|error)" "$log"; then
        status="cut at ${t}s (the time left); no failure before the cut"; rc=0
      else
        status="TIMEOUT after ${t}s"; rc=124
      fi
    elif (( rc == 0 )); then status=ok
    elif grep -q "unknown op" "$log" && [[ $name == overhead ]]; then
      status="skipped: this peftkern's \`bench\` has no overhead op yet"; rc=0
    else status="FAILED (exit $rc)"
    fi
    case $kind in
      pytest) grep -E "^(FAILED|ERROR) " "$log" | head -n 15; tail -n 1 "$log" ;;
      bench) grep -E "ERROR|^(op|lora|adapter|ia3|prefix|e2e|overhead) " "$log" | cut -c1-200 | head -n 40
             grep -E "Traceback|Error:" "$log" | tail -n 3 ;;
      plain) tail -n 5 "$log" ;;
    esac
  fi
  (( rc != 0 )) && rc_all=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$cap" >> "$OUT/steps.tsv"
  summary+=("$(printf '%-9s %7ss  (cap %4ss)  %s' "$name" "$secs" "$cap" "$status")")
  echo "== [$name] $status in ${secs}s (elapsed $(( $(date +%s) - T0 ))s)"
}

PYTEST=(pytest -q -p no:cacheprovider --tb=short -rfE)
bench_json() { echo "$OUT/bench_$1.json"; }

env_step() {  # exported: runs under `timeout` in a child bash
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 \
      || echo "nvidia-smi: not available"; echo "commit $PEFTKERN_COMMIT"; } > "$OUT/env.txt"
  "$PY" -c 'import json, sys, torch
from peftkern.bench import _timing
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
json.dump(_timing.environment(dev), open(sys.argv[1], "w"), indent=1)' "$OUT/env.json" || return 1
  "$PY" -m peftkern.cli info >> "$OUT/env.txt" || return 1
  cat "$OUT/env.txt" "$OUT/env.json"
}
export -f env_step
export OUT PY
want env && run_step env 30 plain bash -c env_step

if want correct; then
  if [[ $rehearse == 1 ]]; then
    run_step correct 90 pytest env PEFTKERN_REHEARSE=1 TRITON_INTERPRET=1 \
      "${PYRUN[@]}" "${PYTEST[@]}" tests/gpu --junitxml="$OUT/correct.xml"
  else
    run_step correct 90 pytest env PEFTKERN_TUNE=0 "${PYRUN[@]}" "${PYTEST[@]}" tests/gpu \
      --junitxml="$OUT/correct.xml"
  fi
fi

want lora && run_step lora 100 bench "${PYRUN[@]}" peftkern.cli bench lora "${DEV[@]}" --json "$(bench_json lora)"

if want overhead; then
  if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('peftkern.bench.overhead') is None)" 2>/dev/null
  then
    # --quick on the GPU too: on CUDA every timed block of this op waits out a ~1 s torch.cuda._sleep.
    run_step overhead 60 bench "${PYRUN[@]}" peftkern.cli bench overhead "${DEV[@]}" \
      $([[ $rehearse == 0 ]] && echo --quick) --json "$(bench_json overhead)"
  else
    printf 'overhead\tskipped: peftkern/bench/overhead.py not in this tree\t0\t0\t60\n' >> "$OUT/steps.tsv"
    summary+=("$(printf '%-9s %7ss  (cap %4ss)  %s' overhead 0 60 "skipped: peftkern/bench/overhead.py not in this tree")")
    echo "== [overhead] skipped: peftkern/bench/overhead.py not in this tree"
  fi
fi

want e2e && run_step e2e 120 bench "${PYRUN[@]}" peftkern.cli bench e2e "${DEV[@]}" --json "$(bench_json e2e)"

if want ops; then
  read -r -a OTHER_OPS <<< "$("$PY" -c "from peftkern.cli import OPS
print(' '.join(o for o in OPS if o not in ('lora', 'e2e', 'overhead')))")"
  run_step ops 90 bench "${PYRUN[@]}" peftkern.cli bench "${OTHER_OPS[@]}" "${DEV[@]}" --json "$(bench_json ops)"
fi

if want tests; then
  if [[ $rehearse == 1 ]]; then
    read -r -a TEST_PATHS <<< "${TESTS:-tests/test_op_outputs.py}"
  else
    read -r -a TEST_PATHS <<< "${TESTS:-tests/test_lora.py tests/test_prefix.py tests/test_ia3.py tests/test_adapter.py \
tests/test_op_outputs.py tests/test_lora_gpu_compile.py tests/integration tests/distributed tests/test_report.py}"
  fi
  par=(); "$PY" -c "import xdist" 2>/dev/null && [[ $rehearse == 0 ]] && par=(-n "${PYTEST_WORKERS:-8}")
  # Without the extension (PEFTKERN_NO_BUILD) the cuda-backend tests cannot run: the cuda step has them.
  sel=(); [[ $PEFTKERN_NO_BUILD != 0 ]] && sel=(-k "not cuda")
  run_step tests $(( (DEADLINE - $(date +%s)) / SCALE )) pytest env PEFTKERN_TUNE=0 "${PYRUN[@]}" "${PYTEST[@]}" \
    "${par[@]}" "${sel[@]}" "${TEST_PATHS[@]}" --junitxml="$OUT/tests.xml"
fi

if want cuda; then
  # Its own deadline, inside one command's 10-minute limit when it follows the default steps.
  DEADLINE=$(( $(date +%s) + ${CUDA_BUDGET:-540} )); (( DEADLINE > T0 + 590 )) && DEADLINE=$((T0 + 590))
  export PEFTKERN_NO_BUILD=0
  run_step cuda_build 300 plain "${PYRUN[@]}" peftkern.cli build
  run_step cuda_tests 150 pytest env PEFTKERN_TUNE=0 PEFTKERN_TEST_CACHE_DIR="$PEFTKERN_CACHE_DIR" "${PYRUN[@]}" \
    "${PYTEST[@]}" tests/test_lora_cuda.py tests/test_ia3_cuda.py tests/test_adapter_cuda.py tests/test_prefix_cuda.py \
    -k cuda tests/test_ia3.py --junitxml="$OUT/cuda_tests.xml"
  run_step cuda_bench 120 bench "${PYRUN[@]}" peftkern.cli bench lora ia3 adapter prefix --no-compile "${DEV[@]}" \
    --json "$(bench_json cuda)"
fi

echo
echo "== gpu_check$([[ $rehearse == 1 ]] && echo ' --rehearse'): $(( $(date +%s) - T0 ))s in all, commit $PEFTKERN_COMMIT, results in $OUT"
printf '%s\n' "${summary[@]}"
exit $rc_all
