import zlib

import pytest
import torch

import lora_ext

requires_c = pytest.mark.skipif(not lora_ext.HAS_C, reason="lora_ext._C is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
