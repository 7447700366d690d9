#!/usr/bin/env bash
# The one command for the GPU machine (see DESIGN.md, Machines): build for sm_90, run the whole test
# suite with the GPU tests, compute-sanitizer memcheck over a smoke script, 100 steps of the main job
# (finetune), the quick benchmarks.
# Also: the LoRA layer benchmark with tensor cores off, and racecheck over bench/gpu_racecheck.py.
# Writes logs, results.json and summary.md under $OUT. Every step runs (a failed build stops it);
# the exit status is non-zero when any step failed, and the last line names the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LORA_EXT_EXPECT_CUDA=1
failed=()
t_start=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($(( $(date +%s) - t0 )) s)"; echo "| $name | ok | $(( $(date +%s) - t0 )) s |" >> "$OUT/steps.md"
  else
    echo "   FAILED ($(( $(date +%s) - t0 )) s), log: $OUT/$name.log"; tail -25 "$OUT/$name.log"
    echo "| $name | FAILED | $(( $(date +%s) - t0 )) s |" >> "$OUT/steps.md"
    failed+=("$name")
  fi
}

write_summary() {  # written after the main steps and again at the end: a run cut short still has one
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo; echo '```'; cat "$OUT/env.json"; echo '```'
    echo; cat "$OUT/steps.md"
    echo; echo "## tests"; echo '```'; tail -3 "$OUT/tests.log" 2>/dev/null; echo '```'
    echo; echo "## finetune (main job, 100 steps)"; echo '```'; tail -4 "$OUT/finetune.log" 2>/dev/null; echo '```'
    echo; echo "## bench (quick)"; echo '```'; cat "$OUT/bench.log" 2>/dev/null; echo '```'
    echo; echo "## lora_layer, tensor cores off"; echo '```'; cat "$OUT/bench_cuda_cores.log" 2>/dev/null; echo '```'
    echo; echo "## ptxas"; echo '```'; cat "$OUT/ptxas.txt"; echo '```'
  } > "$OUT/summary.md"
}

echo "| step | result | time |" > "$OUT/steps.md"
echo "|---|---|---|" >> "$OUT/steps.md"

if compgen -G ".whl/*.whl" > /dev/null; then
  PEERS=/tmp/lora_ext_peers
  step peers 120 python -m pip install -q --no-index --no-deps --target "$PEERS" .whl/*.whl
  export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - > "$OUT/env.json" 2>&1 <<'PY'
import json, shutil, subprocess, torch
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}, indent=2))
PY

step build 300 python setup.py build_ext --inplace
python .ci/ptxas_summary.py "$OUT/build.log" > "$OUT/ptxas.txt" 2>&1
if [[ " ${failed[*]} " == *" build "* ]]; then
  echo "FAILED: build"; exit 1
fi
# The real kernels run here: their CPU emulation (tests/test_*_kernels_emulated.py,
# test_kernels_race_free.py) is left to CI.
step tests 300 python -m pytest -q -rs tests -k "not kernels_emulated and not race_free" --junitxml "$OUT/junit.xml"
if command -v compute-sanitizer > /dev/null; then
  step sanitizer 180 compute-sanitizer --tool memcheck --error-exitcode 9 python bench/gpu_smoke.py
else
  echo "compute-sanitizer not found" > "$OUT/sanitizer.log"; failed+=("sanitizer")
  echo "| sanitizer | FAILED (compute-sanitizer not found) | - |" >> "$OUT/steps.md"
fi
step finetune 120 python -m lora_ext finetune --device cuda --steps 100 --out "$OUT/finetune"
step bench 240 python -m lora_ext bench --device cuda --quick --json "$OUT/results.json" --plot "$OUT/bench.png"
write_summary
# The LoRA layer again with the tensor-core kernel off (lora_gemm_tc.cuh against lora_gemm.cuh).
LORA_EXT_TENSOR_CORES=0 step bench_cuda_cores 90 python -m lora_ext bench --device cuda --quick --only lora_layer \
  --json "$OUT/results_cuda_cores.json"
# Shared-memory hazards in the LoRA kernels (the CPU race test's GPU counterpart); last, as the slowest.
if command -v compute-sanitizer > /dev/null; then
  step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 python bench/gpu_racecheck.py
fi

write_summary
echo "total $(( $(date +%s) - t_start )) s; summary: $OUT/summary.md"
if (( ${#failed[@]} )); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "ALL OK"
