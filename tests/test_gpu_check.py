"""bench/gpu_check.sh, the one command for the GPU machine, run here with --dry-run (every step's
command recorded, none run): what comes back fits the device tool's limits, --only selects steps, the
time budget cuts steps short; the test-suite rule it relies on, that a skipped CUDA test fails where
CUDA tests must run; and gpu_smoke's NF4 comparison, which must allow what differs between devices and
nothing else."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import lora_ext
from lora_ext import reference as R

from conftest import requires_c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["build", "tests", "memcheck", "racecheck", "finetune", "bench", "bench_cuda_cores"]
RETURNED = {"summary.md", "results.json", "results_cuda_cores.json", "bench.png", "logs.tar.gz"}


def _run(tmp_path, *args, **env):
    out = tmp_path / "out"
    # gpu_check's own defaults are under test: nothing from the caller's environment (CI exports MAX_JOBS=2)
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHON", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "GPU_CHECK_BUDGET_S")}
    environment.update(OUT=str(out), TMPDIR=str(tmp_path), **env)
    result = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=120)
    return result, out


def _logs(out):
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {os.path.basename(m.name): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_dry_run_reaches_the_end_and_returns_what_the_device_tool_brings_back(tmp_path):
    result, out = _run(tmp_path, "--dry-run")
    assert result.returncode == 0 and result.stdout.rstrip().endswith("ALL OK"), result.stdout + result.stderr
    files = {p.name for p in out.iterdir()}
    assert files <= RETURNED and {"summary.md", "logs.tar.gz"} <= files and all(p.is_file() for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | ok |" in summary
    logs = _logs(out)
    assert {f"{name}.log" for name in STEPS} <= set(logs)
    # python3 unless PYTHON says otherwise (the GPU machine has no `python`); sm_90 on 16 cores
    assert logs["build.log"].startswith("python3 setup.py build_ext --inplace")
    assert "MAX_JOBS=16" in logs["build.log"] and "TORCH_CUDA_ARCH_LIST=9.0" in logs["build.log"]
    assert "bench/gpu_tests.sh" in logs["tests.log"]
    for name, script in (("memcheck", "gpu_smoke.py"), ("racecheck", "gpu_racecheck.py")):
        assert f"--tool {name}" in logs[f"{name}.log"] and script in logs[f"{name}.log"]
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in logs[f"{name}.log"]  # the allocator would hide overruns
    assert "--steps 100" in logs["finetune.log"]
    assert str(out / "results.json") in logs["bench.log"]
    assert "LORA_EXT_TENSOR_CORES=0" in logs["bench_cuda_cores.log"]


def test_only_runs_the_named_steps_after_the_build(tmp_path):
    result, out = _run(tmp_path, "--dry-run", "--only", "racecheck,bench", PYTHON="python3.99")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("== ")]
    assert ran == ["build", "racecheck", "bench"]
    assert _logs(out)["racecheck.log"].count("python3.99") == 1


def test_a_spent_budget_stops_steps_and_says_what_to_rerun(tmp_path):
    result, out = _run(tmp_path, "--dry-run", "--only", "tests,finetune", GPU_CHECK_BUDGET_S="9")
    assert result.returncode == 1
    assert "NOT RUN" in (out / "summary.md").read_text()
    assert result.stdout.rstrip().splitlines()[-1] == "FAILED: build"


def test_unknown_step_is_refused(tmp_path):
    result, _ = _run(tmp_path, "--dry-run", "--only", "tests,benchmark")
    assert result.returncode == 2 and "unknown step 'benchmark'" in result.stderr


def test_a_skipped_cuda_test_fails_where_cuda_tests_must_run(tmp_path):
    """LORA_EXT_REQUIRE_CUDA_TESTS=1 (gpu_tests.sh sets it): a CUDA test that is skipped, or a test module
    skipped whole (a package missing on the GPU machine), fails instead of passing silently."""
    (tmp_path / "test_needs_gpu.py").write_text(
        "from conftest import requires_cuda\n\n@requires_cuda\ndef test_on_the_gpu():\n    pass\n\n"
        "def test_on_the_cpu():\n    pass\n")
    (tmp_path / "test_skipped_whole.py").write_text(
        "import pytest\npytest.importorskip('no_such_package_here')\n\ndef test_x():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir",
           str(tmp_path), "-m", "cuda"]
    for name in ("test_needs_gpu.py", "test_skipped_whole.py"):
        relaxed = subprocess.run([*cmd, str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=120)
        strict = subprocess.run([*cmd, str(tmp_path / name)], env=dict(env, LORA_EXT_REQUIRE_CUDA_TESTS="1"),
                                capture_output=True, text=True, timeout=120)
        if name == "test_needs_gpu.py" and "needs a CUDA device" not in relaxed.stdout + relaxed.stderr:
            pytest.skip("this machine has a GPU: the test would run, not be skipped")
        assert relaxed.returncode in (0, 5) and "skipped" in relaxed.stdout, relaxed.stdout + relaxed.stderr  # 5: none ran
        assert strict.returncode != 0 and "where CUDA tests must run" in strict.stdout, strict.stdout


@requires_c
def test_smoke_nf4_check_allows_the_devices_summation_order_and_nothing_else():
    """The double-quant offset is mean(absmax), summed in another order on the GPU: a state quantized
    with an offset one ulp away (and the nested bits that follow from it) passes, though its decoded
    values differ from the CPU's; a changed packed byte or nested code does not."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", os.path.join(ROOT, "bench", "gpu_smoke.py"))
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    w = torch.randn(129, 257)
    cpu = lora_ext.quantize_nf4(w, 64, True)
    raw = torch.ops.lora_ext.quantize_nf4(w, 64)[1]
    offset = torch.nextafter(cpu.offset, torch.tensor(float("inf")))
    q, nested = R.quantize_blockwise_8bit(raw - offset, R.dynamic_map(), 256)
    other_device = dataclasses.replace(cpu, absmax=q, nested_absmax=nested, offset=offset)
    assert not torch.equal(other_device.dequantize(), cpu.dequantize())  # a bit-for-bit check would fail
    assert smoke.nf4_state_matches(w, cpu, other_device)
    assert smoke.nf4_decodes_alike(cpu, "cpu")
    flipped = cpu.data.clone()
    flipped[7] ^= 0x10
    assert not smoke.nf4_state_matches(w, cpu, dataclasses.replace(other_device, data=flipped))
    wrong_code = q.clone()
    wrong_code[3] += 1
    assert not smoke.nf4_state_matches(w, cpu, dataclasses.replace(other_device, absmax=wrong_code))
    assert smoke.nf4_state_matches(w, lora_ext.quantize_nf4(w, 64, False), lora_ext.quantize_nf4(w, 64, False))
