"""The operator registry: every op has a CPU kernel, a CUDA kernel when built with CUDA, a fake
kernel and a pure-PyTorch reference; and the package works without the compiled library."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_ext
from lora_ext import reference

from conftest import requires_c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _our_ops():
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("lora_ext::"))


@requires_c
def test_ops_are_registered():
    assert {"lora_ext::quantize_nf4", "lora_ext::double_quant", "lora_ext::dequantize_nf4"} <= set(_our_ops())


@requires_c
@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel_for_each_built_device(key):
    config = lora_ext.build_config()
    assert config is not None, "lora_ext/_build_config.py is missing: the build did not go through setup.py"
    if key == "CUDA" and not config.WITH_CUDA:
        pytest.skip("built without CUDA")
    # computed: a kernel of the device's own, or a composite one (an op built from other ops)
    missing = [op for op in _our_ops() if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(op, key)]
    assert not missing, f"built with {key} but these ops have no {key} kernel: {missing}"


@requires_c
def test_cuda_build_when_expected():
    """CI sets LORA_EXT_EXPECT_CUDA=1: a build that silently fell back to CPU-only fails here."""
    if os.environ.get("LORA_EXT_EXPECT_CUDA") != "1":
        pytest.skip("LORA_EXT_EXPECT_CUDA is not set")
    config = lora_ext.build_config()
    assert config.WITH_CUDA, "expected a CUDA build (torch has CUDA and nvcc is on PATH), got CPU-only"
    archs = config.CUDA_ARCH_LIST.replace("+PTX", "").split(";")
    assert "9.0" in archs or "9.0a" in archs, f"sm_90 missing from {config.CUDA_ARCH_LIST}"


@requires_c
def test_every_op_has_a_reference():
    missing = [op for op in _our_ops() if not callable(getattr(reference, op.split("::")[1], None))]
    assert not missing, f"no lora_ext.reference function for {missing}"


def test_imports_and_explains_without_compiled_library():
    code = textwrap.dedent("""
        import sys
        sys.modules["lora_ext._C"] = None  # as if it was never built
        import torch, lora_ext
        assert not lora_ext.HAS_C
        packed, absmax = lora_ext.reference.quantize_nf4(torch.randn(4, 64), 64)
        assert packed.shape == (128, 1)
        try:
            lora_ext.quantize_nf4(torch.randn(4, 64))
        except RuntimeError as e:
            assert "pip install --no-build-isolation ." in str(e), e
            print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
