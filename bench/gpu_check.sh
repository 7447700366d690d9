#!/usr/bin/env bash
# The one command for the GPU machine (DESIGN.md, Machines), sized for its short window: one call of at
# most ~7 minutes. Correctness first, speed last:
#   build       sm_90 on every core (incremental: a rerun on a warm machine rebuilds only what changed)
#   tests       the tests that need the GPU (`pytest -m cuda`; the CPU tests are CI's), one process per
#               file, so an illegal memory access poisons one file's CUDA context, not every later test;
#               a skipped CUDA test fails the step (LORA_EXT_REQUIRE_CUDA_TESTS=1)
#   memcheck    compute-sanitizer memcheck over bench/gpu_smoke.py   } without PyTorch's caching allocator,
#   racecheck   compute-sanitizer racecheck over bench/gpu_racecheck.py } so an overrun leaves its allocation
#   finetune    100 steps of the main job
#   bench       the quick benchmarks (results.json, bench.png)
#   bench_cuda_cores  the LoRA layer again with the tensor-core kernel off (results_cuda_cores.json)
#
# Usage: bash bench/gpu_check.sh [--only STEP,...] [--dry-run]
#   --only     run just these steps (build always runs first); the last line names the failed ones
#   --dry-run  run no step's command, only the script around them (how CI tests this script)
# The whole run keeps to GPU_CHECK_BUDGET_S (440 s): each step's limit is cut to what is left, and a
# step with no time left is reported as such, to be rerun with --only.
# $OUT receives at most 8 files (what the device tool brings back): summary.md, results.json,
# results_cuda_cores.json, bench.png and logs.tar.gz (every log). summary.md and logs.tar.gz are
# rewritten after every step, so a run cut short still says what it saw.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(build tests memcheck racecheck finetune bench bench_cuda_cores)
only="" dry_run=0
while (($#)); do
  case $1 in
    --only) only=${2:?--only needs STEP[,STEP...]}; shift 2 ;;
    --only=*) only=${1#--only=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "usage: $0 [--only STEP,...] [--dry-run]; steps: ${STEPS[*]}" >&2; exit 2 ;;
  esac
done
for s in ${only//,/ }; do
  [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu_check: unknown step '$s'; steps: ${STEPS[*]}" >&2; exit 2; }
done
selected() { [[ -z $only || ",$only," == *",$1,"* || $1 == build ]]; }

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
BUDGET=${GPU_CHECK_BUDGET_S:-440}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LORA_EXT_EXPECT_CUDA=1
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
failed=()
echo "| step | result | time |" > "$LOGS/steps.md"
echo "|---|---|---|" >> "$LOGS/steps.md"

write_summary() {  # after every step
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)${only:+ (--only $only)}"
    echo; echo '```'; cat "$LOGS/env.json" 2>/dev/null; echo '```'
    echo; cat "$LOGS/steps.md"
    echo; echo "## tests (one process per file)"; echo '```'; cat "$LOGS/tests_summary.txt" 2>/dev/null; echo '```'
    echo; echo "## memcheck, racecheck"; echo '```'
    tail -4 "$LOGS/memcheck.log" 2>/dev/null; tail -4 "$LOGS/racecheck.log" 2>/dev/null; echo '```'
    echo; echo "## finetune (main job, 100 steps)"; echo '```'; tail -4 "$LOGS/finetune.log" 2>/dev/null; echo '```'
    echo; echo "## bench (quick)"; echo '```'; cat "$LOGS/bench.log" 2>/dev/null; echo '```'
    echo; echo "## lora_layer, tensor cores off"; echo '```'; cat "$LOGS/bench_cuda_cores.log" 2>/dev/null; echo '```'
    echo; echo "## ptxas"; echo '```'; cat "$LOGS/ptxas.txt" 2>/dev/null; echo '```'
  } > "$OUT/summary.md"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}

step() {  # step NAME LIMIT_S CMD... : CMD's output goes to $LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0 left
  t0=$(date +%s)
  left=$((BUDGET - (t0 - t_start)))
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  if ((limit < 10)); then
    echo "   NOT RUN: the budget of ${BUDGET} s is spent"
    echo "| $name | NOT RUN (no time left) | - |" >> "$LOGS/steps.md"
    failed+=("$name"); write_summary; return
  fi
  local rc=0
  if ((dry_run)); then
    { printf '%q ' "$@"; echo; env | grep -E '^(PYTORCH_NO_CUDA_MEMORY_CACHING|LORA_EXT_TENSOR_CORES|MAX_JOBS|TORCH_CUDA_ARCH_LIST)='; } \
      > "$LOGS/$name.log"
  else
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  fi
  local dt=$(($(date +%s) - t0))
  if ((rc == 0)); then
    echo "   ok (${dt} s)"; echo "| $name | ok | ${dt} s |" >> "$LOGS/steps.md"
  else
    local why="exit $rc"; ((rc == 124 || rc == 137)) && why="timed out after ${limit} s"
    echo "   FAILED ($why, ${dt} s)"; tail -25 "$LOGS/$name.log"
    echo "| $name | FAILED ($why) | ${dt} s |" >> "$LOGS/steps.md"
    failed+=("$name")
  fi
  write_summary
}

# Peers (no network there): bitsandbytes and torchao from .whl/, into a folder on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null && ((!dry_run)); then
  PEERS=$LOGS/peers
  "$PY" -m pip install -q --no-index --no-deps --target "$PEERS" .whl/*.whl > "$LOGS/peers.log" 2>&1 \
    || echo "gpu_check: installing .whl/ failed (see peers.log): the peer comparisons will be skipped"
  export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - > "$LOGS/env.json" 2>&1 <<'PY'
import json, shutil, subprocess, torch
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("nvidia-smi") else None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}, indent=2))
PY

step build 240 "$PY" setup.py build_ext --inplace
"$PY" .ci/ptxas_summary.py "$LOGS/build.log" > "$LOGS/ptxas.txt" 2>&1
if [[ " ${failed[*]} " == *" build "* ]]; then
  write_summary; echo "FAILED: build"; exit 1
fi
selected tests && step tests 150 bash bench/gpu_tests.sh "$LOGS"
selected memcheck && PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 150 \
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" bench/gpu_smoke.py
selected racecheck && PYTORCH_NO_CUDA_MEMORY_CACHING=1 step racecheck 90 \
  compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" bench/gpu_racecheck.py
selected finetune && step finetune 90 "$PY" -m lora_ext finetune --device cuda --steps 100 --out "$LOGS/finetune"
selected bench && step bench 150 "$PY" -m lora_ext bench --device cuda --quick --json "$OUT/results.json" \
  --plot "$OUT/bench.png"
selected bench_cuda_cores && LORA_EXT_TENSOR_CORES=0 step bench_cuda_cores 60 "$PY" -m lora_ext bench --device cuda \
  --quick --only lora_layer --json "$OUT/results_cuda_cores.json"

write_summary
echo "total $(($(date +%s) - t_start)) s; $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if ((${#failed[@]})); then
  list=$(IFS=,; echo "${failed[*]}")
  echo "FAILED: ${failed[*]}"
  echo "rerun: bash bench/gpu_check.sh --only $list"
  exit 1
fi
echo "ALL OK"
