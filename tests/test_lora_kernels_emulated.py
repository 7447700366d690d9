"""The CUDA LoRA kernels (csrc/lora/lora_gemm.cuh, lora_cuda.cu) and their launchers, run on the CPU
(tests/emulated.py: each CUDA thread a std::thread, __syncthreads a barrier). They get the operands
that lora_cuda_api.cpp passes them, and are checked against fp64 matmuls and against the CPU
operator. So every CPU run checks the kernels' tiling, strides, bounds, split-K and dropout indexing,
which otherwise only a GPU would test."""
import math

import pytest
import torch

from lora_ext import reference as R

from conftest import requires_c
from emulated import Guarded, code, ptr

pytestmark = requires_c


# Operands as lora_cuda_api.cpp describes them: (tensor, rows, cols, row stride, col stride).
def as_is(t):
    return t, t.shape[0], t.shape[1], t.shape[1], 1


def transposed(t):
    return t, t.shape[1], t.shape[0], 1, t.shape[1]


def gemm(emulated, a, b, out, alpha=1.0, addend=None, dropout_a=False, dropout_out=False, p=0.0, seed=0, splits=1):
    """out = alpha * a b [+ addend] by the emulated kernels, as lora_cuda_api.cpp's lowrank_gemm."""
    (at, m, k, a_sm, a_sk), (bt, kb, n, b_sk, b_sn) = a, b
    assert k == kb and bt.dtype == torch.float32 and out.is_contiguous() and out.shape == (m, n)
    # Operands in NaN margins, outputs in checked margins (Guarded).
    ga, gb, gout = Guarded(at), Guarded(bt), Guarded(out)
    gadd = Guarded(addend) if addend is not None else None
    gws = Guarded(torch.empty(splits * m * n)) if splits > 1 else None
    ok = emulated.emu_lowrank_gemm(ptr(ga.t), a_sm, a_sk, code(at.dtype), ptr(gb.t), b_sk, b_sn,
                                   ptr(gadd.t if gadd else None), ptr(gout.t), code(out.dtype),
                                   ptr(gws.t if gws else None), m, n, k, splits, alpha, int(dropout_a),
                                   int(dropout_out), p, seed)
    assert ok == 1, "no kernel for this dtype pair"
    if gws is not None:
        gws.check()
    return out.copy_(gout.check())


class tensor_cores:
    """Within it, the emulated GPU has bf16 mma (lora_cuda_api.cpp's tensor_cores_enabled()), and on
    leaving it the emulated wmma calls must have run (or not, with on=False)."""

    def __init__(self, emulated, on=True):
        self.emulated, self.on = emulated, on

    def __enter__(self):
        self.emulated.emu_set_tensor_cores(int(self.on))
        self.calls = self.emulated.emu_mma_calls()

    def __exit__(self, *exc):
        self.emulated.emu_set_tensor_cores(0)
        if exc[0] is None:
            ran = self.emulated.emu_mma_calls() > self.calls
            assert ran == self.on, "the tensor-core kernel ran" if ran else "the tensor-core kernel did not run"


H200_BLOCKS = 2 * 132  # the plan's target block count on an H200: the K splits the GPU would use


def forward(emulated, x, base_out, A, B, scale, p, seed, x_offset=0, target_blocks=H200_BLOCKS, g=None, bias=None):
    """lora_cuda_api.cpp's forward: lora_plan.h's products, emulated, on guarded buffers (x starting
    x_offset elements past an aligned address). With g and bias: DoRA's (dora_cuda_api.cpp)."""
    M, K, r, N = x.numel() // x.shape[-1], x.shape[-1], A.shape[0], B.shape[0]
    gx, gbase = Guarded(x.reshape(M, K), x_offset), Guarded(base_out.reshape(M, N))
    gA, gB = Guarded(A.float()), Guarded(B.float())
    gg, gbias = (None if v is None else Guarded(v.float()) for v in (g, bias))
    T, y = Guarded(torch.empty(M, r)), Guarded(torch.empty(M, N, dtype=base_out.dtype))
    ok = emulated.emu_lora_forward(ptr(gx.t), code(x.dtype), ptr(gA.t), ptr(gB.t), ptr(gbase.t), code(base_out.dtype),
                                   ptr(T.t), ptr(y.t), M, K, N, r, scale, p, seed, target_blocks,
                                   None if gg is None else ptr(gg.t), None if gbias is None else ptr(gbias.t))
    assert ok == 1
    return y.check().view(base_out.shape), T.check().to(A.dtype)


def backward(emulated, grad_y, x, T, A, B, scale, p, seed, x_offset=0, target_blocks=H200_BLOCKS, grad_x_base=None):
    M, K, r, N = x.numel() // x.shape[-1], x.shape[-1], A.shape[0], B.shape[0]
    gdy, gx = Guarded(grad_y.reshape(M, N)), Guarded(x.reshape(M, K), x_offset)
    gA, gB, gT = Guarded(A.float()), Guarded(B.float()), Guarded(T.float())
    dT, dB, dAt = Guarded(torch.empty(M, r)), Guarded(torch.empty(N, r)), Guarded(torch.empty(K, r))
    dx = Guarded(torch.empty(M, K, dtype=x.dtype))
    dx_base = None if grad_x_base is None else Guarded(grad_x_base.reshape(M, K).to(x.dtype))
    ok = emulated.emu_lora_backward(ptr(gdy.t), code(grad_y.dtype), ptr(gx.t), code(x.dtype), ptr(gA.t), ptr(gB.t),
                                    ptr(gT.t), ptr(dT.t), ptr(dB.t), ptr(dAt.t), ptr(dx.t),
                                    None if dx_base is None else ptr(dx_base.t), M, K, N, r, scale, p, seed,
                                    target_blocks)
    assert ok == 1
    dT.check()
    return dx.check().view(x.shape), dAt.check().t().contiguous().to(A.dtype), dB.check().to(B.dtype)


def _close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * (b.abs().max().item() + 1e-30))


@pytest.mark.parametrize("M, K, N, orientation, splits", [
    (1, 1, 1, "along_k", 1), (70, 33, 5, "along_k", 1), (64, 48, 16, "along_m", 1), (65, 17, 17, "along_k", 2),
    (130, 1100, 70, "along_m", 3), (9, 40, 130, "along_k", 7),  # 7 slices of 16 over K = 40: some are empty
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_against_fp64_matmul(emulated, M, K, N, orientation, splits, dtype):
    """One product, both ways of reading a (rows contiguous along k, or along m as for dy^T and x^T),
    tiles cut at every edge, narrow (N <= 16) and wide tiles, K split into slices (some empty)."""
    a_store = torch.randn(M, K).to(dtype) if orientation == "along_k" else torch.randn(K, M).to(dtype)
    a = as_is(a_store) if orientation == "along_k" else transposed(a_store)
    b = torch.randn(K, N)
    out = gemm(emulated, a, as_is(b), torch.empty(M, N), alpha=0.5, splits=splits)
    a_mat = a_store.double() if orientation == "along_k" else a_store.double().t()
    _close(out, 0.5 * a_mat @ b.double(), 1e-5)
    # fp32 in, 16-bit out with an addend: one rounding of alpha * acc + addend
    if dtype != torch.float32:
        a32, addend = torch.randn(M, K), torch.randn(M, N).to(dtype)
        out16 = gemm(emulated, as_is(a32), as_is(b), torch.empty(M, N, dtype=dtype), alpha=1.5, addend=addend)
        exact = (1.5 * a32.double() @ b.double() + addend.double()).to(dtype)
        assert (out16 != exact).double().mean().item() < 0.02
        _close(out16, exact, 1e-2)


@pytest.mark.parametrize("M, K, N, orientation, splits, p", [
    (1, 1, 1, "along_k", 1, 0.0), (70, 33, 12, "along_k", 1, 0.3), (64, 48, 16, "along_m", 1, 0.0),
    (65, 17, 17, "along_k", 2, 0.2), (130, 1100, 70, "along_m", 3, 0.1), (9, 72, 33, "along_k", 7, 0.0),
    (200, 64, 64, "along_m", 1, 0.25),
])
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32])
def test_tensor_core_kernel_against_fp64_matmul(emulated, M, K, N, orientation, splits, p, a_dtype):
    """The tensor-core kernel (lora_gemm_tc.cuh): fp32-grade results against fp64 (fp32 operands split
    in three bf16 parts), for a bf16 or an fp32 big operand, both ways of reading it, tiles of 16, 32
    and 64 columns and two column tiles (N = 70), ragged edges, K slices (some empty), and x's dropout,
    whose mask must be the CUDA-core kernel's."""
    a_store = (torch.randn(M, K) if orientation == "along_k" else torch.randn(K, M)).to(a_dtype)
    a = as_is(a_store) if orientation == "along_k" else transposed(a_store)
    b = torch.randn(K, N) * torch.logspace(-3, 3, N)  # parts of very different sizes in one tile
    kwargs = dict(alpha=0.5, dropout_a=p > 0, p=p, seed=77, splits=splits)
    with tensor_cores(emulated):
        out = gemm(emulated, a, as_is(b), torch.empty(M, N), **kwargs)
    with tensor_cores(emulated, on=False):
        cuda_cores = gemm(emulated, a, as_is(b), torch.empty(M, N), **kwargs)
    dropped = a_store.double()
    if p > 0:  # x's flat index picks the draw: here, a_store's
        keep = R.dropout_keep_mask(a_store.numel(), p, 77).view(a_store.shape)
        dropped = torch.where(keep, dropped * float(torch.tensor(1 / (1 - p), dtype=torch.float32)), 0.0)
    a_mat = dropped if orientation == "along_k" else dropped.t()
    ref = 0.5 * a_mat @ b.double()
    _close(out, ref, 1e-5)

    def error(t):
        return ((t.double() - ref).abs() / (ref.abs() + ref.abs().mean())).max().item()
    # As accurate as fp32 FMAs: two bf16 parts instead of three would be ~100 times worse.
    assert error(out) <= 4 * error(cuda_cores) + 1e-7, (error(out), error(cuda_cores))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_kernel_16_bit_outputs_as_the_cuda_core_kernel(emulated, out_dtype):
    """y and dx as the tensor-core kernel writes them (fp32 a and b, an addend, dx's dropout on the
    output): within one rounding of the CUDA-core kernel's and nearly all equal, the same elements
    dropped (a dropped element is its addend exactly), and within one ulp of fp64 rounded once."""
    M, K, N = 70, 48, 100  # K = r: the reduction is over the rank
    a, b = torch.randn(M, K), torch.randn(K, N) / 7
    addend = torch.randn(M, N).to(out_dtype)
    kwargs = dict(alpha=1.5, addend=addend, dropout_out=True, p=0.3, seed=5)
    outs = []
    for on in (True, False):
        with tensor_cores(emulated, on):
            outs.append(gemm(emulated, as_is(a), as_is(b), torch.empty(M, N, dtype=out_dtype), **kwargs))
    tc, cuda_cores = outs
    assert torch.equal(tc == addend, cuda_cores == addend)
    assert (tc != cuda_cores).double().mean().item() < 0.01
    keep = R.dropout_keep_mask(M * N, 0.3, 5).view(M, N)
    inv_keep = float(torch.tensor(1 / 0.7, dtype=torch.float32))
    exact = torch.where(keep, 1.5 * (a.double() @ b.double()) * inv_keep, 0.0) + addend.double()
    fi = torch.finfo(out_dtype)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(fi.smallest_normal)))) * fi.eps
    assert ((tc.double() - exact).abs() <= ulp).all()


def test_tensor_core_kernel_keeps_huge_infinite_and_tiny_b(emulated):
    """The three-part split of b: a finite b near FLT_MAX must not overflow to Inf (its first part is
    truncated, not rounded up), an infinite b gives +-Inf rather than NaN, NaN stays NaN, and a tiny b
    keeps its precision: the same outputs as the CUDA-core kernel. An Inf in a gives non-finite outputs
    (Inf or NaN: Inf times b's zero parts)."""
    M, K = 20, 24
    a = torch.rand(M, K).mul(0.5).add(0.5).bfloat16()  # in [0.5, 1): no 0 * Inf, no overflowing sum
    b = torch.randn(K, 6)
    b[:, 0] = 3.4e38 / K
    b[3, 1], b[5, 2], b[7, 3] = float("inf"), float("-inf"), float("nan")
    b[:, 4] = torch.randn(K) * 2.0 ** -100  # tiny: its third part near the bottom of the normal range
    b[:, 5] = 0.0
    b[0, 5] = 3.4e38  # rounds up to Inf in bf16
    outs = []
    for on in (True, False):
        with tensor_cores(emulated, on):
            outs.append(gemm(emulated, as_is(a), as_is(b), torch.empty(M, 6), alpha=1.0 / K))
    tc, cuda_cores = outs
    assert torch.isfinite(tc[:, 0]).all() and torch.isfinite(tc[:, 5]).all()
    assert (tc[:, 1] == float("inf")).all() and (tc[:, 2] == float("-inf")).all() and tc[:, 3].isnan().all()
    torch.testing.assert_close(tc, cuda_cores, rtol=1e-5, atol=0.0, equal_nan=True)
    a[4, 9] = float("inf")
    with tensor_cores(emulated):
        out = gemm(emulated, as_is(a), as_is(b), torch.empty(M, 6), alpha=1.0 / K)
    assert not out[4].isfinite().any()
    others = torch.arange(M) != 4
    torch.testing.assert_close(out[others], tc[others], rtol=0.0, atol=0.0, equal_nan=True)


BF16 = torch.bfloat16


@pytest.mark.parametrize("M, K, N, r, p, act, offset, with_base_grad, tc", [
    (7, 40, 24, 4, 0.25, torch.float32, 0, True, False),     # K % 4 == 0: dropout drawn in groups of four
    (67, 33, 70, 12, 0.3, BF16, 0, False, False),            # K odd: dropout drawn element by element
    (130, 36, 20, 80, 0.1, torch.float16, 1, False, False),  # r > 64: two column tiles; x unaligned (no vector loads)
    (1100, 24, 20, 16, 0.2, BF16, 0, False, False),          # 1100 tokens: dB and dA split K in two slices
    (5, 7, 3, 1, 0.0, BF16, 0, True, False),                 # r = 1, no dropout
    (67, 33, 70, 12, 0.3, BF16, 0, False, True),             # and the bf16 cases again with tensor cores
    (130, 36, 20, 80, 0.1, BF16, 1, True, True),
    (1100, 24, 20, 16, 0.2, BF16, 0, False, True),
    (5, 7, 3, 1, 0.0, BF16, 0, True, True),
])
def test_lora_branch_matches_the_cpu_operator(emulated, M, K, N, r, p, act, offset, with_base_grad, tc):
    """Forward and backward as the CUDA operator runs them (lora_plan.h, the launchers, the kernels),
    against the CPU operator: the same values, and the same elements of x dropped. with_base_grad: the
    base layer's dx is the dx epilogue's addend (the fused layer's backward). tc: on a GPU with bf16
    mma, where T, dT, dB and dA take the tensor-core kernel."""
    with tensor_cores(emulated, on=tc):
        _lora_branch_matches_the_cpu_operator(emulated, M, K, N, r, p, act, offset, with_base_grad)


def _lora_branch_matches_the_cpu_operator(emulated, M, K, N, r, p, act, offset, with_base_grad):
    x = torch.randn(M, K).to(act)
    base_out, grad_y = torch.randn(M, N).to(act), torch.randn(M, N).to(act)
    A, B = torch.randn(r, K) / math.sqrt(K), torch.randn(N, r) / math.sqrt(r)
    scale, seed = 1.25, 4242
    y, T = forward(emulated, x, base_out, A, B, scale, p, seed, x_offset=offset)
    y_cpu, T_cpu = torch.ops.lora_ext.lora_forward(x, base_out, A, B, scale, p, seed)
    tol = 1e-5 if act == torch.float32 else 1e-2
    _close(y, y_cpu, tol)
    _close(T, T_cpu, 1e-5)
    dx_base = torch.randn(M, K).to(act) if with_base_grad else None
    grads = backward(emulated, grad_y, x, T_cpu, A, B, scale, p, seed, x_offset=offset, grad_x_base=dx_base)
    grads_cpu = torch.ops.lora_ext.lora_backward(grad_y, x, T_cpu, A, B, scale, p, seed, dx_base)
    for name, ours, ref in zip(("dx", "dA", "dB"), grads, grads_cpu):
        _close(ours, ref, tol if name == "dx" else 1e-5)
    if p > 0 and not with_base_grad:  # (with it, a dropped element's dx is the base's, not 0)
        assert torch.equal(grads[0] == 0, grads_cpu[0] == 0), "the same elements of x are dropped"
        assert (grads[0] == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dropout_kernel_equals_the_cpu_kernel(emulated, dtype):
    x = torch.randn(3 * 257 + 2).to(dtype)  # a ragged last group of four
    gx, out = Guarded(x), Guarded(torch.empty_like(x))
    emulated.emu_dropout(ptr(gx.t), ptr(out.t), x.numel(), 0.3, 99, code(dtype))
    assert torch.equal(out.check(), torch.ops.lora_ext.lora_dropout(x, 0.3, 99))


@pytest.mark.parametrize("tc", [False, True])
@pytest.mark.parametrize("M, N", [(0, 20), (9, 0)])
def test_products_over_an_empty_k(emulated, M, N, tc):
    """Products whose K is 0 give alpha * 0 (+ the addend), with tensor cores on or off: dB and dA over
    a batch of no tokens (an MoE expert that got none), dT over a layer with no output features. With
    tensor cores, such a product used to find no b-parts workspace and be refused."""
    K, r, act = 36, 8, BF16
    x, grad_y = torch.randn(M, K).to(act), torch.randn(M, N).to(act)
    A, B = torch.randn(r, K), torch.randn(N, r)
    T = torch.randn(M, r)
    dx_base = torch.randn(M, K).to(act)
    emulated.emu_set_tensor_cores(int(tc))
    try:
        grads = backward(emulated, grad_y, x, T, A, B, 1.5, 0.0, 3, grad_x_base=dx_base)
    finally:
        emulated.emu_set_tensor_cores(0)
    expected = torch.ops.lora_ext.lora_backward(grad_y, x, T, A, B, 1.5, 0.0, 3, dx_base)
    for name, ours, ref in zip(("dx", "dA", "dB"), grads, expected):
        assert ours.shape == ref.shape and torch.equal(ours, ref), name
    assert grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0
    assert N > 0 or torch.equal(grads[0], dx_base), "no output features: dx is the base's alone"
