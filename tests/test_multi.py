"""The mixed-batch operator (csrc/multi): torch.ops.lora_ext.multi_lora_forward_ and its functional form
lora_ext.multi_lora_linear, against fp64 (lora_ext.reference.multi_lora_forward); its plan; opcheck,
torch.compile; the per-row kernel's SIMD and portable paths; bad input refused by name, y unchanged."""

import pytest
import torch

import lora_ext
from lora_ext import multi_lora as ML
from lora_ext import reference as R

from conftest import on_each_simd_path, requires_c

pytestmark = requires_c


def adapters(K, N, ranks, dtype=torch.float32, device="cpu"):
    A = [(torch.randn(r, K) / K ** 0.5).to(device, dtype) for r in ranks]
    B = [torch.randn(N, r).to(device, dtype) for r in ranks]
    return A, B, [0.25 + 0.5 * i for i in range(len(ranks))]


def assert_close_to_fp64(got, exact, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(got.double(), exact.double(), rtol=tol, atol=tol * exact.abs().max().item())


def test_plan_groups_rows_by_adapter_in_tiles_of_64():
    idx = torch.tensor([2, -1, 0, 2, 2, 0] + [1] * 130)
    p = ML.plan(idx, 4)
    assert p.rows.tolist() == [2, 5, *range(6, 136), 0, 3, 4]
    assert p.tiles.tolist() == [[0, 0, 2], [1, 2, 64], [1, 66, 64], [1, 130, 2], [2, 132, 3]]
    with pytest.raises(ValueError, match=r"adapter_indices must be in \[-1, 4\)"):
        ML.plan(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError, match="must be integers"):
        ML.plan(torch.tensor([0.0]), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M, K, N, ranks", [
    (1, 7, 5, [3]),                       # one row
    (37, 130, 67, [3, 0, 16, 8, 33]),     # ragged ranks, an adapter absent from the layer
    (300, 96, 129, [4, 64]),              # long runs (BLAS groups) and short ones
])
def test_operator_against_fp64(device, dtype, M, K, N, ranks):
    """Rows in random order, some with no adapter; a run of 40 rows of one adapter takes BLAS on the
    CPU, the short runs the per-row kernel. Rows with no adapter keep the base output's bits."""
    A, B, scales = adapters(K, N, ranks, dtype, device)
    idx = torch.randint(-1, len(ranks), (M,))
    idx[: min(M, 40)] = len(ranks) - 1
    x = torch.randn(M, K, dtype=dtype, device=device)
    y0 = torch.randn(M, N, dtype=dtype, device=device)
    y = y0.clone()
    the_plan = ML.plan(idx, len(ranks), device)
    ML.add_adapters_(y, x, A, B, scales, the_plan)
    exact = R.multi_lora_forward(y0.cpu(), x.cpu(), [a.cpu() for a in A], [b.cpu() for b in B], scales, idx)
    assert_close_to_fp64(y.cpu(), exact, dtype)
    keep = (idx < 0) | (torch.tensor(ranks)[idx.clamp(min=0)] == 0)
    assert torch.equal(y.cpu()[keep], y0.cpu()[keep])


@pytest.mark.parametrize("case", ["64 adapters", "all rows one adapter", "every row the base"])
def test_functional_over_a_dense_weight(case):
    """multi_lora_linear = x W^T + b + each row's update; 64 adapters of ranks 1..64 in one batch."""
    K, N = 48, 40
    n = 64 if case == "64 adapters" else 3
    A, B, scales = adapters(K, N, [1 + i for i in range(n)])
    M = 2 * n if case == "64 adapters" else 9
    idx = {"64 adapters": torch.randperm(M) % n, "all rows one adapter": torch.full((M,), 1),
           "every row the base": torch.full((M,), -1)}[case]
    x, W, b = torch.randn(M, 1, K), torch.randn(N, K), torch.randn(N)  # leading dims (M, 1): decode
    with torch.no_grad():
        y = lora_ext.multi_lora_linear(x, W, A, B, scales, idx, bias=b)
    exact = R.multi_lora_forward(torch.nn.functional.linear(x.double(), W.double(), b.double()), x, A, B, scales, idx)
    assert y.shape == (M, 1, N)
    assert_close_to_fp64(y, exact, torch.float32)


def test_functional_over_nf4_and_modules():
    """An NF4Weight base, an NF4Linear and an nn.Linear module: the base output plus the updates."""
    K, N, M = 64, 24, 11
    A, B, scales = adapters(K, N, [2, 5])
    idx = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 1, 0])
    linear = torch.nn.Linear(K, N)
    nf4 = lora_ext.NF4Linear.from_linear(linear, blocksize=64)
    x = torch.randn(M, K)
    with torch.no_grad():
        for base, base_out in ((nf4.qweight, x @ nf4.dequantize().t()), (nf4, nf4(x)), (linear, linear(x))):
            y = lora_ext.multi_lora_linear(x, base, A, B, scales, idx)
            assert_close_to_fp64(y, R.multi_lora_forward(base_out, x, A, B, scales, idx), torch.float32)


def test_the_per_row_kernels_simd_and_portable_paths_agree():
    """LORA_EXT_DISABLE_SIMD=1 forces the portable loops: both paths against fp64, in fresh processes."""
    script = (
        "import torch, lora_ext\n"
        "from lora_ext import multi_lora as ML, reference as R\n"
        "torch.manual_seed(0)\n"
        "A = [torch.randn(r, 203) for r in (5, 16, 1)]; B = [torch.randn(77, r) for r in (5, 16, 1)]\n"
        "idx = torch.tensor([0, 1, 2, -1, 1, 0, 2, 1]); x = torch.randn(8, 203); y0 = torch.randn(8, 77)\n"
        "y = ML.add_adapters_(y0.clone(), x, A, B, [0.5, 1.5, 2.0], ML.plan(idx, 3))\n"
        "e = R.multi_lora_forward(y0, x, A, B, [0.5, 1.5, 2.0], idx)\n"
        "print(((y.double() - e).abs().max() / e.abs().max()).item())\n")
    for flag, error in on_each_simd_path(script):
        assert error < 1e-6, (flag, error)


def test_opcheck_and_compile():
    K, N, M = 20, 12, 10
    A, B, scales = adapters(K, N, [3, 0, 7])
    idx = torch.tensor([0, 2, 2, -1, 1, 0, 2, 2, 0, -1])
    x = torch.randn(M, K)
    the_plan = ML.plan(idx, 3)
    args = (torch.randn(M, N), x, A, B, scales, the_plan.rows, the_plan.tiles)
    torch.library.opcheck(torch.ops.lora_ext.multi_lora_forward_.default, args)

    def layer(x, W, rows, tiles):
        y = x @ W.t()
        torch.ops.lora_ext.multi_lora_forward_(y, x, A, B, scales, rows, tiles)
        return y

    W = torch.randn(N, K)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, W, the_plan.rows, the_plan.tiles),
                               R.multi_lora_forward(x @ W.t(), x, A, B, scales, idx).float())


def _bad_calls():
    K, N, M = 8, 6, 5
    A, B, scales = adapters(K, N, [2, 3])
    x, rows = torch.randn(M, K), torch.tensor([0, 1, 2], dtype=torch.int64)
    tiles = torch.tensor([[0, 0, 2], [1, 2, 1]], dtype=torch.int32)
    ok = dict(x=x, A=A, B=B, scales=scales, rows=rows, tiles=tiles)
    return ok, {
        "lora_A\\[1\\] must be \\(r, 8\\)": dict(A=[A[0], torch.randn(3, 9)]),
        "lora_B\\[0\\] must be \\(6, 2\\)": dict(B=[torch.randn(6, 3), B[1]]),
        "one entry per adapter": dict(scales=[1.0]),
        "a row per row of the input": dict(x=torch.randn(M + 1, K)),
        "rows must be a 1-D int64": dict(rows=rows.int()),
        "tiles must be an int32 tensor of shape \\(n, 3\\)": dict(tiles=tiles[:, :2]),
        "rows\\[2\\] = 7 is not a row": dict(rows=torch.tensor([0, 1, 7])),
        "row 1 is listed twice": dict(rows=torch.tensor([0, 1, 1])),
        "tiles\\[1\\]: adapter must be in \\[0, 2\\), got 2": dict(tiles=torch.tensor([[0, 0, 2], [2, 2, 1]], dtype=torch.int32)),
        "tiles\\[1\\]: must cover positions inside rows' 3 .*got \\[2, 4\\)": dict(tiles=torch.tensor([[0, 0, 2], [1, 2, 2]], dtype=torch.int32)),
        "position 1 of rows is in two tiles": dict(tiles=torch.tensor([[0, 0, 2], [1, 1, 1]], dtype=torch.int32)),
        "input and output must be float32": dict(x=x.to(torch.int32)),
    }


@pytest.mark.parametrize("message", list(_bad_calls()[1]))
def test_bad_input_is_refused_by_name_and_changes_nothing(message):
    ok, bad = _bad_calls()
    call = {**ok, **bad[message]}
    y = torch.randn(5, 6)
    before = y.clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lora_ext.multi_lora_forward_(y, call["x"], call["A"], call["B"], call["scales"], call["rows"],
                                               call["tiles"])
    assert torch.equal(y, before)


def test_functional_refuses_gradients_and_wrong_lengths():
    K, N = 8, 6
    A, B, scales = adapters(K, N, [2, 3])
    A[0].requires_grad_(True)
    x, W = torch.randn(4, K), torch.randn(N, K)
    with pytest.raises(RuntimeError, match="computes no gradient"):
        lora_ext.multi_lora_linear(x, W, A, B, scales, [0, 1, 1, 0])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"one entry per row of x \(4\), got 3"):
            lora_ext.multi_lora_linear(x, W, A, B, scales, [0, 1, 1])
        with pytest.raises(ValueError, match="one number or one per adapter"):
            lora_ext.multi_lora_linear(x, W, A, B, [1.0, 2.0, 3.0], [0, 1, 1, 0])
