"""DoRA's CUDA path run on the CPU (tests/emulated.py): the LoRA products with g and the bias in y's
epilogue (lora_gemm.cuh's finish), the column-dot kernel (csrc/dora/dora_cuda.cu), and the backward as
dora_cuda_api.cpp composes it (the LoRA backward on g * B, then dB and dg), against fp64 and against
the CPU operator."""
import pytest
import torch

from conftest import requires_c
from emulated import Guarded, code, ptr
from test_lora_kernels_emulated import H200_BLOCKS, _close, backward, forward, tensor_cores

pytestmark = requires_c

BF16 = torch.bfloat16


def _dora_inputs(M, K, N, r, act, zero_g=True):
    x, base_out = torch.randn(M, K).to(act), torch.randn(M, N).to(act)
    A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5
    g, bias = torch.rand(N) * 2 + 0.25, torch.randn(N)
    if zero_g:
        g[::5] = 0.0
    return x, base_out, A, B, g, bias


def column_dots(emulated, a, b, target_blocks=H200_BLOCKS):
    """dora_cuda_api.cpp's column_dots_cuda: the kernel's per-slice partial sums, then their sum."""
    M, N = a.shape
    splits = emulated.emu_column_dot_splits(M, N, target_blocks)
    ga, gb, partial = Guarded(a), Guarded(b), Guarded(torch.empty(splits, N))
    assert emulated.emu_column_dots(ptr(ga.t), ptr(gb.t), code(a.dtype), ptr(partial.t), M, N, target_blocks) == 1
    ga.check()
    gb.check()
    return partial.check().sum(0), splits


@pytest.mark.parametrize("M, N, dtype", [(1, 1, torch.float32), (1030, 45, BF16), (300, 70, torch.float16),
                                         (0, 9, torch.float32), (5000, 33, torch.float32)])
def test_column_dots_against_fp64(emulated, M, N, dtype):
    a, b = torch.randn(M, N).to(dtype), torch.randn(M, N).to(dtype)
    ours, splits = column_dots(emulated, a, b)
    assert splits == max(1, min(-(-M // 64), -(-H200_BLOCKS // -(-N // 32))))  # slices of >= 64 rows fill the GPU
    _close(ours, (a.double() * b.double()).sum(0), 1e-5)


@pytest.mark.parametrize("M, K, N, r, act, with_bias, tc", [
    (67, 33, 70, 12, BF16, True, False),             # N: two column tiles, the second ragged
    (130, 36, 21, 80, torch.float16, False, False),  # r > 64
    (5, 7, 3, 1, torch.float32, True, False),
    (1100, 24, 20, 16, torch.float32, True, True),   # y on the tensor-core kernel (fp32 activations)
    (67, 33, 70, 12, BF16, False, True),
])
def test_dora_matches_the_cpu_operator(emulated, M, K, N, r, act, with_bias, tc):
    """Forward (g and the bias in y's epilogue) and backward (the LoRA products on g * B, dg from the
    column dots) as the CUDA operator runs them, against the CPU operator; g has zeros."""
    x, base_out, A, B, g, bias = _dora_inputs(M, K, N, r, act)
    bias = bias.to(act) if with_bias else None
    s = 0.8
    with tensor_cores(emulated, on=tc):
        y, T = forward(emulated, x, base_out, A, B, s, 0.0, 0, g=g, bias=bias)
    y_cpu, T_cpu = torch.ops.lora_ext.dora_forward(x, base_out, A, B, g, bias, s)
    tol = 1e-5 if act == torch.float32 else 1e-2
    _close(y, y_cpu, tol)
    _close(T, T_cpu, 1e-5)

    dy, dx_base = torch.randn(M, N).to(act), torch.randn(M, K).to(act)
    with tensor_cores(emulated, on=tc):
        dx, dA, dB_over_g = backward(emulated, dy, x, T_cpu, A, B * g[:, None], s, 0.0, 0, grad_x_base=dx_base)
    dg = column_dots(emulated, dy, base_out)[0] + (dB_over_g * B).sum(1)
    ours = (dx, dA, dB_over_g * g[:, None], dg)
    cpu = torch.ops.lora_ext.dora_backward(dy, x, base_out, T_cpu, A, B, g, s, dx_base)
    for name, a, b in zip(("dx", "dA", "dB", "dg"), ours, cpu):
        _close(a, b, tol if name == "dx" else 1e-5)
