"""The CUDA low-rank kernels (csrc/lora/lora_gemm.cuh) run on the CPU. The host compiler builds the
kernels' own source under tests/emulation/cuda_emulation.h: each CUDA thread is a std::thread and
__syncthreads is a barrier. The kernels then run on the operands lora_cuda_api.cpp passes them, and
are checked against fp64 matmuls and against the CPU operator. So every CPU run checks the kernels'
tiling, strides, bounds, split-K and dropout indexing, which otherwise only a GPU would test."""
import ctypes
import glob
import math
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

import lora_ext

from conftest import requires_c

pytestmark = requires_c

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # lora_launch.h's DType


def _cuda_include_dirs():
    dirs = []
    try:
        from lora_ext import _build_config
        if _build_config.CUDA_HOME:
            dirs.append(os.path.join(_build_config.CUDA_HOME, "include"))
    except ImportError:
        pass
    dirs += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "include")))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    includes = _cuda_include_dirs()
    if cxx is None or not includes:
        pytest.skip("needs a C++20 compiler and the CUDA headers (toolkit or nvidia-* wheels)")
    lib = str(tmp_path_factory.mktemp("emulation") / "lowrank_gemm_emulated.so")
    cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-ffp-contract=off", f"-I{CSRC}",
           *[f"-I{d}" for d in includes], os.path.join(HERE, "emulation", "lowrank_gemm_emulated.cpp"), "-o", lib,
           "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(lib)
    dll.lowrank_gemm_emulated.restype = ctypes.c_int
    dll.lowrank_gemm_emulated.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_double,
                                  ctypes.c_uint64])
    return dll


# Operands as lora_cuda_api.cpp describes them: (tensor, rows, cols, row stride, col stride).
def as_is(t):
    return t, t.shape[0], t.shape[1], t.shape[1], 1


def transposed(t):
    return t, t.shape[1], t.shape[0], 1, t.shape[1]


def gemm(kernels, a, b, out, alpha=1.0, addend=None, dropout_a=False, dropout_out=False, p=0.0, seed=0, splits=1):
    """out = alpha * a b [+ addend] by the emulated kernels, as lora_cuda_api.cpp's lowrank_gemm."""
    (at, m, k, a_sm, a_sk), (bt, kb, n, b_sk, b_sn) = a, b
    assert k == kb and bt.dtype == torch.float32 and out.is_contiguous() and out.shape == (m, n)
    workspace = torch.empty(splits * m * n) if splits > 1 else None
    ok = kernels.lowrank_gemm_emulated(
        at.data_ptr(), a_sm, a_sk, DTYPE_CODE[at.dtype], bt.data_ptr(), b_sk, b_sn,
        addend.data_ptr() if addend is not None else None, out.data_ptr(), DTYPE_CODE[out.dtype],
        workspace.data_ptr() if workspace is not None else None, m, n, k, splits, alpha, int(dropout_a),
        int(dropout_out), p, seed)
    assert ok == 1, "no kernel for this dtype pair"
    return out


def forward(kernels, x, base_out, A, B, scale, p, seed, splits):
    M, K, r, N = x.numel() // x.shape[-1], x.shape[-1], A.shape[0], B.shape[0]
    x2, A32, B32 = x.reshape(M, K).contiguous(), A.float().contiguous(), B.float().contiguous()
    T = gemm(kernels, as_is(x2), transposed(A32), torch.empty(M, r), dropout_a=p > 0, p=p, seed=seed, splits=splits)
    y = gemm(kernels, as_is(T), transposed(B32), torch.empty(M, N, dtype=base_out.dtype), alpha=scale,
             addend=base_out.reshape(M, N).contiguous())
    return y.view(base_out.shape), T.to(A.dtype)


def backward(kernels, grad_y, x, T, A, B, scale, p, seed, splits):
    M, K, r, N = x.numel() // x.shape[-1], x.shape[-1], A.shape[0], B.shape[0]
    dy, x2 = grad_y.reshape(M, N).contiguous(), x.reshape(M, K).contiguous()
    A32, B32, T32 = A.float().contiguous(), B.float().contiguous(), T.float().contiguous()
    dT = gemm(kernels, as_is(dy), as_is(B32), torch.empty(M, r), alpha=scale, splits=splits)
    dB = gemm(kernels, transposed(dy), as_is(T32), torch.empty(N, r), alpha=scale, splits=splits)
    dAt = gemm(kernels, transposed(x2), as_is(dT), torch.empty(K, r), dropout_a=p > 0, p=p, seed=seed, splits=splits)
    dx = gemm(kernels, as_is(dT), as_is(A32), torch.empty(M, K, dtype=x.dtype), dropout_out=p > 0, p=p, seed=seed)
    return dx.view(x.shape), dAt.t().contiguous().to(A.dtype), dB.to(B.dtype)


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * (b.abs().max().item() + 1e-30))


@pytest.mark.parametrize("M, K, N, orientation, splits", [
    (1, 1, 1, "along_k", 1), (70, 33, 5, "along_k", 1), (64, 48, 16, "along_m", 1), (65, 17, 17, "along_k", 2),
    (130, 1100, 70, "along_m", 3), (9, 40, 130, "along_k", 7),  # 7 slices of 16 over K = 40: some are empty
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_against_fp64_matmul(kernels, M, K, N, orientation, splits, dtype):
    """One product, both ways of reading a (rows contiguous along k, or along m as for dy^T and x^T),
    tiles cut at every edge, narrow (N <= 16) and wide tiles, K split into slices (some empty)."""
    a_store = torch.randn(M, K).to(dtype) if orientation == "along_k" else torch.randn(K, M).to(dtype)
    a = as_is(a_store) if orientation == "along_k" else transposed(a_store)
    b = torch.randn(K, N)
    out = gemm(kernels, a, as_is(b), torch.empty(M, N), alpha=0.5, splits=splits)
    a_mat = a_store.double() if orientation == "along_k" else a_store.double().t()
    _close(out, 0.5 * a_mat @ b.double(), 1e-5)
    # fp32 in, 16-bit out with an addend: one rounding of alpha * acc + addend
    if dtype != torch.float32:
        a32, addend = torch.randn(M, K), torch.randn(M, N).to(dtype)
        out16 = gemm(kernels, as_is(a32), as_is(b), torch.empty(M, N, dtype=dtype), alpha=1.5, addend=addend)
        exact = (1.5 * a32.double() @ b.double() + addend.double()).to(dtype)
        assert (out16 != exact).double().mean().item() < 0.02
        _close(out16, exact, 1e-2)


@pytest.mark.parametrize("M, K, N, r, p, act, splits, offset", [
    (7, 40, 24, 4, 0.25, torch.float32, 1, 0),        # K % 4 == 0: dropout drawn in groups of four
    (67, 33, 70, 12, 0.3, torch.bfloat16, 2, 0),      # K odd: dropout drawn element by element
    (130, 36, 20, 80, 0.1, torch.float16, 3, 1),      # r > 64: two column tiles; x unaligned (no vector loads)
    (5, 7, 3, 1, 0.0, torch.bfloat16, 1, 0),          # r = 1, no dropout
])
def test_lora_branch_matches_the_cpu_operator(kernels, M, K, N, r, p, act, splits, offset):
    """Forward and backward built from the emulated kernels exactly as the CUDA operator builds them,
    against the CPU operator: the same values, and the same elements of x dropped."""
    x = torch.randn(M * K + offset).to(act)[offset:].view(M, K)
    assert offset == 0 or x.data_ptr() % 8 != 0
    base_out, grad_y = torch.randn(M, N).to(act), torch.randn(M, N).to(act)
    A, B = torch.randn(r, K) / math.sqrt(K), torch.randn(N, r) / math.sqrt(r)
    scale, seed = 1.25, 4242
    y, T = forward(kernels, x, base_out, A, B, scale, p, seed, splits)
    y_cpu, T_cpu = torch.ops.lora_ext.lora_forward(x, base_out, A, B, scale, p, seed)
    tol = 1e-5 if act == torch.float32 else 1e-2
    _close(y, y_cpu, tol)
    _close(T, T_cpu, 1e-5)
    grads = backward(kernels, grad_y, x, T_cpu, A, B, scale, p, seed, splits)
    grads_cpu = torch.ops.lora_ext.lora_backward(grad_y, x, T_cpu, A, B, scale, p, seed)
    for name, ours, ref in zip(("dx", "dA", "dB"), grads, grads_cpu):
        _close(ours, ref, tol if name == "dx" else 1e-5)
    if p > 0:
        assert torch.equal(grads[0] == 0, grads_cpu[0] == 0), "the same elements of x are dropped"
        assert (grads[0] == 0).any()
