"""The CUDA NF4 and merge kernels and their launchers (csrc/nf4/*_cuda.cu, csrc/merge/merge_cuda.cu),
run on the CPU (tests/emulated.py: each CUDA thread a std::thread, __syncthreads a barrier, warp
shuffles through per-warp barriers). The CPU kernels are bit-exact with bitsandbytes
(tests/test_nf4.py), and these tests hold the CUDA kernels to the same bits. That covers the
warp-per-block quantizer, the double quantizer, both dequantize paths (16-byte vector and bytewise),
the GEMV's vector and scalar paths, and the merges. Every buffer sits between guard margins
(emulated.Guarded): reads past an end pick up NaN, and writes past an end are reported."""
import math

import pytest
import torch

import lora_ext
from lora_ext import reference as R

from conftest import requires_c
from emulated import Guarded, code, ptr

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Weight:
    """An NF4 weight's packed bytes and scales copied into guarded buffers (emulated.Guarded: NaN or
    0xA5 margins), and the pointers a launcher gets. The copies live as long as this object."""

    def __init__(self, qw):
        self.qw = qw
        self.packed = Guarded(qw.packed)
        self.state = [Guarded(t) if t is not None else None
                      for t in (qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset)]

    def scales(self):
        """(absmax, qabsmax, nested_absmax, nested_code, offset, nested_log2)"""
        absmax, nested_absmax, nested_code, offset = [g.t if g is not None else None for g in self.state]
        if self.qw.double_quant:
            return None, ptr(absmax), ptr(nested_absmax), ptr(nested_code), ptr(offset), \
                int(math.log2(self.qw.nested_blocksize))
        return ptr(absmax), None, None, None, None, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, blocksize", [(1, 64), (15, 32), (64 * 3 + 7, 64), (4096 * 2 + 5, 4096), (700, 128)])
def test_quantize_equals_the_cpu_kernel(emulated, dtype, n, blocksize):
    """One warp per block, the absmax reduced by shuffles. The tail block is partial, and one value
    lies exactly on a code midpoint."""
    x = torch.randn(n).to(dtype)
    if n > 40:
        x[:32] = 0.0                                        # an all-zero block (blocksize 32)
        x[40] = x[41:64].abs().max() * 0.5 * (0.5626170039176941 + 0.44070982933044434)  # a midpoint
    gx = Guarded(x)
    packed = Guarded(torch.empty((n + 1) // 2, 1, dtype=torch.uint8))
    absmax = Guarded(torch.empty((n + blocksize - 1) // blocksize))
    emulated.emu_quantize_nf4(ptr(gx.t), code(dtype), ptr(packed.t), ptr(absmax.t), n, int(math.log2(blocksize)))
    packed_cpu, absmax_cpu = torch.ops.lora_ext.quantize_nf4(x, blocksize)
    assert torch.equal(packed.check(), packed_cpu) and torch.equal(absmax.check(), absmax_cpu)


@pytest.mark.parametrize("n", [1, 255, 600])
def test_double_quant_equals_the_cpu_kernel(emulated, n):
    absmax, code_map = torch.rand(n) * 3, R.dynamic_map()
    q_cpu, nested_cpu, offset = torch.ops.lora_ext.double_quant(absmax, code_map, 256)
    ins = [Guarded(t) for t in (absmax, offset, code_map)]
    q, nested = Guarded(torch.empty(n, dtype=torch.uint8)), Guarded(torch.empty((n + 255) // 256))
    emulated.emu_double_quant(*[ptr(g.t) for g in ins], ptr(q.t), ptr(nested.t), n, 8)
    assert torch.equal(q.check(), q_cpu) and torch.equal(nested.check(), nested_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n, aligned", [(64 * 9, True), (64 * 9 + 13, True), (33, True), (64 * 9 + 13, False)])
def test_dequantize_equals_the_cpu_kernel(emulated, dtype, double_quant, n, aligned):
    """16-byte vector chunks with a ragged tail when packed and out are aligned; byte by byte when the
    packed bytes are a view at an odd offset."""
    w = Weight(lora_ext.quantize_nf4(torch.randn(n), 64, double_quant))
    packed = w.packed.t.reshape(-1)
    if not aligned:
        raw = Guarded(torch.cat([torch.zeros(1, dtype=torch.uint8), packed]))
        packed = raw.t[1:]
    out = Guarded(torch.empty(n, dtype=dtype))
    emulated.emu_dequantize_nf4(ptr(packed), *w.scales(), ptr(out.t), n, 6, code(dtype))
    assert torch.equal(out.check(), w.qw.dequantize(dtype).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, K, N, ldx, bias", [(1, 96, 9, 96, True), (3, 96, 33, 128, False), (5, 100, 7, 100, True),
                                                (4, 64 * 3, 5, 64 * 3 + 1, False), (9, 4097, 3, 4097, True)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_against_fp64(emulated, dtype, M, K, N, ldx, bias, double_quant):
    """Warp-per-output GEMV: the 32-wide vector path (K % 32 == 0, aligned rows), the lane-strided
    path (odd K, or an ldx that unaligns rows), tiles of 1 and 4 rows with a ragged last tile."""
    w = Weight(lora_ext.quantize_nf4(torch.randn(N, K) * 0.05, 64, double_quant))
    storage = Guarded(torch.randn(M, ldx).to(dtype))
    x = storage.t[:, :K]
    b = Guarded(torch.randn(N).to(dtype)) if bias else None
    y = Guarded(torch.empty(M, N, dtype=dtype))
    emulated.emu_nf4_gemv(ptr(x), ldx, ptr(w.packed.t), *w.scales(), ptr(b.t if bias else None), ptr(y.t), M, N, K,
                          6, code(dtype))
    y = y.check()
    ref = x.double() @ w.qw.dequantize(torch.float32).double().t() + (b.t.double() if bias else 0.0)
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
    ours, A64, B64 = Guarded(W), Guarded(A.double()), Guarded(B.double())
    emulated.emu_merge(ptr(ours.t), ptr(A64.t), ptr(B64.t), d, k, r, 0.5, sign, code(dtype))
    cpu = W.clone()
    (lora_ext.merge_lora_ if sign > 0 else lora_ext.unmerge_lora_)(cpu, A, B, 0.5)
    assert torch.equal(ours.check(), cpu)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_merge_equals_the_cpu_kernel(emulated, double_quant):
    d, k, r = 19, 96, 5
    w = Weight(lora_ext.quantize_nf4(torch.randn(d, k), 64, double_quant))
    qw = w.qw
    A, B = torch.randn(r, k) / 9, torch.randn(d, r) / 3
    packed, absmax = Guarded(torch.empty_like(qw.packed)), Guarded(torch.empty((d * k + 63) // 64))
    A64, B64 = Guarded(A.double()), Guarded(B.double())
    emulated.emu_merge_nf4(ptr(w.packed.t), *w.scales(), 6, ptr(A64.t), ptr(B64.t), d * k, k, r, 0.75,
                           ptr(packed.t), ptr(absmax.t))
    packed, absmax = packed.check(), absmax.check()
    packed_cpu, absmax_cpu = torch.ops.lora_ext.merge_nf4(qw.packed, qw.absmax, 64, [d, k], A, B, 0.75,
                                                          qw.nested_absmax, qw.nested_code, qw.offset,
                                                          qw.nested_blocksize)
    assert torch.equal(packed, packed_cpu) and torch.equal(absmax, absmax_cpu)
