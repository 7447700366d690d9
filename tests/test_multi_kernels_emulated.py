"""The mixed-batch CUDA kernels (csrc/multi/multi_gemm.cuh) and their launcher, run on the CPU
(tests/emulated.py), with the operands multi_cuda_api.cpp gives them: checked against fp64 and against
the CPU operator, on guarded buffers (a read past an end picks up NaN, a write there is reported)."""
import ctypes

import pytest
import torch

from lora_ext import multi_lora as ML
from lora_ext import reference as R

from conftest import requires_c
from emulated import Guarded, code, ptr

pytestmark = requires_c

H200_BLOCKS = 2 * 132  # multi_cuda_api.cpp's target block count on an H200


def run(emulated, x, y, A, B, scales, the_plan, splits=None):
    """y after multi_cuda_api.cpp's launch, emulated; A and B per adapter (r = 0 for an absent one)."""
    M, K, N = x.shape[0], x.shape[1], y.shape[1]
    r_max = max([a.shape[0] for a in A] + [0])
    n_sorted, n_tiles = the_plan.rows.numel(), the_plan.tiles.shape[0]
    if splits is None:
        splits = emulated.emu_multi_shrink_splits(n_tiles, r_max, K, H200_BLOCKS)
    gx, gy = Guarded(x), Guarded(y)
    grows, gtiles = Guarded(the_plan.rows), Guarded(the_plan.tiles)
    gA = [Guarded(a.float().contiguous()) if a.numel() else None for a in A]
    gB = [Guarded(b.float().contiguous()) if b.numel() else None for b in B]
    gT = Guarded(torch.zeros(max(1, splits * n_sorted * r_max)))
    a_ptrs = (ctypes.c_void_p * len(A))(*[ptr(g.t) if g else None for g in gA])
    b_ptrs = (ctypes.c_void_p * len(B))(*[ptr(g.t) if g else None for g in gB])
    ranks = (ctypes.c_int64 * len(A))(*[a.shape[0] for a in A])
    scl = (ctypes.c_float * len(A))(*scales)
    ok = emulated.emu_multi_lora(ptr(gx.t), code(x.dtype), ptr(gy.t), code(y.dtype), ptr(grows.t), ptr(gtiles.t),
                                 a_ptrs, b_ptrs, ranks, scl, ptr(gT.t), M, K, N, n_sorted, n_tiles, len(A), r_max,
                                 splits)
    assert ok == 1
    gT.check()
    return gy.check()


def adapters(K, N, ranks):
    return ([torch.randn(r, K) / K ** 0.5 for r in ranks], [torch.randn(N, r) for r in ranks],
            [0.5 + i for i in range(len(ranks))])


@pytest.mark.parametrize("M, K, N, ranks, splits", [
    (1, 1, 1, [1], 1),                  # one row, one adapter
    (70, 33, 65, [5, 0, 17], 1),        # an adapter that does not target the layer; two column tiles
    (130, 520, 70, [16, 3, 64, 1], 2),  # tiles of 64 and ragged ones; K in two slices
    (9, 300, 130, [7, 9], 5),           # 5 slices of 64 over K = 300: the last one empty
    (33, 40, 20, [33, 128], 1),         # ranks past one rank tile of 16
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_against_fp64(emulated, M, K, N, ranks, splits, dtype):
    """Rows in random order with random adapters (some with none), tiles cut at 64 rows, K slices."""
    A, B, scales = adapters(K, N, ranks)
    idx = torch.randint(-1, len(ranks), (M,))
    idx[0] = len(ranks) - 1  # at least one row with an adapter
    x, y0 = torch.randn(M, K).to(dtype), torch.randn(M, N).to(dtype)
    got = run(emulated, x, y0.clone(), A, B, scales, ML.plan(idx, len(ranks)), splits)
    exact = R.multi_lora_forward(y0, x, A, B, scales, idx)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), exact.double(), rtol=tol, atol=tol * exact.abs().max().item())
    untouched = (idx < 0) | torch.tensor([ranks[i] == 0 if i >= 0 else False for i in idx.tolist()])
    assert torch.equal(got[untouched], y0[untouched]), "a row with no adapter here must keep the base output's bits"
    if dtype != torch.float32:  # one rounding of y: at most a few values one ulp off the exact rounding
        assert (got != exact).double().mean().item() < 0.05


def test_kernels_equal_the_cpu_operator(emulated):
    """Decode (one row per adapter) and prefill (long runs of rows) through the same kernels: the CUDA
    kernels' sums and the CPU operator's agree to fp32 rounding."""
    K, N = 257, 96
    A, B, scales = adapters(K, N, [8, 16, 4, 32])
    for idx in (torch.tensor([3, 0, -1, 2, 1, 3, 0, 2]), torch.arange(4).repeat_interleave(70)):
        x, y0 = torch.randn(idx.numel(), K), torch.randn(idx.numel(), N)
        the_plan = ML.plan(idx, 4)
        got = run(emulated, x, y0.clone(), A, B, scales, the_plan)
        cpu = ML.add_adapters_(y0.clone(), x, A, B, scales, the_plan)
        torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-5 * cpu.abs().max().item())


def test_malformed_plan_stays_in_bounds(emulated):
    """What the CPU operator refuses and the CUDA glue does not read (a sync per layer): tiles naming an
    adapter that is not there, running past rows, a row outside x. The kernels skip them: the guarded
    buffers show no access outside, and the rows they would have touched keep their values."""
    M, K, N = 10, 24, 18
    A, B, scales = adapters(K, N, [4, 6])
    x, y0 = torch.randn(M, K), torch.randn(M, N)
    rows = torch.tensor([0, 1, 2, 3, 99], dtype=torch.int64)
    tiles = torch.tensor([[0, 0, 2], [5, 2, 1], [1, 3, 9], [1, -1, 2], [1, 4, 1]], dtype=torch.int32)
    got = run(emulated, x, y0.clone(), A, B, scales, ML.MultiLoraPlan(rows, tiles, 2))
    exact = R.multi_lora_forward(y0, x, A, B, scales, torch.tensor([0, 0] + [-1] * 8))
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


def test_splits_fill_the_gpu_and_respect_the_minimum_slice(emulated):
    """Decode: 32 one-row tiles at r = 16 give 32 blocks, so K = 4096 is cut in slices; prefill tiles
    already fill the GPU; a short K is never cut below 256."""
    splits = emulated.emu_multi_shrink_splits
    assert splits(32, 16, 4096, H200_BLOCKS) == 9
    assert splits(80, 16, 4096, H200_BLOCKS) == 4
    assert splits(1000, 16, 4096, H200_BLOCKS) == 1
    assert splits(1, 16, 300, H200_BLOCKS) == 1
    assert splits(1, 16, 0, H200_BLOCKS) == 1
