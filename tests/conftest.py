import os
import zlib

import pytest
import torch

import lora_ext

requires_c = pytest.mark.skipif(not lora_ext.HAS_C, reason="lora_ext._C is not built")
# Marks a test that needs a GPU: `pytest -m cuda` selects exactly these (bench/gpu_check.sh), and they
# are skipped where there is none.
requires_cuda = pytest.mark.cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# Set by bench/gpu_check.sh on the GPU machine: there a skipped CUDA test, or a test module skipped
# whole (a missing package), is a failure, never a silent pass.
MUST_RUN_CUDA_TESTS = os.environ.get("LORA_EXT_REQUIRE_CUDA_TESTS") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at each of t's values, in fp64."""
    fi = torch.finfo(t.dtype)
    mag = t.double().abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def backward_nodes(layer, x):
    """The autograd nodes a backward through layer(x) evaluates, by the profiler's record of the engine
    (torch 2.11's nodes for custom ops refuse .name() and .next_functions), without the leaves'
    AccumulateGrad and the final sum."""
    x = x.detach().requires_grad_()
    y = layer(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.sum().backward()
    prefix = "autograd::engine::evaluate_function: "
    names = [e.name[len(prefix):] for e in prof.events() if e.name.startswith(prefix)]
    return [n for n in names if "AccumulateGrad" not in n and "SumBackward" not in n]


def on_each_simd_path(script: str, paths=("0", "1")):
    """(LORA_EXT_DISABLE_SIMD value, the float `script` prints) for a fresh process per path: the CPU kernels'
    SIMD path is chosen once per process."""
    import subprocess
    import sys
    for flag in paths:
        env = dict(os.environ, LORA_EXT_DISABLE_SIMD=flag, PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        yield flag, float(out.stdout)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if MUST_RUN_CUDA_TESTS and report.skipped and item.get_closest_marker("cuda"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"a CUDA test was skipped where CUDA tests must run (LORA_EXT_REQUIRE_CUDA_TESTS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if MUST_RUN_CUDA_TESTS and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{report.nodeid} was skipped whole where CUDA tests must run: {reason}"


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random data per test, reproducible from the test id."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels and launchers, built for the CPU (tests/emulated.py)."""
    import emulated as emu
    lib, why = emu.build(str(tmp_path_factory.mktemp("cuda_emulation")))
    if lib is None:
        pytest.skip(why)
    return lib


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
