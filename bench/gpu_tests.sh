#!/usr/bin/env bash
# The tests that need the GPU (`pytest -m cuda`), each test file in its own process, four at a time: an
# illegal memory access poisons only its own file's CUDA context. A skipped CUDA test, or a test file
# skipped whole, fails (LORA_EXT_REQUIRE_CUDA_TESTS=1). Exit 5 (no CUDA test in a file) counts as passed.
# Usage: bench/gpu_tests.sh LOG_DIR   (per file: LOG_DIR/tests_NAME.log and junit_NAME.xml; and
# LOG_DIR/tests_summary.txt, a line per file). PYTHON picks the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:?usage: gpu_tests.sh LOG_DIR}
mkdir -p "$logs"
: > "$logs/tests_summary.txt"
files=()
for f in tests/test_*.py; do
  [[ $f == *kernels_emulated* || $f == *kernels_sanitized* ]] || files+=("$f")  # CPU emulation: CI runs those
done
printf '%s\n' "${files[@]}" | LORA_EXT_REQUIRE_CUDA_TESTS=1 xargs -P 4 -I{} sh -c '
  name=$(basename "{}" .py)
  "$0" -m pytest -q -rs -p no:cacheprovider -m cuda "{}" --junitxml "$1/junit_$name.xml" > "$1/tests_$name.log" 2>&1
  rc=$?; [ $rc -eq 5 ] && rc=0
  echo "$name: exit $rc: $(tail -1 "$1/tests_$name.log")" >> "$1/tests_summary.txt"
  exit $rc' "${PYTHON:-python3}" "$logs"
rc=$?
sort -o "$logs/tests_summary.txt" "$logs/tests_summary.txt"
cat "$logs/tests_summary.txt"
exit $rc
