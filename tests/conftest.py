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
