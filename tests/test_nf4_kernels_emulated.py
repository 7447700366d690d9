"""The CUDA NF4 and merge kernels and their launchers (csrc/nf4/*_cuda.cu, csrc/merge/merge_cuda.cu),
run on the CPU (tests/emulated.py: each CUDA thread a std::thread, __syncthreads a barrier, warp
shuffles through per-warp barriers). The CPU kernels are bit-exact with bitsandbytes
(tests/test_nf4.py), and these tests hold the CUDA kernels to the same bits. That covers the
warp-per-block quantizer, the double quantizer, both dequantize paths (16-byte vector and bytewise),
the GEMV's vector and scalar paths, and the merges."""
import math

import pytest
import torch

import lora_ext
from lora_ext import reference as R

from conftest import requires_c
from emulated import code, ptr

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _scales(qw):
    """The (absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2) a launcher gets. Raw
    pointers: every tensor they point into must be held by a name until the call returns."""
    if qw.double_quant:
        return None, ptr(qw.absmax), ptr(qw.nested_absmax), ptr(qw.nested_code), ptr(qw.offset), \
            int(math.log2(qw.nested_blocksize))
    return ptr(qw.absmax), None, None, None, None, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, blocksize", [(1, 64), (15, 32), (64 * 3 + 7, 64), (4096 * 2 + 5, 4096), (700, 128)])
def test_quantize_equals_the_cpu_kernel(emulated, dtype, n, blocksize):
    """One warp per block, the absmax reduced by shuffles. The tail block is partial, and one value
    lies exactly on a code midpoint."""
    x = torch.randn(n).to(dtype)
    if n > 40:
        x[:32] = 0.0                                        # an all-zero block (blocksize 32)
        x[40] = x[41:64].abs().max() * 0.5 * (0.5626170039176941 + 0.44070982933044434)  # a midpoint
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.empty((n + blocksize - 1) // blocksize)
    emulated.emu_quantize_nf4(ptr(x), code(dtype), ptr(packed), ptr(absmax), n, int(math.log2(blocksize)))
    packed_cpu, absmax_cpu = torch.ops.lora_ext.quantize_nf4(x, blocksize)
    assert torch.equal(packed, packed_cpu) and torch.equal(absmax, absmax_cpu)


@pytest.mark.parametrize("n", [1, 255, 600])
def test_double_quant_equals_the_cpu_kernel(emulated, n):
    absmax, code_map = torch.rand(n) * 3, R.dynamic_map()
    q_cpu, nested_cpu, offset = torch.ops.lora_ext.double_quant(absmax, code_map, 256)
    q = torch.empty(n, dtype=torch.uint8)
    nested = torch.empty((n + 255) // 256)
    emulated.emu_double_quant(ptr(absmax), ptr(offset), ptr(code_map), ptr(q), ptr(nested), n, 8)
    assert torch.equal(q, q_cpu) and torch.equal(nested, nested_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n, aligned", [(64 * 9, True), (64 * 9 + 13, True), (33, True), (64 * 9 + 13, False)])
def test_dequantize_equals_the_cpu_kernel(emulated, dtype, double_quant, n, aligned):
    """16-byte vector chunks with a ragged tail when packed and out are aligned; byte by byte when the
    packed bytes are a view at an odd offset."""
    qw = lora_ext.quantize_nf4(torch.randn(n), 64, double_quant)
    packed = qw.packed.reshape(-1)
    if not aligned:
        raw = torch.empty(packed.numel() + 1, dtype=torch.uint8)
        raw[1:] = packed
        packed = raw[1:]
    out = torch.empty(n, dtype=dtype)
    emulated.emu_dequantize_nf4(ptr(packed), *_scales(qw), ptr(out), n, 6, code(dtype))
    assert torch.equal(out, qw.dequantize(dtype).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, K, N, ldx, bias", [(1, 96, 9, 96, True), (3, 96, 33, 128, False), (5, 100, 7, 100, True),
                                                (4, 64 * 3, 5, 64 * 3 + 1, False), (9, 4097, 3, 4097, True)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_against_fp64(emulated, dtype, M, K, N, ldx, bias, double_quant):
    """Warp-per-output GEMV: the 32-wide vector path (K % 32 == 0, aligned rows), the lane-strided
    path (odd K, or an ldx that unaligns rows), tiles of 1 and 4 rows with a ragged last tile."""
    qw = lora_ext.quantize_nf4(torch.randn(N, K) * 0.05, 64, double_quant)
    storage = torch.randn(M, ldx).to(dtype)
    x = storage[:, :K]
    b = torch.randn(N).to(dtype) if bias else None
    y = torch.empty(M, N, dtype=dtype)
    emulated.emu_nf4_gemv(ptr(x), ldx, ptr(qw.packed), *_scales(qw), ptr(b), ptr(y), M, N, K, 6, code(dtype))
    ref = x.double() @ qw.dequantize(torch.float32).double().t() + (b.double() if bias else 0.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_merge_equals_the_cpu_kernel(emulated, dtype, sign):
    """8 rows x 256 columns per block, with both edges ragged. The fp64 delta is summed in rank order,
    so the bits are the CPU kernel's."""
    d, k, r = 37, 301, 12
    W = torch.randn(d, k).to(dtype)
    A, B = torch.randn(r, k) / 17, torch.randn(d, r) / 3
    ours, A64, B64 = W.clone(), A.double(), B.double()
    emulated.emu_merge(ptr(ours), ptr(A64), ptr(B64), d, k, r, 0.5, sign, code(dtype))
    cpu = W.clone()
    (lora_ext.merge_lora_ if sign > 0 else lora_ext.unmerge_lora_)(cpu, A, B, 0.5)
    assert torch.equal(ours, cpu)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_merge_equals_the_cpu_kernel(emulated, double_quant):
    d, k, r = 19, 96, 5
    qw = lora_ext.quantize_nf4(torch.randn(d, k), 64, double_quant)
    A, B = torch.randn(r, k) / 9, torch.randn(d, r) / 3
    packed = torch.empty_like(qw.packed)
    absmax, A64, B64 = torch.empty((d * k + 63) // 64), A.double(), B.double()
    emulated.emu_merge_nf4(ptr(qw.packed), *_scales(qw), 6, ptr(A64), ptr(B64), d * k, k, r, 0.75,
                           ptr(packed), ptr(absmax))
    packed_cpu, absmax_cpu = torch.ops.lora_ext.merge_nf4(qw.packed, qw.absmax, 64, [d, k], A, B, 0.75,
                                                          qw.nested_absmax, qw.nested_code, qw.offset,
                                                          qw.nested_blocksize)
    assert torch.equal(packed, packed_cpu) and torch.equal(absmax, absmax_cpu)
